"""The command line end to end on a tiny synthetic set, and its handling of user mistakes."""

import json

import numpy as np
import pytest

from scan_deploy import __version__
from tests.cli_runner import run_cli as run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, run_dir = root / "data", root / "run"
    synth = run(
        "data",
        "synth",
        "--out",
        data,
        "--train",
        40,
        "--dev",
        10,
        "--test",
        10,
        "--img-dim",
        16,
        "--seed",
        1,
    )
    assert synth.returncode == 0, synth.stderr
    train = run(
        "train",
        "--data",
        data,
        "--out",
        run_dir,
        "--epochs",
        1,
        "--batch-size",
        32,
        "--embed-size",
        8,
        "--word-dim",
        6,
        "--val-images",
        10,
        "--bi-gru",
    )
    assert train.returncode == 0, train.stderr
    assert "epoch 0" in train.stdout
    return data, run_dir


def test_version_and_help():
    assert run("--version").stdout.strip() == f"scan-deploy {__version__}"
    for command in ([], ["data", "synth"], ["train"], ["evaluate"], ["convert"]):
        result = run(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout


def test_evaluate_json_and_table(trained):
    data, run_dir = trained
    result = run("evaluate", run_dir / "model_best", "--data", data, "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 10 and metrics["captions"] == 50
    assert set(metrics["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert metrics["rsum"] == pytest.approx(
        sum(metrics[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    )
    table = run("evaluate", run_dir / "model_best", "--data", data, "--ensemble", run_dir / "last")
    assert table.returncode == 0 and "image→text" in table.stdout and "rsum" in table.stdout


def test_fold5_needs_a_multiple_of_five(trained):
    data, run_dir = trained
    result = run("evaluate", run_dir / "model_best", "--data", data, "--fold5", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["folds"]) == 5


def _one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_user_mistakes_are_one_line_errors(trained, tmp_path):
    data, run_dir = trained
    _one_line_error(run("evaluate", tmp_path / "nope", "--data", data), "nope", "not found")
    _one_line_error(
        run("evaluate", run_dir / "model_best", "--data", data, "--split", "val"),
        "val_ims.npy",
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("synth_vocab.json", "test_caps.txt"):
        (bad / name).write_bytes((data / name).read_bytes())
    features = np.load(data / "test_ims.npy")
    np.save(bad / "test_ims.npy", features[:, :, :8])
    _one_line_error(
        run("evaluate", run_dir / "model_best", "--data", bad), "test_ims.npy", "img_dim", "16"
    )
    features[3, 0, 0] = np.nan
    np.save(bad / "test_ims.npy", features)
    _one_line_error(run("evaluate", run_dir / "model_best", "--data", bad), "test_ims.npy", "3")
    _one_line_error(
        run("train", "--data", data, "--out", tmp_path / "r", "--agg-func", "Median"),
        "agg_func",
        "LogSumExp",
    )
    assert not (tmp_path / "r").exists()
    _one_line_error(
        run("train", "--data", data, "--out", run_dir), str(run_dir), "already holds a training run"
    )
    _one_line_error(
        run("train", "--data", data, "--out", tmp_path / "r", "--device", "cuda"), "--device: cuda"
    )


def test_convert_refuses_to_overwrite(trained, tmp_path):
    data, run_dir = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"")
    _one_line_error(
        run(
            "convert",
            tmp_path / "x.pth.tar",
            "--vocab",
            data / "synth_vocab.json",
            "--out",
            tmp_path / "out",
        ),
        "not empty (pass --force",
    )


def test_convert_original_checkpoint_then_evaluate(trained, tmp_path):
    import argparse

    import torch

    from scan_deploy.checkpoint import load_checkpoint

    data, run_dir = trained
    ours = load_checkpoint(run_dir / "model_best")
    state = ours.model.state_dict()
    original = {
        "model": [
            {k.removeprefix("img_enc."): v for k, v in state.items() if k.startswith("img_enc.")},
            {k.removeprefix("txt_enc."): v for k, v in state.items() if k.startswith("txt_enc.")},
        ],
        "opt": argparse.Namespace(**ours.config.to_dict(), lr_update=15),
        "epoch": 0,
        "best_rsum": 1.0,
        "Eiters": 2,
    }
    torch.save(original, tmp_path / "model_best.pth.tar")
    result = run(
        "convert",
        tmp_path / "model_best.pth.tar",
        "--vocab",
        data / "synth_vocab.json",
        "--out",
        tmp_path / "converted",
    )
    assert result.returncode == 0, result.stderr
    a = run("evaluate", tmp_path / "converted", "--data", data, "--json")
    b = run("evaluate", run_dir / "model_best", "--data", data, "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_export_compare_check(trained, tmp_path):
    data, run_dir = trained
    bundle = tmp_path / "bundle"
    exported = run(
        "export",
        run_dir / "model_best",
        "--out",
        bundle,
        "--max-batch",
        16,
        "--max-words",
        32,
        "--json",
    )
    assert exported.returncode == 0, exported.stderr
    assert all(row["max_abs"] <= row["tolerance"] for row in json.loads(exported.stdout))
    _one_line_error(run("export", run_dir / "model_best", "--out", bundle), "not empty", "--force")
    compared = run("compare", bundle, run_dir / "model_best", "--data", data, "--json")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["passed"] and report["onnxruntime"] == report["pytorch"]
    checked = run("check", bundle, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout) == {
        "passed": True,
        "findings": [],
    }
    dla = run("check", bundle, "--dla", "--json")
    assert dla.returncode == 1
    messages = [
        f["message"] for f in json.loads(dla.stdout)["findings"] if f["severity"] == "error"
    ]
    assert messages and all("DLA needs a static profile" in m for m in messages)
    scorer = bundle / "scorer.onnx"
    scorer.write_bytes(scorer.read_bytes()[:100])
    _one_line_error(run("check", bundle), "scorer.onnx", "sha256")
    _one_line_error(
        run("export", run_dir / "model_best", "--out", tmp_path / "b2", "--opset", 9),
        "--opset",
        "13",
    )
