"""INT8 Q/DQ graphs: what TensorRT accepts, cached ranges (unusable caches rebuilt), excluded
nodes."""

import json
import logging
import stat

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scan_deploy.calibration.data import image_feeds, sample_split, scorer_feeds, text_feeds
from scan_deploy.calibration.int8 import quantizable_nodes, quantize
from scan_deploy.export.lint import lint_model
from scan_deploy.export.verify import session

from scan_deploy.errors import UserError
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
    with pytest.raises(UserError, match="missing.json: no calibration cache and no calibration"):
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


def _truncated(text: str, other: str) -> str:
    return text[: len(text) // 2]


def _not_ranges(text: str, other: str) -> str:
    return json.dumps({"CLS": "TensorsData", "data": [], "calibration_method": 0})


def _other_method(text: str, other: str) -> str:
    return other  # the same graph's ranges, by the entropy method


def _missing_tensor(text: str, other: str) -> str:
    payload = json.loads(text)
    del payload["data"]["region_gram"]
    return json.dumps(payload)


def _not_finite(text: str, other: str) -> str:
    payload = json.loads(text)
    payload["data"]["region_gram"]["highest"]["data"] = float("nan")
    return json.dumps(payload)


@pytest.mark.parametrize(
    "corrupt", [_truncated, _not_ranges, _other_method, _missing_tensor, _not_finite]
)
def test_unusable_cache_is_ignored_with_one_warning_and_rebuilt(calibrated, corrupt, caplog):
    graphs, feeds, cache = calibrated
    scorer, path = graphs["scorer"], cache / "scorer.json"
    want = quantize(scorer, feeds["scorer"], "max", path)
    good = path.read_text()
    quantize(scorer, feeds["scorer"], "entropy", cache / "entropy.json")
    path.write_text(corrupt(good, (cache / "entropy.json").read_text()))
    caplog.set_level(logging.WARNING, "scan_deploy")
    got = quantize(scorer, feeds["scorer"], "max", path)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("scan_deploy")]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: unusable calibration cache (")
    assert "\n" not in warnings[0]
    assert got.graph.SerializeToString() == want.graph.SerializeToString()
    assert path.read_text() == good  # rebuilt from the data, the same ranges
    again = quantize(scorer, None, "max", path)  # and usable again, without a warning
    assert again.graph.SerializeToString() == want.graph.SerializeToString()
    assert len(caplog.records) == 1


def test_unusable_cache_without_data_is_a_one_line_error(calibrated):
    graphs, feeds, cache = calibrated
    path = cache / "scorer.json"
    quantize(graphs["scorer"], feeds["scorer"], "max", path)
    truncated = path.read_bytes()[:100]
    path.write_bytes(truncated)
    with pytest.raises(UserError) as info:
        quantize(graphs["scorer"], None, "max", path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid JSON (") and "\n" not in message
    assert message.endswith(", and no calibration data to rebuild it")
    assert path.read_bytes() == truncated  # left as it was


def test_cache_is_written_whole_and_shared(calibrated, monkeypatch):
    graphs, feeds, cache = calibrated
    path = cache / "scorer.json"
    quantize(graphs["scorer"], feeds["scorer"], "max", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert [p.name for p in cache.iterdir()] == ["scorer.json"]
    import scan_deploy.calibration.int8 as int8

    real = int8.quantize_static

    def poisoned(*args, calibration_cache_path, **kwargs):  # calibration gave an infinite range
        real(*args, calibration_cache_path=calibration_cache_path, **kwargs)
        payload = json.loads(calibration_cache_path.read_text())
        payload["data"]["region_gram"]["lowest"]["data"] = float("-inf")
        calibration_cache_path.write_text(json.dumps(payload))

    monkeypatch.setattr(int8, "quantize_static", poisoned)
    quantize(graphs["scorer"], feeds["scorer"], "max", cache / "poisoned.json")
    assert [p.name for p in cache.iterdir()] == ["scorer.json"]  # not cached
