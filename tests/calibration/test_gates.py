"""Accuracy gates: ΔR@K arithmetic, a faithful variant passes, a broken graph is blamed."""

import numpy as np
import onnx
from onnx import helper
from scan_deploy.calibration.gates import recall_deltas, run_gate, worst_delta

from scan_deploy.evaluate import split_similarities
from scan_deploy.metrics import recall_metrics
from scan_deploy.precomp import load_split
from tests.calibration.tiny import fp32_graphs, make_bundle


def _negated(scorer: onnx.ModelProto) -> onnx.ModelProto:
    """The scorer with its similarity negated: a variant that ruins retrieval."""
    broken = onnx.ModelProto()
    broken.CopyFrom(scorer)
    for node in broken.graph.node:
        node.output[:] = ["raw" if o == "similarity" else o for o in node.output]
    broken.graph.node.append(helper.make_node("Neg", ["raw"], ["similarity"], name="negate"))
    return broken


def test_recall_deltas_in_points():
    reference = {d: {"r1": 50.0, "r5": 80.0, "r10": 90.0} for d in ("i2t", "t2i")}
    metrics = {"i2t": {"r1": 49.5, "r5": 80.0, "r10": 91.0}, "t2i": reference["t2i"]}
    assert recall_deltas(reference, metrics) == {
        "i2t_r1": -0.5,
        "i2t_r5": 0.0,
        "i2t_r10": 1.0,
        "t2i_r1": 0.0,
        "t2i_r5": 0.0,
        "t2i_r10": 0.0,
    }


def test_worst_delta_is_infinite_for_non_finite_similarities():
    sims = np.eye(3, dtype=np.float32)
    reference = recall_metrics(sims, 1)
    assert worst_delta(reference, sims, 1) == 0.0
    sims[0, 1] = np.nan
    assert worst_delta(reference, sims, 1) == float("inf")


def test_gate_passes_fp32_and_blames_a_broken_scorer(data, tmp_path):
    bundle, checkpoint = make_bundle(data, tmp_path)
    split = load_split(data, "test")
    graphs = fp32_graphs(bundle)
    reference = split_similarities(checkpoint, split)
    same = run_gate(bundle, checkpoint, graphs, graphs, split, reference, "fp16")
    assert same["passed"] and same["worst_delta_recall"] == 0.0 and same["blame"] == []
    assert same["similarity_max_abs"] < 1e-5
    assert {(r["graph"], r["output"]) for r in same["graphs"]} >= {("scorer", "similarity")}
    broken = {**graphs, "scorer": _negated(graphs["scorer"])}
    report = run_gate(bundle, checkpoint, broken, graphs, split, reference, "int8")
    assert not report["passed"] and report["worst_delta_recall"] > 1.0
    assert report["blame"][0]["graph"] == "scorer"
    assert report["blame"][0]["worst_delta_recall"] == report["worst_delta_recall"]
    assert [b["worst_delta_recall"] for b in report["blame"][1:]] == [0.0, 0.0]
