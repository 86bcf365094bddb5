"""INT8 Q/DQ graphs: what TensorRT accepts, cached ranges, excluded nodes."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scan_deploy.calibration.data import image_feeds, sample_split, scorer_feeds, text_feeds
from scan_deploy.calibration.int8 import quantizable_nodes, quantize
from scan_deploy.export.lint import lint_model
from scan_deploy.export.verify import session

from scan_deploy.precomp import load_split
from tests.calibration.tiny import fp32_graphs, make_bundle


@pytest.fixture
def calibrated(data, tmp_path):
    bundle, _ = make_bundle(data, tmp_path)
    graphs = fp32_graphs(bundle)
    sample = sample_split(load_split(data, "train"), 20, seed=1)
    sessions = {name: session(model) for name, model in graphs.items()}
    feeds = {
        "image_encoder": image_feeds(sample),
        "text_encoder": text_feeds(sample, bundle.vocab),
        "scorer": scorer_feeds(sessions, sample, bundle.vocab, t2i=True),
    }
    return graphs, feeds, tmp_path / "cache"


@pytest.mark.parametrize("method", ["max", "entropy", "percentile"])
def test_qdq_graphs_are_what_tensorrt_accepts(calibrated, method):
    graphs, feeds, cache = calibrated
    for name, model in graphs.items():
        q = quantize(model, feeds[name], method, cache / f"{name}.json")
        producers = {o: n.op_type for n in q.graph.node for o in n.output}
        for node in quantizable_nodes(q):  # both inputs of every MatMul come through Q/DQ
            assert [producers.get(i) for i in node.input] == ["DequantizeLinear"] * 2, node.name
        assert lint_model(q, name) == []  # zero points 0, no int32 DQ, no integer MatMul
        zero_points = [
            numpy_helper.to_array(i)
            for i in q.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and "zero_point" in i.name
        ]
        assert zero_points and all(np.all(z == 0) for z in zero_points)
        got = session(q).run(None, feeds[name][0])
        want = session(model).run(None, feeds[name][0])
        for g, w in zip(got, want, strict=True):  # 8-bit resolution, not element-wise equality
            cosine = float(g.ravel() @ w.ravel() / np.linalg.norm(g) / np.linalg.norm(w))
            assert cosine > 0.99
            assert np.abs(g - w).mean() < 0.02 * np.abs(w).max()


def test_cached_ranges_reproduce_the_graph(calibrated):
    graphs, feeds, cache = calibrated
    first = quantize(graphs["scorer"], feeds["scorer"], "max", cache / "scorer.json")
    assert (cache / "scorer.json").is_file()
    again = quantize(graphs["scorer"], None, "max", cache / "scorer.json")
    assert first.graph.SerializeToString() == again.graph.SerializeToString()
    with pytest.raises(ValueError, match="no calibration cache"):
        quantize(graphs["scorer"], None, "max", cache / "missing.json")


def test_excluded_node_stays_float(calibrated):
    graphs, feeds, cache = calibrated
    scorer = graphs["scorer"]
    matmuls = [n.name for n in quantizable_nodes(scorer)]
    assert len(matmuls) == 2
    q = quantize(scorer, feeds["scorer"], "max", cache / "s.json", exclude={matmuls[1]})
    producers = {o: n for n in q.graph.node for o in n.output}
    by_name = {n.name: n for n in q.graph.node}
    assert any(producers[i].op_type == "DequantizeLinear" for i in by_name[matmuls[0]].input)
    assert not any(
        i in producers and producers[i].op_type == "DequantizeLinear"
        for i in by_name[matmuls[1]].input
    )
