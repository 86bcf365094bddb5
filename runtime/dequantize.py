"""Stored gallery arrays (float16 / int8 with per-row scales) to the float32 the scorer takes.

numpy's float16 → float32 cast runs at ~0.5 G elements/s on the 2-core Zen 4 CPU (it does not
use F16C); ONNX Runtime's Cast kernel does the same exact conversion 5× faster (2.4 G elements/s
on one thread: 4 vs 20 ms per 256-image block at R=36, D=1024). So float16 blocks go through a
one-node Cast graph shipped with the package (`graphs/cast_float16.onnx`, written by
`python -m scan_deploy.export.runtime_graphs`) when onnxruntime is installed, and numpy
otherwise (a Jetson with only TensorRT). int8 is one fused numpy multiply: ONNX Runtime's
Cast + Mul measured no faster. Every path is exact: the same float32 bits either way.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

CAST_FLOAT16 = Path(__file__).with_name("graphs") / "cast_float16.onnx"


def to_float32(raw: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """A new float32 array from stored values: float16 / float32 as they are, int8 times its
    per-row `scale` (shape `raw.shape[:-1]`)."""
    if raw.dtype == np.int8:
        if scale is None:
            raise ValueError("int8 values need their per-row scale")
        return np.multiply(raw, np.asarray(scale, np.float32)[..., None], dtype=np.float32)
    if raw.dtype == np.float16 and raw.size:
        session = _cast_session()
        if session is not None:
            flat = np.ascontiguousarray(raw).reshape(-1)
            return session.run(None, {"values": flat})[0].reshape(raw.shape)
    return np.array(raw, dtype=np.float32)


@functools.cache
def _cast_session():
    """The float16 Cast session, or None without onnxruntime. One intra-op thread: the cast is
    bound by memory, a second thread measured no faster, and it leaves cores to the scorer.
    `InferenceSession.run` is thread-safe, so one session serves every caller."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(CAST_FLOAT16), options, providers=["CPUExecutionProvider"]
    )
