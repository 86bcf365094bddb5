"""FP16 rewrite: types, constants, kept nodes, and outputs close to FP32 in ONNX Runtime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from scan_deploy.calibration.fp16 import FP16_MAX, FP16_MIN_NORMAL, float_nodes, to_fp16
from scan_deploy.export.graph_builder import describe_value
from scan_deploy.export.lint import lint_model
from scan_deploy.export.verify import generated_inputs, session

from tests.calibration.tiny import fp32_graphs, make_bundle


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {init.name: init.data_type for init in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.value_info})
    return types


def _feeds(bundle, graphs, name):
    features, tokens, lengths = generated_inputs(bundle.config.vocab_size, 12, 5, 6, 9, seed=4)
    if name == "image_encoder":
        return {"features": features}
    if name == "text_encoder":
        return {"tokens": tokens, "lengths": lengths}
    regions, region_gram, _ = session(graphs["image_encoder"]).run(None, {"features": features})
    words, caption_gram, _ = session(graphs["text_encoder"]).run(
        None, {"tokens": tokens, "lengths": lengths}
    )
    feeds = {"regions": regions, "words": words, "lengths": lengths}
    if bundle.config.cross_attn == "t2i":
        feeds["region_gram"] = region_gram
    else:
        feeds["caption_gram"] = caption_gram
    return feeds


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cross_attn": "i2t", "raw_feature_norm": "softmax", "agg_func": "Mean"},
        {"bi_gru": True, "num_layers": 2, "agg_func": "Max"},
    ],
)
def test_all_fp16_keeps_io_and_matches_fp32(data, tmp_path, options):
    bundle, _ = make_bundle(data, tmp_path, **options)
    graphs = fp32_graphs(bundle)
    for name, model in graphs.items():
        half = to_fp16(model)
        onnx.checker.check_model(half, full_check=True)
        assert [describe_value(v) for v in half.graph.input] == [
            describe_value(v) for v in model.graph.input
        ]
        assert [describe_value(v) for v in half.graph.output] == [
            describe_value(v) for v in model.graph.output
        ]
        assert lint_model(half, name) == []
        float_inits = [i for i in half.graph.initializer if i.data_type == TensorProto.FLOAT]
        assert float_inits == []  # every float weight and constant became FP16
        feeds = _feeds(bundle, graphs, name)
        for got, want in zip(
            session(half).run(None, feeds), session(model).run(None, feeds), strict=True
        ):
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)


def test_kept_nodes_compute_in_fp32(data, tmp_path):
    bundle, _ = make_bundle(data, tmp_path)
    scorer = fp32_graphs(bundle)["scorer"]
    kept = [n for n in float_nodes(scorer) if n.op_type in ("Exp", "ReduceLogSumExp")]
    assert len(kept) == 2  # the Exp of the softmax over regions, ReduceLogSumExp over words
    half = to_fp16(scorer, {n.name for n in kept})
    types = _types(half)
    converted = {n.name: n for n in half.graph.node}
    for node in kept:
        assert types[converted[node.name].output[0]] == TensorProto.FLOAT
    others = [n for n in float_nodes(scorer) if n.op_type == "MatMul"]
    assert all(types[converted[n.name].output[0]] == TensorProto.FLOAT16 for n in others)


def test_constants_are_clamped_to_fp16_range(data, tmp_path):
    bundle, _ = make_bundle(data, tmp_path)
    half = to_fp16(fp32_graphs(bundle)["scorer"])
    values = np.concatenate(
        [
            numpy_helper.to_array(i).ravel()
            for i in half.graph.initializer
            if i.data_type == TensorProto.FLOAT16
        ]
    ).astype(np.float32)
    assert values.min() == -FP16_MAX  # the -1e30 mask
    assert np.isclose(np.abs(values[values != 0]).min(), FP16_MIN_NORMAL)  # eps 1e-8


def test_zero_padded_words_stay_finite(data, tmp_path):
    """x / (|x| + eps) of a padded (zero) word: eps must not round to 0 in FP16."""
    bundle, _ = make_bundle(data, tmp_path)
    half = to_fp16(fp32_graphs(bundle)["text_encoder"])
    tokens = np.array([[1, 2, 0, 0]], np.int64)
    words, gram, pooled = session(half).run(None, {"tokens": tokens, "lengths": np.array([2])})
    assert np.isfinite(words).all() and np.all(words[0, 2:] == 0)
    assert np.isfinite(gram).all() and np.isfinite(pooled).all()
