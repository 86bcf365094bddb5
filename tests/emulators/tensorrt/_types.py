"""`trt.Dims`, `trt.IHostMemory`, `trt.nptype`, `trt.volume`."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._enums import DataType

MAX_DIMS = 8  # nvinfer1::Dims::MAX_DIMS


class Dims:
    """`==` with tuples/lists, `len`, indexing (IndexError out of range), `str` "(1, 3)"; tuples and
    lists convert implicitly — F@v11.1:50-100, 233-255. `Dims.invalid()` is Dims{-1} (an unknown
    name): its `len()` is -1, which Python refuses with ValueError — S11:299-300, RT3:2551-2561."""

    def __init__(self, shape: Iterable[Any] = ()) -> None:
        self._dims = tuple(_dim(d) for d in shape)
        self.nbDims = len(self._dims)

    @classmethod
    def invalid(cls) -> Dims:
        dims = cls()
        dims.nbDims = -1
        return dims

    def __len__(self) -> int:
        return self.nbDims

    def __getitem__(self, index: int) -> int:
        if self.nbDims < 0:
            raise IndexError("Out of bounds")
        size = self.nbDims
        index = operator.index(index)
        if not -size <= index < size:
            raise IndexError("Out of bounds")
        return self._dims[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dims):
            return (self.nbDims, self._dims) == (other.nbDims, other._dims)
        if isinstance(other, tuple | list):
            return self.nbDims >= 0 and self._dims == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._dims)

    def __str__(self) -> str:
        return "(" + ", ".join(str(d) for d in self._dims) + ("," if self.nbDims == 1 else "") + ")"

    __repr__ = __str__

    def as_tuple(self) -> tuple[int, ...]:
        return self._dims


def _dim(value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        message = f"incompatible function arguments: dims must be integers, got {value!r}"
        raise TypeError(message) from None


def to_dims(shape: Any) -> Dims:
    """A Dims argument: Dims, tuple or list; more than MAX_DIMS is a RuntimeError (C3:142-160)."""
    if isinstance(shape, Dims):
        dims = shape
    elif isinstance(shape, tuple | list):
        dims = Dims(shape)
    else:
        raise TypeError(f"incompatible function arguments: expected Dims, tuple or list: {shape!r}")
    if dims.nbDims > MAX_DIMS:
        raise RuntimeError(f"Dims can hold at most {MAX_DIMS} dimensions, got {dims.nbDims}")
    return dims


class IHostMemory:
    """A serialized engine or timing cache. The real one exports the buffer protocol (`bytes(x)`,
    `memoryview(x)`, `.nbytes`) — C11:1798-1817; a pure-Python class cannot before Python 3.12, so
    only `bytes(x)` (here `__bytes__`) and `nbytes` work."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def nbytes(self) -> int:
        return len(self._data)

    @property
    def dtype(self) -> Any:
        return DataType.UINT8

    def __bytes__(self) -> bytes:
        return self._data


def buffer_bytes(value: Any, where: str) -> bytes:
    """The bytes of a buffer argument (bytes, bytearray, memoryview, ndarray, IHostMemory); None
    or anything else is pybind's TypeError (github.com/NVIDIA/TensorRT/issues/2362)."""
    if isinstance(value, IHostMemory):
        return bytes(value)
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(
            f"{where}(): incompatible function arguments. The following argument types are "
            f"supported: 1. (self, serialized_engine: buffer). Invoked with: {value!r}"
        ) from None


_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def nptype(trt_type: Any) -> type:
    """float32/16, int8/32/64, bool_, uint8; otherwise TypeError — INIT@v11.1:157-224."""
    try:
        return _NUMPY[DataType(trt_type).name]
    except (KeyError, ValueError):
        raise TypeError(
            "Could not resolve TensorRT datatype to an equivalent numpy datatype."
        ) from None


def volume(iterable: Iterable[int]) -> int:
    """The product of the dims — INIT@v11.1:157-224."""
    result = 1
    for d in iterable:
        result *= d
    return result
