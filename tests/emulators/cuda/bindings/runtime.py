"""Emulated `cuda.bindings.runtime` (cuda-python's CUDA runtime API): a test double over the host
memory of `emulated_device`, never shipped and never a measurement.

Only the calls scan-deploy makes (`engines/cuda_buffers.py`, `engines/cuda_device.py`). As in
cuda-python, every call returns a tuple `(cudaError_t, *results)` and never raises; a failed call
returns `(err, None)` for its result. Sources (cuda-python as NVIDIA's samples use it):
S11 = NVIDIA/TensorRT `samples/python/common_runtime.py`@v11.1 (42-67, 139, 180, 241,
445-452), S3 = the same file @v10.3.0 (35-40, 48-52, 96, 149-156); signatures: cuda-python's
runtime API reference, nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from emulated_device import CudaFault, device, properties


class cudaError_t(enum.IntEnum):  # noqa: N801  (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:  # noqa: N801
    """A stream handle: `int(stream)` / `getPtr()` give the raw handle (S11:445-452; cuda-python
    tips_and_tricks: int() of a handle)."""

    def __init__(self, init_value: int = 0) -> None:
        self._handle = int(init_value)

    def getPtr(self) -> int:  # noqa: N802
        return self._handle

    def __int__(self) -> int:
        return self._handle

    def __repr__(self) -> str:
        return f"<cudaStream_t {self._handle:#x}>"


class cudaDeviceProp:  # noqa: N801
    """`name` is the NUL-padded char[256] as bytes, as cuda-python returns it."""

    def __init__(self) -> None:
        found = properties()
        self.name = found.name.encode().ljust(256, b"\x00")
        self.major = found.major
        self.minor = found.minor
        self.totalGlobalMem = found.total_memory


def _call(work: Callable[[], Any], has_result: bool = True) -> tuple:
    """`(cudaSuccess, result)` or `(cudaSuccess,)`; a fault (or an earlier sticky one) gives
    `(err, None)` / `(err,)` as cuda-python does."""
    state = device()
    try:
        with state.lock:
            state.check_sticky()
            result = work()
    except CudaFault as fault:
        return (cudaError_t[fault.code], None) if has_result else (cudaError_t[fault.code],)
    return (cudaError_t.cudaSuccess, result) if has_result else (cudaError_t.cudaSuccess,)


def _stream(stream: Any) -> int:
    """A stream argument: a cudaStream_t or its integer handle (0: the default stream)."""
    return int(stream) if stream is not None else 0


def cudaGetDeviceCount() -> tuple:  # noqa: N802
    """-> (err, 1): one emulated device."""
    return _call(lambda: 1)


def cudaGetDevice() -> tuple:  # noqa: N802
    return _call(lambda: 0)


def cudaGetDeviceProperties(index: int) -> tuple:  # noqa: N802
    def work() -> cudaDeviceProp:
        if index != 0:
            raise CudaFault("cudaErrorInvalidDevice", f"device {index}")
        return cudaDeviceProp()

    return _call(work)


def cudaMalloc(size: int) -> tuple:  # noqa: N802
    """-> (err, int device pointer), 256-byte aligned, contents 0xFF (S11:42-67)."""
    return _call(lambda: device().malloc(int(size)))


def cudaFree(ptr: int) -> tuple:  # noqa: N802
    """(S11:42-67, HostDeviceMem.free)"""
    return _call(lambda: device().free(int(ptr)), has_result=False)


def cudaMallocHost(size: int) -> tuple:  # noqa: N802
    """-> (err, int host pointer) to page-locked memory (S11:42-67)."""
    return _call(lambda: device().malloc_host(int(size)))


def cudaFreeHost(ptr: int) -> tuple:  # noqa: N802
    return _call(lambda: device().free_host(int(ptr)), has_result=False)


def cudaStreamCreate() -> tuple:  # noqa: N802
    """-> (err, cudaStream_t) (S11:445-452)."""
    return _call(lambda: cudaStream_t(device().stream_create()))


def cudaStreamSynchronize(stream: Any) -> tuple:  # noqa: N802
    """Runs the work queued on `stream` (S11:139, 180)."""
    return _call(lambda: device().synchronize(_stream(stream)), has_result=False)


def cudaStreamDestroy(stream: Any) -> tuple:  # noqa: N802
    """(S11:445-452, free_buffers)"""
    return _call(lambda: device().stream_destroy(_stream(stream)), has_result=False)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:  # noqa: N802
    """Host <-> device copies on `stream`, run when it is synchronized (S11:139, 180, 241)."""

    def work() -> None:
        direction = cudaMemcpyKind(int(kind))
        if direction not in (
            cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudaMemcpyKind.cudaMemcpyDeviceToHost,
        ):
            raise CudaFault("cudaErrorInvalidValue", f"{direction.name} is not emulated")
        to_device = direction == cudaMemcpyKind.cudaMemcpyHostToDevice
        device().copy_async(int(dst), int(src), int(count), to_device, _stream(stream))

    return _call(work, has_result=False)
