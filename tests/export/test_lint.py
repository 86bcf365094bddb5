"""The TensorRT readiness lint on small graphs that break each rule, and on real bundles."""

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from scan_deploy.export.graph_builder import with_oldest_ir_version
from scan_deploy.export.lint import TENSORRT_OPS, TENSORRT_OPS_SOURCE, lint_bundle, lint_model
from scan_deploy.export.writer import ShapeRanges, export_bundle

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary


def _model(nodes, initializers=(), inputs=None, opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return with_oldest_ir_version(model)


def _errors(model, dla=False):
    return [(f.op, f.message) for f in lint_model(model, "g", dla) if f.severity == "error"]


def test_clean_graph_has_no_findings():
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    assert model.ir_version == 8  # opset 17
    assert lint_model(model, "g") == []


def test_ir_version_newer_than_tensorrt_10_reads():
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    model.ir_version = 14  # what onnx 1.2x's make_model writes
    ((op, text),) = _errors(model)
    assert op == "ir_version" and "IR version 14" in text and "<= 10" in text


def test_the_operator_list_is_tensorrt_10s():
    """onnx-tensorrt release/10.1-GA docs/operators.md: 150 operators marked Y."""
    assert len(TENSORRT_OPS) == 150
    assert "release/10.1-GA" in TENSORRT_OPS_SOURCE
    # added to the matrix after TensorRT 8.5 (the list this lint used before)
    assert {"CastLike", "Gelu", "LayerNormalization", "GroupNormalization", "Hardmax"} <= (
        TENSORRT_OPS
    )
    # marked N in 10.1, or added only by later 10.x releases than JetPack 6's 10.3 may have
    assert not {"Unique", "STFT", "HannWindow", "Attention", "RMSNormalization"} & TENSORRT_OPS
    # everything the exported SCAN graphs use (GRU with sequence_lens, the scorer's masks)
    assert {"GRU", "Gather", "MatMul", "Where", "Range", "Less", "ReduceL2", "Softmax"} <= (
        TENSORRT_OPS
    )


@pytest.mark.parametrize("op", ["LayerNormalization", "Gelu", "Mish", "CastLike", "Hardmax"])
def test_operators_tensorrt_10_added_pass(op):
    inputs = ["x", "x"] if op == "CastLike" else ["x"]
    assert _errors(_model([helper.make_node(op, inputs, ["y"])])) == []


@pytest.mark.parametrize(
    "op,message",
    [
        ("Unique", "support list (onnx/onnx-tensorrt release/10.1-GA"),
        ("STFT", "support list"),
        ("BitwiseAnd", "support list"),
        ("DynamicQuantizeLinear", "static symmetric Q/DQ"),
        ("MatMulInteger", "static symmetric Q/DQ"),
        ("QLinearMatMul", "static symmetric Q/DQ"),
    ],
)
def test_unsupported_operators(op, message):
    model = _model([helper.make_node(op, ["x"], ["y"])])
    ((found_op, text),) = _errors(model)
    assert found_op == op and message in text


def test_reduce_axes_must_be_constant():
    computed = helper.make_node("Shape", ["x"], ["axes"])
    reduce = helper.make_node("ReduceSum", ["x", "axes"], ["y"])
    assert _errors(_model([computed, reduce])) == [
        ("ReduceSum", "input 'axes' must be a constant (initializer), not the computed 'axes'")
    ]
    constant_axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    assert _errors(_model([reduce], [constant_axes])) == []
    as_constant_node = helper.make_node("Constant", [], ["axes"], value=constant_axes)
    assert _errors(_model([as_constant_node, reduce])) == []


def test_unsqueeze_axes_must_be_constant():
    computed = helper.make_node("Shape", ["x"], ["axes"])
    node = helper.make_node("Unsqueeze", ["x", "axes"], ["y"])
    assert [op for op, _ in _errors(_model([computed, node]))] == ["Unsqueeze"]


def test_cumsum_axis_must_be_constant():
    computed = helper.make_node("Shape", ["x"], ["axis"])
    node = helper.make_node("CumSum", ["x", "axis"], ["y"])
    assert _errors(_model([computed, node])) == [
        ("CumSum", "input 'axis' must be a constant (initializer), not the computed 'axis'")
    ]
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    assert _errors(_model([node], [axis])) == []


def test_topk_must_be_sorted_with_a_constant_k():
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    sorted_topk = helper.make_node("TopK", ["x", "k"], ["y", "i"])
    assert _errors(_model([sorted_topk], [k])) == []
    unsorted = helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)
    assert _errors(_model([unsorted], [k])) == [
        ("TopK", "TopK needs sorted=1 (TensorRT returns the k values in order)")
    ]
    computed = helper.make_node("Shape", ["x"], ["k"])
    assert [op for op, _ in _errors(_model([computed, sorted_topk]))] == ["TopK"]


def _qdq(zero_point, dtype=np.int8):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, dtype), "zp")
    q = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"])
    dq = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])
    return _model([q, dq], [scale, zp])


def test_qdq_must_be_symmetric():
    assert _errors(_qdq(0)) == []
    errors = _errors(_qdq(3))
    assert errors == [
        ("QuantizeLinear", "zero point must be 0 (symmetric quantization only)"),
        ("DequantizeLinear", "zero point must be 0 (symmetric quantization only)"),
    ]


def test_int32_bias_dequantize_is_refused():
    bias = numpy_helper.from_array(np.array([5, -3], np.int32), "bias_q")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    node = helper.make_node("DequantizeLinear", ["bias_q", "scale"], ["y"])
    ((op, message),) = _errors(_model([node], [bias, scale]))
    assert op == "DequantizeLinear" and "int32 DequantizeLinear" in message


def test_bidirectional_gru_activations_must_match():
    def gru(activations):
        return helper.make_node(
            "GRU",
            ["x", "W", "R"],
            ["y"],
            hidden_size=2,
            direction="bidirectional",
            activations=activations,
        )

    assert _errors(_model([gru(["Sigmoid", "Tanh", "Sigmoid", "Tanh"])])) == []
    ((op, message),) = _errors(_model([gru(["Sigmoid", "Tanh", "Sigmoid", "Relu"])]))
    assert op == "GRU" and "same activations" in message


def test_dla_lists_gpu_fallbacks():
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])]
    )
    fallbacks = [(f.op, f.severity) for f in lint_model(model, "g", dla=True)]
    assert fallbacks == [("Softmax", "fallback")]


@pytest.fixture
def bundle(tmp_path):
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(8))], threshold=1)
    config = ModelConfig(vocab_size=len(vocab), img_dim=6, embed_size=4, word_dim=3, bi_gru=True)
    torch.manual_seed(0)
    export_bundle(
        Checkpoint(SCAN(config).eval(), vocab, tmp_path / "c"),
        tmp_path / "b",
        17,
        ShapeRanges.create(4, 5, 6),
    )
    return tmp_path / "b"


def test_exported_bundle_is_tensorrt_ready_and_dla_needs_static_shapes(bundle):
    assert lint_bundle(load_bundle(bundle)) == []
    dla = lint_bundle(load_bundle(bundle), dla=True)
    static = {(f.graph, f.node) for f in dla if f.severity == "error"}
    assert ("image_encoder", "features") in static and ("text_encoder", "tokens") in static
    fallback_ops = {f.op for f in dla if f.severity == "fallback"}
    assert {"GRU", "Gather", "MatMul", "Exp", "ReduceMax"} <= fallback_ops  # softmax written out


def test_manifest_that_disagrees_with_the_file(bundle):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["graphs"]["scorer"]["inputs"][0]["shape"] = ["images", 36, 4]
    path.write_text(json.dumps(manifest))
    findings = lint_bundle(load_bundle(bundle))
    assert [(f.graph, f.op) for f in findings] == [("scorer", "inputs")]
    assert "do not match the file" in findings[0].message


def test_corrupted_graph_file_is_a_finding_not_a_crash(bundle):
    import hashlib

    path = bundle / "text_encoder.onnx"
    path.write_bytes(path.read_bytes()[:200])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"]["text_encoder"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    findings = lint_bundle(load_bundle(bundle))
    assert [(f.graph, f.op, f.severity) for f in findings] == [("text_encoder", "file", "error")]
