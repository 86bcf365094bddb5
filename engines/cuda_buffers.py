"""CUDA memory for the TensorRT runner: a stream, device buffers and page-locked host buffers.

Through cuda-python (`from cuda.bindings import runtime as cudart`, or `from cuda import
cudart` before cuda-bindings 12.6), whose calls return `(cudaError_t, value...)` tuples, or,
when only that is installed, pycuda (whose failures raise `pycuda.driver.Error`). Either is
imported on first use, never by importing this module; neither installed is a one-line
UserError. NVIDIA recommends cuda-python next to PyTorch (pycuda's own contexts conflict,
NVIDIA/TensorRT#4608); with pycuda the device's primary context is used.

    stream = Stream()
    pinned, device = PinnedBuffer(x.nbytes), DeviceBuffer(x.nbytes)
    staged = pinned.write(x)                 # numpy -> page-locked host memory
    device.copy_in(staged, stream)           # host -> device, asynchronous on `stream`
    back = pinned.view(x.shape, x.dtype)
    device.copy_out(back, stream)            # device -> host, asynchronous
    stream.synchronize()                     # now `back` holds the data

Buffers grow (`ensure`, by `grown_capacity`) or are reallocated (`resize`); either discards
their contents and invalidates numpy views of a pinned buffer, so take views after sizing.
Asynchronous copies read and write host memory until the stream is synchronized: keep the
host arrays alive and unchanged until then. `close()` frees (also on garbage collection).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Any

import numpy as np
from scan_deploy.engines.cuda_device import INSTALL_HINT

from scan_deploy.errors import UserError

# Allocation granularity: sizes are rounded up to a multiple of this (cudaMalloc aligns to 256).
ALIGNMENT = 256


def grown_capacity(capacity: int, needed: int) -> int:
    """The capacity a buffer of `capacity` bytes grows to for `needed` bytes: unchanged when it
    suffices, else `needed` rounded up to ALIGNMENT and at least doubled, so a run of growing
    requests reallocates O(log n) times."""
    if needed < 0:
        raise ValueError(f"needed bytes must be >= 0, got {needed}")
    if needed <= capacity:
        return capacity
    return max(-(-needed // ALIGNMENT) * ALIGNMENT, 2 * capacity)


def nbytes_of(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of a C-contiguous array (every dim must be known: >= 0)."""
    if any(int(d) < 0 for d in shape):
        raise UserError(f"tensor shape {tuple(shape)} has unknown dims")
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class _Cudart:
    """cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.htod = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.dtoh = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def check(self, result: Any, what: str) -> Any:
        """The value of a call returning `(err,)` or `(err, value)`; a UserError on failure."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise UserError(f"CUDA runtime: {what} failed ({name})")
        return values[0] if values else None

    def device_count(self) -> int:
        return self.check(self.cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = self.check(self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)")
        return int(ptr), int(ptr)

    def free(self, token: Any) -> None:
        self.check(self.cudart.cudaFree(token), "cudaFree")

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Any]:
        ptr = int(self.check(self.cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes)"))
        array = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))
        return array, ptr

    def free_host(self, token: Any) -> None:
        self.check(self.cudart.cudaFreeHost(token), "cudaFreeHost")

    def stream_create(self) -> tuple[int, Any]:
        stream = self.check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        return int(stream), stream

    def stream_synchronize(self, stream: Any) -> None:
        self.check(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        self.check(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def copy_htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.check(
            self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.htod, stream),
            "cudaMemcpyAsync (host to device)",
        )

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.check(
            self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.dtoh, stream),
            "cudaMemcpyAsync (device to host)",
        )


class _Pycuda:
    """pycuda's driver API, on the device's primary context."""

    name = "pycuda"

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self.driver.Error as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise UserError(f"CUDA driver (pycuda): {what} failed ({message})") from None

    def device_count(self) -> int:
        return self.call("cuDeviceGetCount", self.driver.Device.count)

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        allocation = self.call(f"mem_alloc({nbytes} bytes)", self.driver.mem_alloc, nbytes)
        return int(allocation), allocation

    def free(self, token: Any) -> None:
        self.call("free", token.free)

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Any]:
        array = self.call(
            f"pagelocked_empty({nbytes} bytes)", self.driver.pagelocked_empty, nbytes, np.uint8
        )
        return array, array

    def free_host(self, token: Any) -> None:
        self.call("free (page-locked)", token.base.free)

    def stream_create(self) -> tuple[int, Any]:
        stream = self.call("Stream", self.driver.Stream)
        return int(stream.handle), stream

    def stream_synchronize(self, stream: Any) -> None:
        self.call("Stream.synchronize", stream.synchronize)

    def stream_destroy(self, stream: Any) -> None:
        pass  # pycuda destroys the stream with the object

    def copy_htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.call("memcpy_htod_async", self.driver.memcpy_htod_async, dst, src, stream)

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.call("memcpy_dtoh_async", self.driver.memcpy_dtoh_async, dst, src, stream)


_API: Any = None
_API_LOCK = threading.Lock()


def cuda_api() -> Any:
    """The CUDA binding in use (cuda-python first, then pycuda), imported on first use."""
    global _API
    with _API_LOCK:
        if _API is None:
            _API = _load_api()
        return _API


def _load_api() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError:
            cudart = None
    if cudart is not None:
        return _Cudart(cudart)
    try:
        import pycuda.driver as driver
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    try:
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (pycuda >= 2021.1)
        except ImportError:
            import pycuda.autoinit  # noqa: F401
    except driver.Error as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"CUDA driver (pycuda): {message}") from None
    return _Pycuda(driver)


def cuda_unavailable() -> str | None:
    """Why CUDA buffers cannot be used here (no binding, no device), or None when they can."""
    try:
        api = cuda_api()
        if api.device_count() < 1:
            return "no CUDA device is visible"
    except UserError as exc:
        return str(exc)
    return None


class Stream:
    """A CUDA stream; `handle` is the integer TensorRT's `execute_async_v3` takes."""

    def __init__(self) -> None:
        self._api = cuda_api()
        self.handle, self._stream = self._api.stream_create()

    @property
    def native(self) -> Any:
        """The binding's own stream object (cudaStream_t or pycuda.driver.Stream)."""
        if self._stream is None:
            raise UserError("the CUDA stream is closed")
        return self._stream

    def synchronize(self) -> None:
        self._api.stream_synchronize(self.native)

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._api.stream_destroy(stream)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        _quietly(self.close)


class _Growable:
    """What both buffer kinds share: `capacity` bytes, reallocated by `resize`."""

    capacity: int

    def resize(self, nbytes: int) -> None:
        raise NotImplementedError

    def ensure(self, nbytes: int) -> bool:
        """Grow to hold `nbytes` (by `grown_capacity`); True when it was reallocated."""
        capacity = grown_capacity(self.capacity, nbytes)
        if capacity == self.capacity:
            return False
        self.resize(capacity)
        return True


class DeviceBuffer(_Growable):
    """Linear device memory of `capacity` bytes at `ptr` (0 while empty)."""

    def __init__(self, nbytes: int = 0) -> None:
        self._api = cuda_api()
        self.ptr = 0
        self.capacity = 0
        self._token: Any = None
        if nbytes:
            self.resize(nbytes)

    def resize(self, nbytes: int) -> None:
        """Reallocate to exactly `nbytes` (contents are not kept)."""
        self.close()
        if nbytes > 0:
            self.ptr, self._token = self._api.malloc(nbytes)
            self.capacity = nbytes

    def copy_in(self, host: np.ndarray, stream: Stream) -> None:
        """Host -> device: the bytes of `host` (C-contiguous; page-locked for the copy to be
        asynchronous) to the start of this buffer."""
        self._check(host)
        if host.nbytes:
            self._api.copy_htod(self.ptr, host, stream.native)

    def copy_out(self, host: np.ndarray, stream: Stream) -> None:
        """Device -> host: the first `host.nbytes` bytes of this buffer into `host`."""
        self._check(host)
        if host.nbytes:
            self._api.copy_dtoh(host, self.ptr, stream.native)

    def _check(self, host: np.ndarray) -> None:
        if not host.flags.c_contiguous:
            raise UserError("CUDA copy: the host array must be C-contiguous")
        if host.nbytes > self.capacity:
            raise UserError(
                f"CUDA copy: {host.nbytes} bytes do not fit a {self.capacity}-byte device buffer"
            )

    def close(self) -> None:
        if self._token is not None:
            token, self._token = self._token, None
            self.ptr, self.capacity = 0, 0
            self._api.free(token)

    def __del__(self) -> None:
        _quietly(self.close)


class PinnedBuffer(_Growable):
    """Page-locked host memory of `capacity` bytes; `array` is its uint8 numpy view."""

    def __init__(self, nbytes: int = 0) -> None:
        self._api = cuda_api()
        self.capacity = 0
        self.array = np.empty(0, np.uint8)
        self._token: Any = None
        if nbytes:
            self.resize(nbytes)

    def resize(self, nbytes: int) -> None:
        """Reallocate to exactly `nbytes` (contents are not kept; earlier views dangle)."""
        self.close()
        if nbytes > 0:
            self.array, self._token = self._api.malloc_host(nbytes)
            self.capacity = nbytes

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous `shape`/`dtype` array on the start of this buffer (valid until the
        next resize or close)."""
        nbytes = nbytes_of(tuple(shape), dtype)
        if nbytes > self.capacity:
            raise UserError(f"pinned buffer: {nbytes} bytes do not fit its {self.capacity} bytes")
        return self.array[:nbytes].view(np.dtype(dtype)).reshape(shape)

    def write(self, array: np.ndarray) -> np.ndarray:
        """Copy `array` into this buffer (growing it as needed); returns the pinned view."""
        array = np.asarray(array)
        self.ensure(array.nbytes)
        staged = self.view(array.shape, array.dtype)
        staged[...] = array
        return staged

    def close(self) -> None:
        if self._token is not None:
            token, self._token = self._token, None
            self.array, self.capacity = np.empty(0, np.uint8), 0
            self._api.free_host(token)

    def __del__(self) -> None:
        _quietly(self.close)


class TensorBuffer:
    """One tensor's pinned host and device buffers, grown together."""

    def __init__(self) -> None:
        self.host = PinnedBuffer()
        self.device = DeviceBuffer()

    def ensure(self, nbytes: int) -> None:
        self.host.ensure(nbytes)
        self.device.ensure(nbytes)

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """numpy -> pinned -> device (asynchronous: synchronize before reusing the buffer)."""
        self.ensure(array.nbytes)
        self.device.copy_in(self.host.write(array), stream)

    def download(self, shape: tuple[int, ...], dtype: Any, stream: Stream) -> np.ndarray:
        """device -> pinned; the returned pinned view holds the data once `stream` is
        synchronized, until the next transfer (copy it to keep it)."""
        view = self.host.view(shape, dtype)
        self.device.copy_out(view, stream)
        return view

    def close(self) -> None:
        self.device.close()
        self.host.close()


def _quietly(close: Any) -> None:
    """Free at garbage collection, when the interpreter may already be tearing CUDA down."""
    with contextlib.suppress(Exception):
        close()
