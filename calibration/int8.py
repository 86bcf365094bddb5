"""INT8 graphs with explicit Q/DQ, through ONNX Runtime's static quantization.

Settings are the ones TensorRT accepts (../shared/TENSORRT.md): QDQ format, symmetric INT8
activations and weights (zero point 0), per-tensor scales, biases left in float (no int32
DequantizeLinear), and only MatMul quantized: the GEMMs are where INT8 pays; GRU, norms, softmax
and reductions have no INT8 path in TensorRT worth the accuracy. ONNX Runtime was chosen over
NVIDIA Model Optimizer because `nvidia-modelopt[onnx]` replaces onnxruntime with onnxruntime-gpu,
pulls cupy and pins an older onnx (measured, see TENSORRT.md), for the same Q/DQ placement.

Activation ranges are computed once per graph and calibration set and cached as JSON (ONNX
Runtime's own cache format), so a rerun, or a search over which nodes to leave in float, skips
calibration.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Collection
from contextlib import redirect_stdout
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from scan_deploy.calibration.data import Feed, FeedReader
from scan_deploy.export.graph_builder import with_oldest_ir_version

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


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in QUANTIZED_OPS]


def quantize(
    model: onnx.ModelProto,
    feeds: list[Feed] | None,
    method: str,
    cache: Path,
    exclude: Collection[str] = (),
) -> onnx.ModelProto:
    """The Q/DQ graph of `model`; the nodes named in `exclude` stay float. Reads the activation
    ranges from `cache` when it exists (then `feeds` may be None), else calibrates and writes it."""
    if not cache.is_file() and feeds is None:
        raise ValueError(f"{cache}: no calibration cache and no calibration data")
    cache.parent.mkdir(parents=True, exist_ok=True)
    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # ORT logs every node it leaves alone at INFO
    try:  # ... and prints calibration progress to stdout, which `--json` output owns
        with (
            tempfile.TemporaryDirectory(prefix="scan-int8-") as tmp,
            redirect_stdout(io.StringIO()),
        ):
            source, output = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save_model(model, str(source))  # ORT mishandles an in-memory model's weights
            quantize_static(
                source,
                output,
                FeedReader(feeds) if feeds is not None else None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                calibrate_method=METHODS[method],
                extra_options=dict(TENSORRT_OPTIONS),
                calibration_cache_path=cache,
            )
            return with_oldest_ir_version(onnx.load(str(output)))
    finally:
        quant_logger.setLevel(level)
