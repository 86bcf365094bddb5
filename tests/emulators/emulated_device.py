"""The GPU behind the emulated `cuda.bindings.runtime` and `tensorrt` modules (test doubles:
never shipped, never a measurement). One device of this process, described by the environment:

    SCAN_DEPLOY_EMULATED_GPU = "NAME@MAJOR.MINOR"   (default "Emulated GPU (test double)@9.0")

Device memory is host memory (`bytearray`s) behind fake addresses from DEVICE_BASE up, a range no
host pointer of a 48/52-bit user address space can hold, so a host pointer given where a device
one belongs (or the reverse) is caught. New allocations are filled with 0xFF (NaN as float32,
-1 as an integer), as `cudaMalloc` does not clear memory. Work queued on a stream (copies, engine
runs) runs only when the stream is synchronized: results read early are still the 0xFF filler,
and host memory changed before the synchronize is what gets copied, as a race would make it. An
access outside every live allocation is `cudaErrorIllegalAddress`, sticky as on a real device:
every later call returns it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

DEVICE_ENV = "SCAN_DEPLOY_EMULATED_GPU"
DEFAULT_DEVICE = "Emulated GPU (test double)@9.0"
DEVICE_BASE = 0x7F00_0000_0000_0000
ALIGNMENT = 256  # cudaMalloc's alignment
FILLER = 0xFF
TOTAL_MEMORY = 16 << 30


class CudaFault(Exception):
    """A failed CUDA call: `code` is the name of its `cudaError_t` member."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


@dataclass(frozen=True)
class Properties:
    name: str
    major: int
    minor: int
    total_memory: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def properties() -> Properties:
    """The emulated device, from SCAN_DEPLOY_EMULATED_GPU."""
    name, _, capability = os.environ.get(DEVICE_ENV, DEFAULT_DEVICE).rpartition("@")
    major, _, minor = capability.partition(".")
    return Properties(name, int(major), int(minor or 0), TOTAL_MEMORY)


class Device:
    """Memory, pinned host memory and streams of the one emulated device."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.allocations: dict[int, bytearray] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.freed_pinned: list[ctypes.Array] = []  # kept, poisoned: a use after free reads 0xFF
        self.streams: dict[int, list[Callable[[], None]]] = {0: []}  # 0: the default stream
        self.sticky: str | None = None
        self._next_address = DEVICE_BASE
        self._next_stream = 0x5000

    # --- state --------------------------------------------------------------------------
    def check_sticky(self) -> None:
        if self.sticky is not None:
            raise CudaFault(self.sticky, "a previous kernel or copy failed (sticky error)")

    # --- device memory -----------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        if nbytes < 0:
            raise CudaFault("cudaErrorInvalidValue", f"size {nbytes}")
        used = sum(len(block) for block in self.allocations.values())
        if used + nbytes > TOTAL_MEMORY:
            raise CudaFault("cudaErrorMemoryAllocation", f"{nbytes} bytes")
        address = self._next_address
        self._next_address += max(-(-nbytes // ALIGNMENT) * ALIGNMENT, ALIGNMENT)
        self.allocations[address] = bytearray([FILLER]) * nbytes
        return address

    def free(self, address: int) -> None:
        if address == 0:
            return  # cudaFree(NULL) is a no-op
        if address not in self.allocations:
            raise CudaFault("cudaErrorInvalidValue", f"{address:#x} is not an allocation's start")
        del self.allocations[address]

    def device_view(self, address: int, nbytes: int) -> memoryview:
        """`nbytes` of device memory at `address`, inside one live allocation."""
        for base, block in self.allocations.items():
            if base <= address and address + nbytes <= base + len(block):
                return memoryview(block)[address - base : address - base + nbytes]
        raise CudaFault(
            "cudaErrorIllegalAddress", f"{nbytes} bytes at {address:#x} are not device memory"
        )

    @staticmethod
    def is_device_address(address: int) -> bool:
        return address >= DEVICE_BASE

    # --- pinned host memory --------------------------------------------------------------
    def malloc_host(self, nbytes: int) -> int:
        if nbytes < 0:
            raise CudaFault("cudaErrorInvalidValue", f"size {nbytes}")
        block = (ctypes.c_ubyte * max(nbytes, 1))()
        address = ctypes.addressof(block)
        self.pinned[address] = block
        return address

    def free_host(self, address: int) -> None:
        if address not in self.pinned:
            raise CudaFault("cudaErrorInvalidValue", f"{address:#x} is not pinned host memory")
        block = self.pinned.pop(address)
        ctypes.memset(block, FILLER, len(block))
        self.freed_pinned.append(block)

    # --- streams -------------------------------------------------------------------------
    def stream_create(self) -> int:
        self._next_stream += 0x100
        self.streams[self._next_stream] = []
        return self._next_stream

    def queue(self, handle: int) -> list[Callable[[], None]]:
        if handle not in self.streams:
            raise CudaFault("cudaErrorInvalidResourceHandle", f"stream {handle:#x}")
        return self.streams[handle]

    def enqueue(self, handle: int, work: Callable[[], None]) -> None:
        self.queue(handle).append(work)

    def synchronize(self, handle: int) -> None:
        """Run the stream's queued work in order; a fault becomes the sticky error."""
        queue = self.queue(handle)
        while queue:
            work = queue.pop(0)
            try:
                work()
            except CudaFault as fault:
                self.sticky = fault.code
                queue.clear()
                raise

    def stream_destroy(self, handle: int) -> None:
        if handle == 0:
            raise CudaFault("cudaErrorInvalidResourceHandle", "the default stream")
        self.synchronize(handle)  # pending work completes before the stream is released
        del self.streams[handle]

    # --- copies --------------------------------------------------------------------------
    def copy_async(self, dst: int, src: int, nbytes: int, to_device: bool, stream: int) -> None:
        """Queue a host -> device (`to_device`) or device -> host copy on `stream`: the
        pointers are checked now, the bytes move when the stream is synchronized."""
        device, host = (dst, src) if to_device else (src, dst)
        if not self.is_device_address(device) or self.is_device_address(host):
            raise CudaFault("cudaErrorInvalidValue", "pointers do not match the copy's kind")
        self.device_view(device, nbytes)
        self.enqueue(stream, lambda: self._copy(dst, src, nbytes, to_device))

    def _copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        if to_device:
            self.device_view(dst, nbytes)[:] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.device_view(src, nbytes)), nbytes)


_DEVICE = Device()


def device() -> Device:
    return _DEVICE
