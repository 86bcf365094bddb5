"""Symmetric per-row int8, as an int8 gallery stores its arrays and the int8 scorer reads them.

Each row (the last axis) is scaled by `max|row| / 127` and rounded to q in [-127, 127], stored as
the uint8 code q + 128 (`INT8_ZERO_POINT`): the operand ONNX Runtime's u8s8 integer GEMM (VNNI's
vpdpbusd) takes without a conversion pass. An all-zero row has scale 0 and codes 128.
"""

from __future__ import annotations

import numpy as np

INT8_ZERO_POINT = 128  # the uint8 code of 0


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`x` (..., K) float32 → (codes uint8 (..., K), scale float32 (...))."""
    amax = np.abs(x).max(axis=-1)
    scale = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127)
    return (q + INT8_ZERO_POINT).astype(np.uint8), scale
