"""Test helper: write checkpoints in torch's legacy (pre-zip) layout, as torch 0.3/0.4 did under
Python 3 or Python 2, byte for byte, without needing either.

Layout (torch/serialization.py `_legacy_save`): pickled magic number, pickled protocol version,
pickled sys_info, the main pickle (storages as persistent ids), the pickled sorted list of storage
keys, then per storage an int64 element count and its raw little-endian bytes.

Python 2 flavour: `str` is a byte string (SHORT_BINSTRING, or BINSTRING over 255 bytes), an `int`
over 32 bits is a text INT opcode, OrderedDict reduces to `OrderedDict([[k, v], ...])`, and global
module names are the Python 2 ones (`copy_reg`, `__builtin__`, which the protocol 2 pickler of
Python 3 maps back by itself).
"""

from __future__ import annotations

import argparse
import copyreg
import io
import pickle
import pickletools
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 8},
}
STORAGE_NAMES = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage"}


@dataclass(frozen=True)
class LegacyStyle:
    """How a legacy file was written.

    python2: Python 2.7 pickling (see the module docstring).
    rebuild: "v1" = torch 0.3 `_rebuild_tensor(storage, offset, size, stride)`, "v2" = torch >= 0.4
        `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)`.
    namespace: "newobj" (protocol 2 `copy_reg.__newobj__`) or "reconstructor" (protocol 0/1
        `copy_reg._reconstructor(Namespace, object, None)`).
    storage: "separate" = one storage per tensor; "shared" = all tensors in one storage at
        offsets (cuDNN's flattened GRU weights); "views" = 0.3 storage views of one root storage.
    cuda: storages typed `torch.cuda.FloatStorage` at location 'cuda:0' (a GPU-trained model).
    """

    python2: bool = False
    rebuild: Literal["v1", "v2"] = "v2"
    namespace: Literal["newobj", "reconstructor"] = "newobj"
    storage: Literal["separate", "shared", "views"] = "separate"
    cuda: bool = False


@dataclass(frozen=True)
class _GlobalRef:
    """Pickled as a bare GLOBAL opcode (e.g. `torch.cuda.FloatStorage` without importing it)."""

    module: str
    name: str


@dataclass(frozen=True, eq=False)
class _StorageRef:
    key: str
    view: tuple[str, int, int] | None = None


class _Storages:
    """The root storages of a checkpoint's tensors, as flat tensors, laid out as `style` says."""

    def __init__(self, style: LegacyStyle, tensors: list[torch.Tensor]) -> None:
        self.roots: dict[str, torch.Tensor] = {}
        self.placement: dict[int, tuple[_StorageRef, int]] = {}  # id(tensor) -> storage, offset
        flats = [t.detach().contiguous().reshape(-1) for t in tensors]
        if style.storage == "separate":
            for index, (tensor, flat) in enumerate(zip(tensors, flats, strict=True)):
                self.roots[_key(index)] = flat
                self.placement[id(tensor)] = (_StorageRef(_key(index)), 0)
            return
        if flats:
            self.roots[_key(0)] = torch.cat(flats)
        offset = 0
        for tensor, flat in zip(tensors, flats, strict=True):
            if style.storage == "shared":
                self.placement[id(tensor)] = (_StorageRef(_key(0)), offset)
            else:
                view = (f"{_key(0)}.{offset}", offset, flat.numel())
                self.placement[id(tensor)] = (_StorageRef(_key(0), view), 0)
            offset += flat.numel()


def _key(index: int) -> str:
    """Like torch's keys, `str(storage._cdata)`: an address."""
    return str(94_000_000 + 4096 * index)


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    return []


class _LegacyPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch can be overridden
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, style: LegacyStyle, storages: _Storages) -> None:
        super().__init__(file, protocol=2)
        self.style = style
        self.storages = storages

    def persistent_id(self, obj: Any) -> tuple | None:
        if not isinstance(obj, _StorageRef):
            return None
        root = self.storages.roots[obj.key]
        module = "torch.cuda" if self.style.cuda else "torch"
        storage_type = _GlobalRef(module, STORAGE_NAMES[root.dtype])
        location = "cuda:0" if self.style.cuda else "cpu"
        return ("storage", storage_type, obj.key, location, root.numel(), obj.view)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._reduce_tensor(obj)
        if self.style.python2 and type(obj) is OrderedDict:
            return OrderedDict, ([[k, v] for k, v in obj.items()],)
        if self.style.namespace == "reconstructor" and type(obj) is argparse.Namespace:
            return copyreg._reconstructor, (argparse.Namespace, object, None), vars(obj)
        return NotImplemented

    def _reduce_tensor(self, tensor: torch.Tensor) -> tuple:
        storage, offset = self.storages.placement[id(tensor)]
        size, stride = tuple(tensor.shape), tuple(tensor.contiguous().stride())
        if self.style.rebuild == "v1":
            return torch._utils._rebuild_tensor, (storage, offset, size, stride)
        hooks: OrderedDict = OrderedDict()
        return torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, hooks)

    def save_global_ref(self, obj: _GlobalRef) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))

    dispatch[_GlobalRef] = save_global_ref

    def save_str(self, obj: str) -> None:
        if not self.style.python2:
            super().save_str(obj)
            return
        data = obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_str

    def save_long(self, obj: int) -> None:
        if self.style.python2 and not -(2**31) <= obj < 2**31 and abs(obj) < 2**63:
            self.write(pickle.INT + repr(obj).encode("ascii") + b"\n")  # a Python 2 `int`
            return
        super().save_long(obj)

    dispatch[int] = save_long


def legacy_checkpoint_bytes(obj: Any, style: LegacyStyle) -> bytes:
    """`obj` as torch's legacy `torch.save` wrote it."""
    out = io.BytesIO()
    storages = _Storages(style, _tensors_in(obj))
    for part in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO, obj):
        _LegacyPickler(out, style, storages).dump(part)
    keys = sorted(storages.roots)
    _LegacyPickler(out, style, storages).dump(keys)
    for key in keys:
        flat = storages.roots[key]
        out.write(struct.pack("<q", flat.numel()))
        out.write(flat.view(torch.uint8).numpy().tobytes())
    return out.getvalue()


def write_legacy_checkpoint(path: Path, obj: Any, style: LegacyStyle) -> Path:
    path.write_bytes(legacy_checkpoint_bytes(obj, style))
    return path


def pickled_parts(data: bytes, count: int = 5) -> list[bytes]:
    """The first `count` pickles of a legacy file (magic ... storage keys), each up to its STOP."""
    stream = io.BytesIO(data)
    parts = []
    for _ in range(count):
        start = stream.tell()
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name == "STOP":
                break
        parts.append(data[start : stream.tell()])
    return parts


def create_marker(path: str) -> None:
    """What a malicious pickle calls in the tests: proof of code execution if the file appears."""
    Path(path).write_text("pickled code ran")


@dataclass
class Malicious:
    """Pickles to a call of `target(*args)`, as a hostile checkpoint would."""

    target: Any
    args: tuple

    def __reduce__(self) -> tuple:
        return self.target, self.args
