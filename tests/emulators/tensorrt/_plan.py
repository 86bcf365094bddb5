"""The emulated serialized engine ("plan") and timing cache: a magic tag, a JSON header, and (for
a plan) the ONNX graph it was built from, which ONNX Runtime runs."""

from __future__ import annotations

import json
import struct
from typing import Any

PLAN_MAGIC = b"TRT-EMULATED-PLAN\x00"
CACHE_MAGIC = b"TRT-EMULATED-TIMING-CACHE\x00"


def write(magic: bytes, header: dict[str, Any], payload: bytes = b"") -> bytes:
    text = json.dumps(header, sort_keys=True).encode()
    return magic + struct.pack("<I", len(text)) + text + payload


def read(magic: bytes, data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, payload), or None when `data` is not of this kind or is truncated."""
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        return None
    (size,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    if len(data) < start + size:
        return None
    try:
        header = json.loads(data[start : start + size])
    except ValueError:
        return None
    return (header, data[start + size :]) if isinstance(header, dict) else None
