"""INT8 graphs with explicit Q/DQ, through ONNX Runtime's static quantization.

Settings are the ones TensorRT accepts (docs/tensorrt.md): QDQ format, symmetric INT8
activations and weights (zero point 0), per-tensor scales, biases left in float (no int32
DequantizeLinear), and only MatMul quantized: the GEMMs are where INT8 pays; GRU, norms, softmax
and reductions have no INT8 path in TensorRT worth the accuracy. ONNX Runtime was chosen over
NVIDIA Model Optimizer because `nvidia-modelopt[onnx]` replaces onnxruntime with onnxruntime-gpu,
pulls cupy and pins an older onnx (measured, see docs/tensorrt.md), for the same Q/DQ placement.

Activation ranges are computed once per graph and calibration set and cached as JSON (ONNX
Runtime's own cache format), so a rerun, or a search over which nodes to leave in float, skips
calibration. ONNX Runtime only ever sees a scratch copy of the cache: we read the cache (checking
it holds finite ranges of the method for every activation a MatMul reads, so a truncated or
foreign file is ignored with a warning and rebuilt) and write it (atomically, `atomic_path`).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Collection
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData
from scan_deploy.calibration.data import Feed, FeedReader
from scan_deploy.export.graph_builder import with_oldest_ir_version

from scan_deploy.atomic import atomic_path
from scan_deploy.errors import input_error

LOG = logging.getLogger("scan_deploy.calibration")
METHODS = {
    "max": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANTIZED_OPS = ("MatMul",)
TENSORRT_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "CalibPercentile": 99.99,
}


class UnusableCache(Exception):
    """A calibration cache file that cannot be used (the message says why)."""


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in QUANTIZED_OPS]


def read_cache(cache: Path, model: onnx.ModelProto, method: str) -> bytes | None:
    """The bytes of `cache` when it holds finite `method` ranges of every activation the MatMuls
    of `model` read; None when there is no such file; UnusableCache otherwise."""
    if not cache.is_file():
        return None
    try:
        raw = cache.read_bytes()
    except OSError as exc:
        raise UnusableCache(f"cannot read it ({exc.strerror})") from None
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise UnusableCache(f"invalid JSON ({exc})") from None
    try:
        ranges = TensorsData.from_dict(payload)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        message = f"not ONNX Runtime's calibration ranges ({type(exc).__name__}: {exc})"
        raise UnusableCache(message) from None
    if ranges.calibration_method != METHODS[method]:
        raise UnusableCache(f"holds {ranges.calibration_method} ranges, not {METHODS[method]}")
    initializers = {init.name for init in model.graph.initializer}
    for node in quantizable_nodes(model):
        for name in node.input:
            if name not in initializers:
                _check_range(ranges, name)
    return raw


def _check_range(ranges: TensorsData, name: str) -> None:
    if name not in ranges or not hasattr(ranges[name], "range_value"):
        raise UnusableCache(f"no range for tensor {name!r}")
    if not all(np.isfinite(bound).all() for bound in ranges[name].range_value):
        raise UnusableCache(f"the range of tensor {name!r} is not finite")


def usable_cache(cache: Path, model: onnx.ModelProto, method: str) -> bool:
    try:
        return read_cache(cache, model, method) is not None
    except UnusableCache:
        return False


def quantize(
    model: onnx.ModelProto,
    feeds: list[Feed] | None,
    method: str,
    cache: Path,
    exclude: Collection[str] = (),
) -> onnx.ModelProto:
    """The Q/DQ graph of `model`; the nodes named in `exclude` stay float. Reads the activation
    ranges from `cache` when it is usable (then `feeds` may be None), else calibrates on `feeds`
    and writes it (unless a range is not finite); an unusable cache is ignored with a warning
    (a UserError without `feeds`)."""
    try:
        cached = read_cache(cache, model, method)
    except UnusableCache as exc:
        if feeds is None:
            message = f"{exc}, and no calibration data to rebuild it"
            raise input_error(cache, None, message) from None
        LOG.warning("%s: unusable calibration cache (%s): ignored, calibrating again", cache, exc)
        cached = None
    if cached is None and feeds is None:
        raise input_error(cache, None, "no calibration cache and no calibration data")
    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # ORT logs every node it leaves alone at INFO
    try:  # ... and prints calibration progress to stdout, which `--json` output owns
        with (
            tempfile.TemporaryDirectory(prefix="scan-int8-") as tmp,
            redirect_stdout(io.StringIO()),
        ):
            source, output = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            scratch = Path(tmp) / "ranges.json"  # ORT's cache: read, or written on calibration
            if cached is not None:
                scratch.write_bytes(cached)
            onnx.save_model(model, str(source))  # ORT mishandles an in-memory model's weights
            quantize_static(
                source,
                output,
                FeedReader(feeds) if cached is None else None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                calibrate_method=METHODS[method],
                extra_options=dict(TENSORRT_OPTIONS),
                calibration_cache_path=scratch,
            )
            if cached is None and usable_cache(scratch, model, method):  # never non-finite
                with atomic_path(cache, suffix=".json") as target:
                    target.write_bytes(scratch.read_bytes())
            return with_oldest_ir_version(onnx.load(str(output)))
    finally:
        quant_logger.setLevel(level)
