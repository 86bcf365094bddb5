"""CUDA buffers: growth arithmetic everywhere; round trips (numpy -> pinned -> device -> pinned ->
numpy, with resizes) on the emulated cuda-python of the TensorRT API emulator, and on a real
device where cuda-python or pycuda and a CUDA device are present (else skipped with the reason)."""

import numpy as np
import pytest
from scan_deploy.engines import cuda_buffers
from scan_deploy.engines.cuda_buffers import (
    ALIGNMENT,
    DeviceBuffer,
    PinnedBuffer,
    Stream,
    TensorBuffer,
    grown_capacity,
    nbytes_of,
)

from scan_deploy.errors import UserError

from ..runtime.tensorrt_emulator import emulated_tensorrt


def test_grown_capacity():
    assert grown_capacity(0, 0) == 0
    assert grown_capacity(0, 1) == ALIGNMENT
    assert grown_capacity(0, 257) == 2 * ALIGNMENT
    assert grown_capacity(1024, 1024) == 1024  # fits: unchanged
    assert grown_capacity(1024, 10) == 1024  # never shrinks
    assert grown_capacity(1024, 1025) == 2048  # at least doubles
    assert grown_capacity(1024, 5000) == 5120  # or the request, aligned
    with pytest.raises(ValueError):
        grown_capacity(0, -1)


def test_nbytes_of():
    assert nbytes_of((3, 5, 8), np.float32) == 480
    assert nbytes_of((), np.int64) == 8
    with pytest.raises(UserError, match="unknown dims"):
        nbytes_of((-1, 3), np.float32)


@pytest.fixture(params=["device", "emulated"])
def cuda(request):
    """The CUDA binding of this machine (skipped without one), and the emulated cuda-python of
    the TensorRT API emulator (a test double: copies run when the stream is synchronized)."""
    if request.param == "emulated":
        with emulated_tensorrt():
            yield cuda_buffers.cuda_api()
        return
    reason = cuda_buffers.cuda_unavailable()
    if reason is not None:
        pytest.skip(f"no CUDA buffers here: {reason}")
    yield cuda_buffers.cuda_api()


def test_round_trip_with_resize(cuda):
    rng = np.random.default_rng(0)
    with Stream() as stream:
        assert isinstance(stream.handle, int) and stream.handle != 0
        first = rng.random((7, 13), dtype=np.float32)
        pinned, device = PinnedBuffer(first.nbytes), DeviceBuffer(first.nbytes)
        assert (pinned.capacity, device.capacity) == (first.nbytes, first.nbytes)
        assert device.ptr != 0
        device.copy_in(pinned.write(first), stream)
        stream.synchronize()
        pinned.array[:] = 0  # what comes back must come from the device
        back = pinned.view(first.shape, first.dtype)
        device.copy_out(back, stream)
        stream.synchronize()
        np.testing.assert_array_equal(back, first)

        # Grow both (a new allocation each) and move a larger array of another dtype.
        second = rng.integers(-(2**40), 2**40, size=(64, 33), dtype=np.int64)
        assert device.ensure(second.nbytes) and pinned.ensure(second.nbytes)
        assert device.capacity >= second.nbytes and pinned.capacity >= second.nbytes
        assert not device.ensure(second.nbytes)  # large enough: kept
        device.copy_in(pinned.write(second), stream)
        stream.synchronize()
        pinned.array[:] = 0
        back = pinned.view(second.shape, second.dtype)
        device.copy_out(back, stream)
        stream.synchronize()
        np.testing.assert_array_equal(back, second)

        # An exact resize down, then a partial copy into the start of a larger buffer.
        device.resize(first.nbytes)
        assert device.capacity == first.nbytes
        with pytest.raises(UserError, match="do not fit"):
            device.copy_in(pinned.view(second.shape, second.dtype), stream)
        device.copy_in(pinned.write(first), stream)
        stream.synchronize()  # the copy reads the pinned memory until then
        out = pinned.view(first.shape, first.dtype)
        out[...] = 0
        device.copy_out(out, stream)
        stream.synchronize()
        np.testing.assert_array_equal(out, first)
        device.close()
        pinned.close()
        assert (device.ptr, device.capacity, pinned.capacity) == (0, 0, 0)


def test_tensor_buffers_on_two_streams(cuda):
    """Two tensors' buffers moving different data at once, grown by successive requests."""
    rng = np.random.default_rng(1)
    streams = [Stream(), Stream()]
    buffers = [TensorBuffer(), TensorBuffer()]
    for size in (1, 100, 3000, 40):
        arrays = [rng.random((size, 3), dtype=np.float32) for _ in buffers]
        for buffer, array, stream in zip(buffers, arrays, streams, strict=True):
            buffer.upload(array, stream)
        views = []
        for buffer, array, stream in zip(buffers, arrays, streams, strict=True):
            stream.synchronize()  # the upload is done: the pinned memory may be reused
            buffer.host.array[:] = 0
            views.append(buffer.download(array.shape, array.dtype, stream))
        for view, array, stream in zip(views, arrays, streams, strict=True):
            stream.synchronize()
            np.testing.assert_array_equal(view, array)
    assert buffers[0].device.capacity >= 3000 * 3 * 4
    for buffer in buffers:
        buffer.close()
    for stream in streams:
        stream.close()
    with pytest.raises(UserError, match="the CUDA stream is closed"):
        streams[0].synchronize()


def test_zero_sized_arrays_copy_nothing(cuda):
    with Stream() as stream:
        device = DeviceBuffer()
        assert device.ptr == 0
        empty = np.empty((0, 4), np.float32)
        device.copy_in(empty, stream)
        device.copy_out(empty, stream)
        stream.synchronize()
