"""`scan-deploy check --target tensorrt`: will TensorRT's ONNX parser take these graphs?

TensorRT cannot run here, so this lint encodes what its ONNX parser documents:
- supported operators: the TensorRT 10.x operator matrix of onnx/onnx-tensorrt
  `docs/operators.md` at tag `release/10.1-GA` (commit 96e781103cfc; opsets 9 to 20,
  https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md). JetPack 6 ships
  TensorRT 10.3; 10.1 is the newest 10.x list at or below it, and every operator it marks Y is
  still Y in the 10.15 list, so a graph that passes here parses on every 10.x from 10.1 on.
  Operators marked N there are refused, and so is any operator missing from it (operators that
  later 10.x releases added, such as STFT or Attention, are refused too: JetPack 6 may lack them);
- the inputs the matrix says must be initializers: reduce `axes`, Slice/Squeeze/Unsqueeze
  `axes`, CumSum `axis`, TopK `K` (and TopK needs `sorted=1`);
- Q/DQ: zero points must be 0 (symmetric: "`x_zero_point` must be zero" in the matrix), no int32
  (bias) DequantizeLinear, no DynamicQuantizeLinear / QLinearMatMul / MatMulInteger (marked N;
  onnxruntime#14229, NVIDIA/TensorRT#2774 and #4698; docs/tensorrt.md);
- bidirectional GRU/LSTM/RNN: the same activations both ways (the matrix's restriction);
- IR version: at most 10, what onnx 1.16 (the ONNX submodule of onnx-tensorrt 10.1) reads.
With `dla`: NVIDIA's "DLA Supported Layers and Restrictions" (TensorRT 10 docs): DLA needs static
shapes (profile min = opt = max) and runs FP16/INT8 convolution-style layers only; every other layer
falls back to the GPU (listed, not an error: engines are built with GPU fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from scan_deploy.export.graph_builder import describe_value

from scan_deploy.choices import Graph

# onnx/onnx-tensorrt docs/operators.md at release/10.1-GA: the 150 rows marked Y.
TENSORRT_OPS_SOURCE = "onnx/onnx-tensorrt release/10.1-GA docs/operators.md (TensorRT 10.x)"
TENSORRT_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
    EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
    NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor""".split()  # noqa: SIM905
)
MAX_IR_VERSION = 10  # onnx 1.16, the ONNX of onnx-tensorrt 10.1 (TensorRT 10.x; JetPack 6: 10.3)
QUANTIZED_OPS_REFUSED = frozenset({"DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger"})
# DLA layer table (TensorRT 10 "DLA Supported Layers and Restrictions") as ONNX operators.
DLA_OPS = frozenset(
    """Relu Sigmoid Tanh Clip LeakyRelu PRelu Add Sub Mul Div Max Min Pow Equal Greater Less Conv
    ConvTranspose Gemm MaxPool AveragePool GlobalAveragePool GlobalMaxPool LRN
    BatchNormalization Concat Transpose Reshape Flatten Squeeze Unsqueeze Slice Resize Abs
    Identity QuantizeLinear DequantizeLinear""".split()  # noqa: SIM905
)
# input index that must be a constant, by operator (and the opset from which it is an input)
CONSTANT_INPUTS = {
    "Slice": (3, "axes"),
    "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    "CumSum": (1, "axis"),
    "TopK": (1, "K"),
}
REDUCE_OPS = frozenset(op for op in TENSORRT_OPS if op.startswith("Reduce"))


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    severity: str  # "error" (the parser will refuse it) or "fallback" (DLA layer runs on the GPU)
    message: str


def lint_model(model: onnx.ModelProto, graph: str, dla: bool = False) -> list[Finding]:
    constants = {init.name: init for init in model.graph.initializer}
    constants.update(
        {
            node.output[0]: _constant_tensor(node)
            for node in model.graph.node
            if node.op_type == "Constant"
        }
    )
    findings = []
    if model.ir_version > MAX_IR_VERSION:
        findings.append(
            Finding(
                graph,
                "model",
                "ir_version",
                "error",
                f"IR version {model.ir_version}: TensorRT 10's ONNX parser (onnx 1.16) reads IR "
                f"<= {MAX_IR_VERSION}; re-export with this version of scan-deploy",
            )
        )
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"

        def add(severity: str, message: str, node=node, name=name) -> None:
            findings.append(Finding(graph, name, node.op_type, severity, message))

        if node.op_type in QUANTIZED_OPS_REFUSED:
            add("error", "not accepted by TensorRT: quantize with static symmetric Q/DQ instead")
        elif node.op_type not in TENSORRT_OPS:
            add("error", f"not in TensorRT's ONNX parser support list ({TENSORRT_OPS_SOURCE})")
        for message in _constant_input_problems(node, constants):
            add("error", message)
        for message in _qdq_problems(node, constants):
            add("error", message)
        if node.op_type == "TopK" and _int_attribute(node, "sorted", 1) != 1:
            add("error", "TopK needs sorted=1 (TensorRT returns the k values in order)")
        if node.op_type in ("GRU", "LSTM", "RNN"):
            message = _rnn_activation_problem(node)
            if message:
                add("error", message)
        if dla and node.op_type not in DLA_OPS:
            add("fallback", "no DLA layer for this operator: runs on the GPU (GPU fallback)")
    return findings


def lint_static_shapes(graph: str, inputs: list[dict], shape_ranges: dict) -> list[Finding]:
    """DLA needs min = opt = max for every dynamic input dimension."""
    findings = []
    aliases = {"images": "batch", "captions": "batch"}
    for tensor in inputs:
        for dim in tensor["shape"]:
            if not isinstance(dim, str):
                continue
            bounds = shape_ranges.get(aliases.get(dim, dim))
            if bounds is None or bounds["min"] != bounds["max"]:
                findings.append(
                    Finding(
                        graph,
                        tensor["name"],
                        "input",
                        "error",
                        f"dimension '{dim}' is dynamic ({bounds}); DLA needs a static profile "
                        "(min = opt = max): export with fixed ranges or build with equal shapes",
                    )
                )
    return findings


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
    return None


def _constant_input_problems(node: onnx.NodeProto, constants: dict) -> list[str]:
    checks = []
    if node.op_type in REDUCE_OPS and len(node.input) > 1 and node.input[1]:
        checks.append((1, "axes"))
    if node.op_type in CONSTANT_INPUTS:
        checks.append(CONSTANT_INPUTS[node.op_type])
    return [
        f"input '{label}' must be a constant (initializer), not the computed '{node.input[i]}'"
        for i, label in checks
        if len(node.input) > i and node.input[i] and node.input[i] not in constants
    ]


def _qdq_problems(node: onnx.NodeProto, constants: dict) -> list[str]:
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return []
    problems = []
    if len(node.input) > 2 and node.input[2]:
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            problems.append("zero point must be a constant 0, got a computed tensor")
        elif np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append("zero point must be 0 (symmetric quantization only)")
    if node.op_type == "DequantizeLinear":
        source = constants.get(node.input[0])
        if source is not None and source.data_type == onnx.TensorProto.INT32:
            problems.append(
                "int32 DequantizeLinear (a quantized bias) is not accepted: keep biases float"
            )
    return problems


def _rnn_activation_problem(node: onnx.NodeProto) -> str | None:
    attributes = {a.name: a for a in node.attribute}
    direction = attributes.get("direction")
    if direction is None or direction.s != b"bidirectional" or "activations" not in attributes:
        return None
    activations = list(attributes["activations"].strings)
    half = len(activations) // 2
    if activations[:half] != activations[half:]:
        return "bidirectional recurrence needs the same activations in both directions"
    return None


def lint_bundle(bundle, dla: bool = False) -> list[Finding]:
    """Every graph of a loaded bundle, FP32 and precision variants: its manifest entry matches
    the file, then the rules above."""
    findings = []
    for precision in bundle.precisions():
        for name in Graph:
            label = name if precision == "fp32" else f"{name}.{precision}"
            findings += _lint_entry(bundle, label, bundle.graph(name, precision), dla)
    return findings


def _lint_entry(bundle, name: str, entry: dict, dla: bool) -> list[Finding]:
    findings = []
    path = bundle.path / entry["file"]
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # a truncated or corrupted file: report it, don't crash
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        findings.append(Finding(name, str(path), "file", "error", f"unreadable ONNX: {first_line}"))
        return findings
    for kind in ("inputs", "outputs"):
        actual = [describe_value(v) for v in getattr(model.graph, kind[:-1])]
        if actual != entry[kind]:
            findings.append(
                Finding(
                    name,
                    str(path),
                    kind,
                    "error",
                    f"manifest {kind} {entry[kind]} do not match the file's {actual}",
                )
            )
    findings += lint_model(model, name, dla)
    if dla:
        findings += lint_static_shapes(name, entry["inputs"], bundle.manifest["shape_ranges"])
    return findings
