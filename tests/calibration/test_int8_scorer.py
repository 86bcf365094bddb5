"""The int8-gallery scorers: gated on ΔR@K against the FP32 PyTorch reference like every
variant, recorded in the bundle only when they pass (or with accept_loss)."""

import numpy as np
import pytest
from scan_deploy.calibration import int8_scorer
from scan_deploy.calibration.calibrate import write_int8_scorers
from scan_deploy.calibration.int8_scorer import gate_int8_scorers
from scan_deploy.export.lint import lint_bundle
from scan_deploy.runtime.gallery_format import KINDS

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.choices import Precision
from scan_deploy.evaluate import split_similarities
from scan_deploy.precomp import load_split


def test_both_scorers_pass_their_gate_and_are_recorded(int8_scored):
    path, records = int8_scored
    bundle = load_bundle(path)  # checks each scorer file against its sha256
    for kind in KINDS:
        gate = records[kind]["gate"]
        assert gate["passed"] and 0 <= gate["worst_delta_recall"] <= 1.0
        assert gate["reference"]["t2i"]["r10"] > 8.0  # far from chance: losses can show
        assert 0 < gate["max_abs_error"] < 0.05  # quantized, but close
        entry = bundle.int8_scorer(kind)
        assert entry["file"] == f"int8_scorer.{kind}.onnx"
        assert entry["gate"] == gate and not entry["accepted_loss"]
        assert {"name": "similarity", "dtype": "float32", "shape": ["images", "captions"]} in (
            entry["outputs"]
        )
    stored = {v["name"]: v["dtype"] for v in bundle.int8_scorer("images")["inputs"]}
    assert stored["regions"] == "uint8" and stored["words"] == "float32"
    assert lint_bundle(bundle) == []


@pytest.fixture
def fresh(trained, tmp_path):
    import shutil

    data, checkpoint, bundle = trained
    shutil.copytree(bundle, tmp_path / "bundle")
    test = load_split(data, "test")
    return (
        load_bundle(tmp_path / "bundle"),
        test,
        split_similarities(load_checkpoint(checkpoint), test),
    )


def test_a_missed_gate_writes_nothing_unless_the_loss_is_accepted(fresh, monkeypatch):
    bundle, test, reference = fresh
    monkeypatch.setitem(int8_scorer.TARGETS, Precision.INT8, -1.0)  # no scorer can meet it
    graphs, records = gate_int8_scorers(bundle, test, reference)
    assert graphs == {} and not any(r["gate"]["passed"] for r in records.values())
    write_int8_scorers(bundle, graphs, records)
    assert load_bundle(bundle.path).int8_scorer("images") is None
    graphs, records = gate_int8_scorers(bundle, test, reference, accept_loss=True)
    assert sorted(graphs) == sorted(KINDS)
    assert all(r["accepted_loss"] for r in records.values())
    write_int8_scorers(bundle, graphs, records)
    reloaded = load_bundle(bundle.path)
    assert reloaded.int8_scorer("captions")["accepted_loss"] is True


def test_non_finite_similarities_fail_the_gate(fresh, monkeypatch):
    bundle, test, reference = fresh
    broken = np.full_like(reference, np.nan)
    monkeypatch.setattr(int8_scorer, "int8_scorer_similarities", lambda *a, **k: broken)
    graphs, records = gate_int8_scorers(bundle, test, reference)
    assert graphs == {}
    gate = records["images"]["gate"]
    assert gate["worst_delta_recall"] == float("inf") and gate["variant"] is None
