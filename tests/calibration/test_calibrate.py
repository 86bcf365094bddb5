"""`calibrate_bundle` end to end on a small trained model: gates met on the synthetic benchmark,
variants written and hashed, calibration cached, refusals that write nothing."""

import json
import shutil

import numpy as np
import pytest
from scan_deploy.calibration import calibrate as calibrate_module
from scan_deploy.calibration.calibrate import CalibrationSettings, calibrate_bundle
from scan_deploy.calibration.data import sample_split
from scan_deploy.export.lint import lint_bundle

from scan_deploy.bundle import MANIFEST, load_bundle
from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.choices import Graph, Precision
from scan_deploy.errors import UserError
from scan_deploy.precomp import load_split
from tests.cli_runner import run_cli

SAMPLES = 200


@pytest.fixture
def setup(trained, tmp_path):
    """A private copy of the trained bundle, its checkpoint and the train/test splits."""
    data, checkpoint, bundle = trained
    shutil.copytree(bundle, tmp_path / "bundle")
    splits = load_split(data, "train"), load_split(data, "test")
    return load_bundle(tmp_path / "bundle"), load_checkpoint(checkpoint), *splits


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variant_meets_its_target_and_is_recorded(setup, precision):
    bundle, checkpoint, train, test = setup
    report = calibrate_bundle(
        bundle, checkpoint, train, test, CalibrationSettings(precision, samples=SAMPLES)
    )
    gate = report["gate"]
    assert report["written"] and report["refused"] is None
    assert gate["passed"] and gate["worst_delta_recall"] <= {"fp16": 0.3, "int8": 1.0}[precision]
    assert gate["reference"]["t2i"]["r10"] > 8.0  # chance is 2.5: precision losses can show
    errors = {(g["graph"], g["output"]): g for g in gate["graphs"]}
    assert errors["scorer", "similarity"]["cosine"] > 0.999
    assert errors["image_encoder", "regions"]["max_abs"] < {"fp16": 1e-2, "int8": 0.1}[precision]
    reloaded = load_bundle(bundle.path)  # checks every variant file against its sha256
    assert reloaded.precisions() == ["fp32", precision]
    for name in Graph:
        assert reloaded.graph_path(name, precision).name == f"{name}.{precision}.onnx"
    assert lint_bundle(reloaded) == []
    variant = reloaded.manifest["variants"][precision]
    assert variant["calibration"]["samples"] == SAMPLES
    assert variant["gate"]["delta_recall"] == gate["delta_recall"]
    scorers = report.get("int8_scorers", {})  # int8 also gates the int8-gallery scorers
    assert sorted(scorers) == ([] if precision == "fp16" else ["captions", "images"])
    for kind, scorer in scorers.items():
        assert scorer["written"] and scorer["gate"]["passed"]
        assert reloaded.int8_scorer(kind)["gate"] == scorer["gate"]


def _padded(split, folder, name: str):
    """The split with each image's regions past a random count (2 to R) zeroed: adaptive
    features, zero-padded."""
    features = np.array(split.images, np.float32)
    counts = np.random.default_rng(len(name)).integers(2, split.num_regions + 1, len(features))
    features[np.arange(split.num_regions)[None] >= counts[:, None]] = 0
    folder.mkdir(exist_ok=True)
    np.save(folder / f"{name}_ims.npy", features)
    (folder / f"{name}_caps.txt").write_text("".join(c + "\n" for c in split.captions))
    return load_split(folder, name)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variants_of_padded_images_meet_their_target(setup, tmp_path, precision):
    """Images of 2 to 8 regions (zero-padded): the variants and the int8 scorers mask the
    padding as the FP32 reference does, within their gates."""
    bundle, checkpoint, train, test = setup
    train, test = _padded(train, tmp_path, "train"), _padded(test, tmp_path, "test")
    assert train.padded and test.padded
    settings = CalibrationSettings(precision, samples=SAMPLES)
    report = calibrate_bundle(bundle, checkpoint, train, test, settings)
    assert report["written"] and report["gate"]["passed"]
    assert report["gate"]["reference"]["t2i"]["r10"] > 8.0
    for scorer in report.get("int8_scorers", {}).values():
        assert scorer["gate"]["passed"]


def test_int8_calibration_is_cached(setup, monkeypatch):
    bundle, checkpoint, train, test = setup
    settings = CalibrationSettings("int8", samples=SAMPLES)
    calibrate_bundle(bundle, checkpoint, train, test, settings)
    caches = sorted((bundle.path / "calibration").iterdir())
    assert [c.name.split(".")[:2] for c in caches] == [
        ["image_encoder", "max"],
        ["scorer", "max"],
        ["text_encoder", "max"],
    ]
    first = (bundle.path / "scorer.int8.onnx").read_bytes()

    def no_feeds(*args, **kwargs):
        raise AssertionError("calibration data read again despite the cache")

    monkeypatch.setattr(calibrate_module, "image_feeds", no_feeds)
    calibrate_bundle(load_bundle(bundle.path), checkpoint, train, test, settings)
    assert sorted((bundle.path / "calibration").iterdir()) == caches
    assert (bundle.path / "scorer.int8.onnx").read_bytes() == first
    other_seed = CalibrationSettings("int8", samples=SAMPLES, seed=1)
    with pytest.raises(AssertionError, match="read again"):
        calibrate_bundle(load_bundle(bundle.path), checkpoint, train, test, other_seed)


def test_missed_target_writes_nothing_unless_loss_accepted(setup, monkeypatch):
    bundle, checkpoint, train, test = setup
    test = sample_split(test, 100, seed=0)  # refusals need no large gate
    before = (bundle.path / MANIFEST).read_bytes()
    monkeypatch.setitem(calibrate_module.TARGETS, "int8", -1.0)  # |ΔR@K| >= 0 always misses it
    monkeypatch.setattr(calibrate_module, "choose_kept", _keep_nothing)
    settings = CalibrationSettings("int8", samples=50)
    report = calibrate_bundle(bundle, checkpoint, train, test, settings)
    assert not report["written"] and "misses the -1.0 target" in report["refused"]
    assert report["accepted_loss"] is False
    assert [b["graph"] for b in report["gate"]["blame"]] != []
    assert {b["graph"] for b in report["gate"]["blame"]} == set(Graph)
    assert (bundle.path / MANIFEST).read_bytes() == before
    assert not list(bundle.path.glob("*.int8.onnx"))
    accepted = CalibrationSettings("int8", samples=50, accept_loss=True)
    report = calibrate_bundle(load_bundle(bundle.path), checkpoint, train, test, accepted)
    assert report["written"] and report["accepted_loss"] is True
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    assert manifest["variants"]["int8"]["accepted_loss"] is True


def test_a_crash_while_recalibrating_leaves_a_loadable_bundle(setup, monkeypatch):
    bundle, checkpoint, train, test = setup
    test = sample_split(test, 100, seed=0)
    settings = CalibrationSettings("fp16", samples=50)
    calibrate_bundle(bundle, checkpoint, train, test, settings)
    saved = []

    def crash_on_second_graph(model, path):
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(path)
        onnx_save(model, path)

    onnx_save = calibrate_module.onnx.save_model
    monkeypatch.setattr(calibrate_module.onnx, "save_model", crash_on_second_graph)
    with pytest.raises(OSError):
        calibrate_bundle(load_bundle(bundle.path), checkpoint, train, test, settings)
    reloaded = load_bundle(bundle.path)  # the old fp16 entry was dropped before any file changed
    assert reloaded.precisions() == ["fp32"]


def test_variant_that_keeps_everything_is_refused(setup, monkeypatch):
    bundle, checkpoint, train, test = setup
    test = sample_split(test, 100, seed=0)
    monkeypatch.setitem(calibrate_module.TARGETS, "int8", -1.0)  # nothing can meet it
    settings = CalibrationSettings("int8", samples=50, accept_loss=True)
    report = calibrate_bundle(bundle, checkpoint, train, test, settings)
    assert len(report["kept_higher_precision"]) == 5  # every MatMul was moved back to float
    assert not report["written"] and "would be FP32" in report["refused"]
    assert "variants" not in load_bundle(bundle.path).manifest


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="^precision: got 'int4', expected one of fp16, int8$"):
        CalibrationSettings("int4")
    with pytest.raises(UserError, match="^precision: got 'fp32', expected one of fp16, int8$"):
        CalibrationSettings(Precision.FP32)
    with pytest.raises(UserError, match="^method: got 'mse'"):
        CalibrationSettings("int8", method="mse")
    assert CalibrationSettings("fp16").precision is Precision.FP16


def _keep_nothing(units, build, measure, target):
    from scan_deploy.calibration.search import Decision

    return Decision(kept=[])


def test_calibrate_command(trained, tmp_path):
    data, checkpoint, bundle = trained
    shutil.copytree(bundle, tmp_path / "bundle")
    out = run_cli("calibrate", tmp_path / "bundle", "--data", data, "--precision", "fp16",
               "--samples", 50, "--json", "--plot", tmp_path / "gate.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.stdout)  # the checkpoint defaults to the bundle's source
    assert report["written"] and report["gate"]["split_images"] == 400
    table = run_cli("calibrate", tmp_path / "bundle", "--data", data, "--precision", "int8",
                 "--checkpoint", checkpoint, "--samples", 50)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "error vs the FP32 PyTorch reference" in table.stdout and "PASSED" in table.stdout
    assert "int8 scorers (int8 galleries" in table.stdout and "PASSED, written" in table.stdout
    assert load_bundle(tmp_path / "bundle").precisions() == ["fp32", "fp16", "int8"]
    bad = run_cli("calibrate", tmp_path / "bundle", "--data", data, "--precision", "fp32")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: precision: got 'fp32', expected one of fp16, int8"
    ]
    missing = run_cli("calibrate", tmp_path / "bundle", "--data", data,
                   "--checkpoint", tmp_path / "nothing")  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
