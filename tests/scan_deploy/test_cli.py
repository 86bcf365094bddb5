"""The command line end to end on a tiny synthetic set, and its handling of user mistakes."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from scan_deploy import __version__
from scan_deploy.extras import missing_extra
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
        "--json",
    )
    assert synth.returncode == 0, synth.stderr
    assert json.loads(synth.stdout) == {
        "out": str(data),
        "images": {"train": 40, "dev": 10, "test": 10},
        "img_dim": 16,
        "regions": 36,
        "vocab_size": json.loads((data / "synth_vocab.json").read_text())["idx"],
    }
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


def test_train_json_is_the_only_stdout(trained, tmp_path):
    data, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    args = ("--batch-size", 32, "--embed-size", 8, "--word-dim", 6, "--val-images", 10, "--bi-gru")
    result = run(
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--epochs",
        2,
        *args,
        "--resume",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # progress and epoch lines went to stderr
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1] and "epoch 1" in result.stderr
    assert summary["best"] == str(tmp_path / "run" / "model_best")
    assert summary["best_rsum"] == max(e["rsum"] for e in summary["epochs"])
    assert set(summary["epochs"][1]["metrics"]) >= {"i2t", "t2i", "rsum"}


def test_evaluate_json_and_table(trained, tmp_path):
    data, run_dir = trained
    result = run("evaluate", run_dir / "model_best", "--data", data, "--split", "test", "--json",
                 "--plot", tmp_path / "recall.png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    _one_line_error(  # before training (it failed with "File exists" after an epoch)
        run("train", "--data", data, "--out", data / "synth.json"), "synth.json: is a file"
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
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(tmp_path / "converted") and summary["epoch"] == 0
    assert summary["vocab_size"] == ours.config.vocab_size
    assert summary["config"] == ours.config.to_dict()
    a = run("evaluate", tmp_path / "converted", "--data", data, "--json")
    b = run("evaluate", run_dir / "model_best", "--data", data, "--json")
    assert json.loads(a.stdout) == json.loads(b.stdout)
    # Without --vocab, the original checkpoint's vocabulary is the one in --data.
    c = run("evaluate", tmp_path / "model_best.pth.tar", "--data", data, "--json")
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout) == json.loads(b.stdout)
    original["opt"].data_name = "f30k_precomp"
    torch.save(original, tmp_path / "model_best.pth.tar")
    _one_line_error(
        run("evaluate", tmp_path / "model_best.pth.tar", "--data", data),
        "model_best.pth.tar: an original SCAN checkpoint needs its vocabulary: pass --vocab FILE",
        "expected f30k_precomp_vocab.json, found synth_vocab.json",
    )


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
    features, captions = data / "test_ims.npy", data / "test_caps.txt"
    gallery = tmp_path / "gallery"
    indexed = run(
        "index", bundle, "--features", features, "--captions", captions, "--out", gallery, "--json"
    )
    assert indexed.returncode == 0, indexed.stderr
    summary = json.loads(indexed.stdout)
    assert summary.pop("backend").startswith("onnxruntime (")  # as `bench` names it
    assert summary == {
        "out": str(gallery),
        "images": 10,
        "captions": 50,
        "dtype": "fp16",
        "precision": "fp32",
        "first_stages": {"images": {}, "captions": {}},
    }
    scorer = bundle / "scorer.onnx"
    scorer.write_bytes(scorer.read_bytes()[:100])
    _one_line_error(run("check", bundle), "scorer.onnx", "sha256")
    _one_line_error(
        run("export", run_dir / "model_best", "--out", tmp_path / "b2", "--opset", 9),
        "opset: got 9",
        "13",
    )


def _run_without(module: str, *args) -> subprocess.CompletedProcess:
    """The CLI as if `module` were not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['scan-deploy', *{args!r}];"
        "from scan_deploy.cli import main; main()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_missing_module_names_its_extra_and_other_modules_are_bugs():
    _one_line_error(
        _run_without("safetensors", "evaluate", "ckpt", "--data", "d"),
        "`scan-deploy evaluate` needs safetensors: pip install 'scan-deploy[reference]'",
    )
    calibrate = missing_extra(ModuleNotFoundError(name="onnxruntime.quantization"), "sd calibrate")
    assert str(calibrate) == (
        "`sd calibrate` needs ONNX Runtime: pip install 'scan-deploy[export]' or 'scan-deploy[gpu]'"
    )
    bug = _run_without("scan_deploy.train", "train", "--data", "d", "--out", "o")
    assert bug.returncode == 1 and "ModuleNotFoundError" in bug.stderr  # a bug is not hidden
