"""Read original SCAN checkpoints (`model_best.pth.tar`) without running any pickled code.

The original `train.py` saves `{'model': [img_enc.state_dict(), txt_enc.state_dict()], 'opt': opt,
'epoch': ..., 'best_rsum': ..., 'Eiters': ...}` with `torch.save`, `opt` being an
`argparse.Namespace`. Such files come in two layouts and three eras:

* zip (torch >= 1.6): loaded by `torch.load(weights_only=True)`, torch's restricted unpickler,
  with `argparse.Namespace` added to its allow-list by `torch.serialization.safe_globals`
  (torch >= 2.5; its refusals are reworded to name the global, like ours).
* legacy (torch 0.3 to 1.5), written by Python 3 or by Python 2 (the original SCAN ran on Python
  2.7 + torch 0.3): magic number, protocol version, sys_info, the main pickle, the list of storage
  keys, then each storage as an int64 element count and its little-endian bytes. We parse this
  layout here with `_LegacyUnpickler`, not with torch's weights-only unpickler, because that one
  lacks opcodes a Python 2 pickle uses (BINSTRING for a `str` over 255 bytes, INT for an `int`
  over 32 bits) and would need the generic `copyreg._reconstructor` allow-listed to rebuild a
  Namespace pickled the protocol 0/1 way.

`_LegacyUnpickler` is a `pickle.Unpickler` whose `find_class` answers only from `_ALLOWED_GLOBALS`
(the tensor rebuild functions, wrapped to accept only our own storages; storage types, mapped to
dtypes; OrderedDict, set, frozenset; argparse.Namespace; a Namespace-only `copyreg._reconstructor`
and a latin1-only `_codecs.encode` for Python 3 bytes). Every callable that REDUCE, NEWOBJ or
BUILD can reach is obtained through `find_class`, so nothing else can be called. Python 2 `str`
values are decoded as latin1, as `torch.load(encoding='latin1')` does (a non-ASCII UTF-8 path in
a training option comes out garbled; the model options are ASCII).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import struct
import typing
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch

from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError, input_error

ALLOWED = "only tensors, containers and argparse.Namespace are allowed"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
ZIP_MAGIC = b"PK\x03\x04"

# Low-level exceptions a truncated or corrupted file can raise while it is parsed.
_CORRUPTION = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,
    struct.error,
    OverflowError,
    RecursionError,
)


@dataclass
class OriginalCheckpoint:
    """The content of an original SCAN checkpoint, weights not yet checked against the options."""

    options: dict[str, Any]
    image_state: dict[str, torch.Tensor]
    text_state: dict[str, torch.Tensor]
    epoch: int | None
    best_rsum: float | None
    eiters: int | None


def load_original_checkpoint(path: str | Path) -> OriginalCheckpoint:
    """Read an original SCAN `.pth.tar` of any era; raise a one-line UserError if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, None, "file not found, expected an original SCAN checkpoint")
    try:
        with path.open("rb") as f:
            is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError as exc:
        raise input_error(path, None, f"cannot read the file ({exc.strerror})") from None
    content = _load_zip(path) if is_zip else _load_legacy(path)
    return _parse_checkpoint(content, path)


def config_from_options(options: dict[str, Any], source: str | Path | None) -> ModelConfig:
    """Build the model config from a checkpoint's options, ignoring the training-only ones.

    Options that old Namespaces lack (e.g. `precomp_enc_type`, `bi_gru`) take ModelConfig's
    defaults; values of another type (bytes, 1024.0, 0/1 for a flag) are converted when that is
    unambiguous, otherwise ModelConfig reports the field.
    """
    types = typing.get_type_hints(ModelConfig)
    data = {
        f.name: _coerce(options[f.name], types[f.name])
        for f in fields(ModelConfig)
        if f.name in options
    }
    return ModelConfig.from_dict(data, source=source)


# --- zip layout -------------------------------------------------------------------------------


def _allow_namespace() -> contextlib.AbstractContextManager:
    """safe_globals removes on exit what it was given, even if the caller had allowed it before."""
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return contextlib.nullcontext()
    return torch.serialization.safe_globals([argparse.Namespace])


def _load_zip(path: Path) -> Any:
    try:
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _zip_refusal(path, exc) from None
    except (*_CORRUPTION, OSError) as exc:
        raise _corrupted(path, exc) from None


def _zip_refusal(path: Path, exc: pickle.UnpicklingError) -> UserError:
    """Name the global torch's weights-only unpickler refused, as the legacy path does."""
    try:
        with _allow_namespace():
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (*_CORRUPTION, OSError):
        refused = []
    if refused:
        return input_error(path, "pickle", f"refuses global {refused[0]!r} ({ALLOWED})")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch puts the reason between a preamble line and a pointer to its documentation.
    detail = lines[1] if len(lines) >= 3 else (lines or [type(exc).__name__])[-1]
    return input_error(path, "pickle", f"refused by torch's weights-only loader: {detail}")


# --- legacy layout ----------------------------------------------------------------------------


class _Refused(Exception):
    """A global or persistent object outside the allow-list."""


class _Malformed(Exception):
    """A structural inconsistency of the legacy layout that pickle itself does not detect."""


@dataclass(frozen=True)
class _StorageType:
    """What `find_class` returns for `torch.FloatStorage` and friends: only the dtype matters."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage (or a view of one) as a flat tensor; its bytes are filled after the pickle."""

    flat: torch.Tensor


def _rebuild_tensor(
    storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> torch.Tensor:
    """torch 0.3's `torch._utils._rebuild_tensor`, restricted to our storages."""
    if not isinstance(storage, _Storage):
        raise _Malformed(f"a tensor must be rebuilt from a storage, got {type(storage).__name__}")
    offset = storage.flat.storage_offset() + storage_offset
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_tensor_v2(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_training_state: Any,
) -> torch.Tensor:
    """torch >= 0.4's version; requires_grad, backward hooks and metadata are dropped."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _reconstruct_namespace(cls: type, base: type, state: Any) -> argparse.Namespace:
    """`copyreg._reconstructor` (protocol 0/1 objects), for argparse.Namespace only."""
    if cls is not argparse.Namespace or base is not object or state is not None:
        raise _Refused(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    return argparse.Namespace()


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """`_codecs.encode`, which Python 3 protocol 2 pickles use for bytes; latin1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("argparse", "Namespace"): argparse.Namespace,
    ("copyreg", "_reconstructor"): _reconstruct_namespace,
    ("_codecs", "encode"): _latin1_bytes,
    **{
        (module, name): _StorageType(dtype)
        for module in ("torch", "torch.cuda")
        for name, dtype in _STORAGE_DTYPES.items()
    },
}


class _StorageTable:
    """The storages a legacy pickle refers to, allocated on first reference, filled at the end."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.roots: dict[str, torch.Tensor] = {}

    def resolve(self, pid: Any) -> _Storage:
        """persistent_load: `('storage', type, root_key, location, numel, view_metadata)`."""
        kind = pid[0] if isinstance(pid, tuple) and pid else pid
        if kind != "storage":
            raise _Refused(f"persistent object {str(kind)[:40]!r}")
        if len(pid) != 6:
            raise _Malformed(f"storage reference of {len(pid)} fields, expected 6")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise _Malformed(f"storage type {storage_type!r} is not a torch storage class")
        root = self._root(str(key), storage_type.dtype, numel)
        if view is None:
            return _Storage(root)
        _view_key, offset, size = view
        if not 0 <= offset <= offset + size <= root.numel():
            raise _Malformed(f"storage view [{offset}, {offset + size}) outside its root storage")
        return _Storage(root[offset : offset + size])

    def _root(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key in self.roots:
            root = self.roots[key]
            if root.dtype != dtype or root.numel() != numel:
                raise _Malformed(f"storage {key!r} referenced with two types or sizes")
            return root
        element_size = torch.empty((), dtype=dtype).element_size()
        if not isinstance(numel, int) or not 0 <= numel * element_size <= self.max_bytes:
            raise _Malformed(f"storage {key!r} of {numel!r} elements does not fit in the file")
        root = torch.empty(numel, dtype=dtype)
        self.roots[key] = root
        return root

    def fill(self, f: IO[bytes], keys: list[str]) -> None:
        """Read each storage's `int64 numel` + raw bytes, in the order of the pickled key list."""
        for key in keys:
            root = self.roots.get(key)
            if root is None:
                raise _Malformed(f"storage {key!r} has data but no tensor refers to it")
            (numel,) = struct.unpack("<q", _read_exact(f, 8))
            if numel != root.numel():
                raise _Malformed(f"storage {key!r} holds {numel} elements, expected {root.numel()}")
            data = _read_exact(f, numel * root.element_size())
            if data:
                root.view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        missing = sorted(set(self.roots) - set(keys))
        if missing:
            raise _Malformed(f"storage {missing[0]!r} has no data")


def _read_exact(f: IO[bytes], size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"file ends {size - len(data)} bytes early")
    return data


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f: IO[bytes], storages: _StorageTable) -> None:
        super().__init__(f, encoding="latin1")
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"global '{module}.{name}'") from None

    def persistent_load(self, pid: Any) -> _Storage:
        return self._storages.resolve(pid)


def _load_legacy(path: Path) -> Any:
    storages = _StorageTable(max_bytes=path.stat().st_size)
    with path.open("rb") as f:

        def unpickle() -> Any:
            return _LegacyUnpickler(f, storages).load()

        try:
            magic = unpickle()
        except _Refused as exc:
            raise input_error(path, "pickle", f"refuses {exc} ({ALLOWED})") from None
        except (*_CORRUPTION, _Malformed):
            magic = None
        if magic != LEGACY_MAGIC_NUMBER:
            raise input_error(
                path, None, "not a PyTorch checkpoint (neither a zip archive nor the legacy format)"
            )
        try:
            return _read_legacy_body(f, unpickle, storages)
        except _Refused as exc:
            raise input_error(path, "pickle", f"refuses {exc} ({ALLOWED})") from None
        except (*_CORRUPTION, _Malformed) as exc:
            raise _corrupted(path, exc) from None


def _read_legacy_body(f: IO[bytes], unpickle: Callable[[], Any], storages: _StorageTable) -> Any:
    """What follows the magic number: protocol, sys_info, main pickle, storage keys, storages."""
    protocol = unpickle()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise _Malformed(f"protocol version {protocol!r}, expected {LEGACY_PROTOCOL_VERSION}")
    unpickle()  # sys_info: storage bytes are little-endian whatever it says
    content = unpickle()
    keys = unpickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Malformed("the storage key list is not a list of strings")
    storages.fill(f, keys)
    return content


def _corrupted(path: Path, exc: BaseException) -> UserError:
    """Keep the first sentence of the low-level message: torch's go on with advice."""
    detail = str(exc).split(". ")[0].split("\n")[0][:200] or type(exc).__name__
    return input_error(path, None, f"truncated or corrupted checkpoint ({detail})")


# --- structure --------------------------------------------------------------------------------


def _parse_checkpoint(content: Any, path: Path) -> OriginalCheckpoint:
    if not isinstance(content, dict):
        raise input_error(
            path,
            None,
            f"not a SCAN checkpoint: expected a dict with 'model' and 'opt', "
            f"got {type(content).__name__}",
        )
    content = {_text(k): v for k, v in content.items()}
    if "model" not in content:
        raise input_error(path, "model", "missing, expected [image state dict, text state dict]")
    model = content["model"]
    if not isinstance(model, (list, tuple)) or len(model) != 2:
        raise input_error(
            path,
            "model",
            f"expected [image state dict, text state dict], got {_describe(model)}",
        )
    if "opt" not in content:
        raise input_error(path, "opt", "missing, expected the training options (a Namespace)")
    return OriginalCheckpoint(
        options=_options(content["opt"], path),
        image_state=_state_dict(model[0], path, "model[0]"),
        text_state=_state_dict(model[1], path, "model[1]"),
        epoch=_optional_number(content.get("epoch"), int, path, "epoch"),
        best_rsum=_optional_number(content.get("best_rsum"), float, path, "best_rsum"),
        eiters=_optional_number(content.get("Eiters"), int, path, "Eiters"),
    )


def _state_dict(value: Any, path: Path, field: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict):
        raise input_error(path, field, f"expected a state dict, got {_describe(value)}")
    state = {}
    for key, tensor in value.items():
        name = _text(key)
        if not isinstance(name, str):
            raise input_error(path, field, f"expected parameter names, got key {key!r}")
        if not isinstance(tensor, torch.Tensor):
            got = _describe(tensor)
            raise input_error(path, f"{field}.{name}", f"expected a tensor, got {got}")
        state[name] = tensor
    return state


def _options(opt: Any, path: Path) -> dict[str, Any]:
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, dict):
        raise input_error(path, "opt", f"expected an argparse.Namespace, got {_describe(opt)}")
    return {_text(k): _text(v) for k, v in opt.items()}


def _optional_number(value: Any, kind: type, path: Path, field: str) -> Any:
    """Training metadata: a Python number, or a one-element tensor in some forks."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        expected = "an integer" if kind is int else "a number"
        raise input_error(path, field, f"expected {expected}, got {_describe(value)}")
    return kind(value)


def _text(value: Any) -> Any:
    """Bytes (a Python 3 `bytes` option or key) decoded as latin1, as Python 2 `str` values are."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _coerce(value: Any, kind: type) -> Any:
    """Convert `value` to `kind` when unambiguous; otherwise return it for ModelConfig to report."""
    value = _text(value)
    if kind is bool:
        return _to_bool(value)
    if isinstance(value, (bool, kind)):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float) and isinstance(value, (str, int)):
        try:
            return kind(value)
        except ValueError:
            return value
    return value


def _to_bool(value: Any) -> Any:
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return value
