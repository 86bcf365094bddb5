"""Stored gallery arrays (float16, or int8 with per-row scales) to the float32 the scorer takes.

An int8 gallery (format 3) stores each quantized value q in [-127, 127] as the uint8 code
q + 128 (`scan_deploy.int8_rows`); galleries of formats 1 and 2 stored q as int8. Both
dequantize to q · scale.

numpy's float16 → float32 cast runs at ~0.5 G elements/s on the 2-core Zen 4 CPU (it does not
use F16C), and its int8 × scale at ~1.3–1.6; ONNX Runtime's kernels do the same exact arithmetic
at ~4.0 (Cast: 6.7–8×) and ~3.0 (DequantizeLinear per row: 1.9–2.6×) on one thread
(benchmarks/bench_query.py, one 256-image block of R=36, D=1024). So blocks go through two one-node
graphs shipped with the package (`graphs/*.onnx`, written by `python -m
scan_deploy.export.runtime_graphs runtime/graphs`) when onnxruntime is installed, and through
numpy otherwise (a Jetson with only TensorRT). Every path gives the same float32 bits.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from scan_deploy.int8_rows import INT8_ZERO_POINT

LOG = logging.getLogger("scan_deploy.runtime")
GRAPHS_DIR = Path(__file__).with_name("graphs")
CAST_FLOAT16 = GRAPHS_DIR / "cast_float16.onnx"
DEQUANTIZE_INT8 = GRAPHS_DIR / "dequantize_int8.onnx"
DEQUANTIZE_UINT8 = GRAPHS_DIR / "dequantize_uint8.onnx"


def to_float32(raw: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """A new float32 array from stored values: float16 / float32 as they are, int8 values (as
    int8, or as uint8 codes q + 128) times their per-row `scale` (shape `raw.shape[:-1]`)."""
    if raw.dtype in (np.int8, np.uint8):
        if scale is None:
            raise ValueError("int8 values need their per-row scale")
        scale = np.asarray(scale, np.float32)
        if scale.shape != raw.shape[:-1]:
            raise ValueError(f"scale of shape {scale.shape}, expected {raw.shape[:-1]}")
        codes = raw.dtype == np.uint8
        session = _session(DEQUANTIZE_UINT8 if codes else DEQUANTIZE_INT8) if raw.size else None
        if session is None:
            values = np.subtract(raw, INT8_ZERO_POINT, dtype=np.int16) if codes else raw
            return np.multiply(values, scale[..., None], dtype=np.float32)
        rows = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])
        feeds = {"values": rows, "scale": np.ascontiguousarray(scale).reshape(-1)}
        return session.run(None, feeds)[0].reshape(raw.shape)
    session = _session(CAST_FLOAT16) if raw.dtype == np.float16 and raw.size else None
    if session is None:
        return np.array(raw, dtype=np.float32)
    flat = np.ascontiguousarray(raw).reshape(-1)
    return session.run(None, {"values": flat})[0].reshape(raw.shape)


@functools.cache
def _session(graph: Path):
    """The session of a shipped graph, or None without onnxruntime (or when it cannot load the
    graph: logged once, numpy does the work). One intra-op thread: these passes are bound by
    memory (a second thread gained 0–1.4×) and it leaves cores to the scorer and to concurrent
    callers. `InferenceSession.run` is thread-safe, so one session serves every caller."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # whatever stops it loading, numpy can do the work
        LOG.warning("%s: onnxruntime cannot load it (%s); dequantizing with numpy", graph, exc)
        return None
