"""Outputs are never lost: `--force` cannot delete a folder scan-deploy did not write, and a
`kill -9` at any point of a replace (a real subprocess killing itself at a named point through
SCAN_DEPLOY_KILL_AT) leaves the old or the new artifact whole; the next run cleans up after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scan_deploy.runtime.gallery import open_gallery

from scan_deploy.checkpoint import save_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.synth import write_synthetic
from scan_deploy.vocab import Vocabulary
from tests.cli_runner import run_cli
from tests.export.tiny_bundle import make_bundle

# The CLI with a file system that cannot swap two names (no renameat2 RENAME_EXCHANGE).
WITHOUT_EXCHANGE = (
    "import sys, scan_deploy.atomic as a; a._exchange = lambda x, y: False; "
    "from scan_deploy.cli import main; sys.argv[0] = 'scan-deploy'; main()"
)


def run_killed(*args, kill_at: str, exchange: bool = True, cwd=None):
    """The CLI, killing itself (SIGKILL) at `kill_at`."""
    prefix = ["-m", "scan_deploy"] if exchange else ["-c", WITHOUT_EXCHANGE]
    return subprocess.run(
        [sys.executable, *prefix, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "SCAN_DEPLOY_KILL_AT": kill_at},
    )


def one_line_error(result, *fragments) -> str:
    assert result.returncode == 2, result.stderr
    # Warnings may come first (here: what a killed run left, cleaned up).
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(checkpoint folder, bundle folder, features of 3 images, features of 5 images)."""
    root = tmp_path_factory.mktemp("outputs")
    bundle = make_bundle(root / "bundle")
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(12))], threshold=1)
    torch.manual_seed(0)
    model = SCAN(ModelConfig(vocab_size=len(vocab), img_dim=10, embed_size=8, word_dim=6))
    save_checkpoint(root / "ckpt", model, vocab)
    rng = np.random.default_rng(0)
    for n in (3, 5):
        np.save(root / f"ims{n}.npy", rng.standard_normal((n, 5, 10)).astype(np.float32))
    return root / "ckpt", bundle, root / "ims3.npy", root / "ims5.npy"


def _users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("more")
    return folder


def test_export_force_into_the_current_folder_deletes_nothing(artifacts, tmp_path):
    ckpt = artifacts[0]
    folder = _users_folder(tmp_path)
    result = run_cli("export", ckpt, "--out", ".", "--force", "--max-words", "7", cwd=folder)
    one_line_error(result, "is the current folder")
    assert names(folder) == ["notes", "thesis.tex"]
    result = run_cli("export", ckpt, "--out", "..", "--force", cwd=folder / "notes")
    one_line_error(result, "is the current folder")
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_index_force_into_the_current_folder_deletes_nothing(artifacts, tmp_path):
    _, bundle, ims3, _ = artifacts
    folder = _users_folder(tmp_path)
    result = run_cli("index", bundle, "--features", ims3, "--out", ".", "--force", cwd=folder)
    one_line_error(result, "is the current folder")
    assert names(folder) == ["notes", "thesis.tex"]


def test_force_never_replaces_a_folder_scan_deploy_did_not_write(artifacts, tmp_path):
    ckpt, bundle, ims3, _ = artifacts
    folder = _users_folder(tmp_path)
    for args in (
        ("export", ckpt, "--out", folder, "--force"),
        ("index", bundle, "--features", ims3, "--out", folder, "--force"),
        (
            "convert",
            ckpt / "model.safetensors",
            "--vocab",
            ckpt / "vocab.json",
            "--out",
            folder,
            "--force",
        ),  # fmt: skip
    ):
        one_line_error(run_cli(*args), str(folder), "refusing to replace")
    assert names(folder) == ["notes", "thesis.tex"]


def test_an_output_holding_the_inputs_is_refused(artifacts, tmp_path):
    _, bundle, _, _ = artifacts
    data = tmp_path / "gallery"
    data.mkdir()
    np.save(data / "ims.npy", np.zeros((2, 5, 10), np.float32))
    result = run_cli("index", bundle, "--features", data / "ims.npy", "--out", data, "--force")
    one_line_error(result, "holds the input")
    assert names(data) == ["ims.npy"]


def test_index_force_keeps_the_torch_backends_checkpoint(artifacts, tmp_path):
    """A checkpoint kept in the gallery folder was deleted with the old gallery."""
    ckpt, bundle, ims3, _ = artifacts
    gallery = tmp_path / "gallery"
    assert run_cli("index", bundle, "--features", ims3, "--out", gallery).returncode == 0
    shutil.copytree(ckpt, gallery / "ckpt")
    result = run_cli("index", bundle, "--features", ims3, "--out", gallery, "--force",
                     "--backend", "torch", "--checkpoint", gallery / "ckpt")  # fmt: skip
    one_line_error(result, str(gallery), f"holds the input {gallery / 'ckpt'}")
    assert (gallery / "ckpt" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kill_at", "exchange", "survivor"),
    [
        ("replace:staged", True, 3),
        ("replace:swapped", True, 5),
        ("replace:staged", False, 3),
        ("replace:aside", False, 3),
        ("replace:swapped", False, 5),
    ],
)
def test_kill_during_index_force_leaves_a_whole_gallery(
    artifacts, tmp_path, kill_at, exchange, survivor
):
    _, bundle, ims3, ims5 = artifacts
    out = tmp_path / "gallery"
    assert run_cli("index", bundle, "--features", ims3, "--out", out).returncode == 0
    killed = run_killed(
        "index", bundle, "--features", ims5, "--out", out, "--force",
        kill_at=f"{kill_at}@gallery", exchange=exchange,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    if kill_at != "replace:aside":  # there the old gallery waits under its aside name
        assert open_gallery(out / "images").count == survivor
    # The next write of the gallery puts an old one left aside back, then removes the rest.
    again = run_cli("index", bundle, "--features", ims3, "--out", out, "--force")
    assert again.returncode == 0, again.stderr
    assert "removed temporary files left by killed runs" in again.stderr
    assert names(tmp_path) == ["gallery"]
    assert open_gallery(out / "images").count == 3


def test_a_gallery_left_aside_is_restored_by_the_next_write(artifacts, tmp_path):
    _, bundle, ims3, ims5 = artifacts
    out = tmp_path / "gallery"
    assert run_cli("index", bundle, "--features", ims3, "--out", out).returncode == 0
    killed = run_killed(
        "index", bundle, "--features", ims5, "--out", out, "--force",
        kill_at="replace:aside@gallery", exchange=False,
    )  # fmt: skip
    assert killed.returncode == -9
    assert not out.exists()
    (aside,) = (p for p in tmp_path.iterdir() if p.name.endswith(".old"))
    assert open_gallery(aside / "images").count == 3  # whole, under the aside name
    # Refused for a reason that has nothing to do with the gallery: still restored first.
    result = run_cli("index", bundle, "--features", ims5, "--out", out)
    one_line_error(result, "not empty")
    assert open_gallery(out / "images").count == 3
    assert names(tmp_path) == ["gallery"]


TRAIN = ("--epochs", "2", "--batch-size", "8", "--embed-size", "8", "--word-dim", "4",
         "--val-images", "10", "--lr-update", "1")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("train") / "data"
    write_synthetic(data, train=12, dev=10, test=2, img_dim=8, regions=6, seed=0)
    return data


def test_a_kill_while_last_is_replaced_leaves_a_resumable_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    killed = run_killed(
        "train", "--data", tiny_data, "--out", run, *TRAIN, kill_at="replace:swapped@last"
    )
    assert killed.returncode == -9, killed.stderr
    # Epoch 0's last/ was replaced by epoch 1's, the old one not yet removed.
    assert (run / "last" / "train_state.json").is_file()
    resumed = run_cli("train", "--data", tiny_data, "--out", run, *TRAIN, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert names(run) == ["last", "model_best"]


def test_a_run_killed_before_its_first_last_is_never_silently_replaced(tiny_data, tmp_path):
    run = tmp_path / "run"
    killed = run_killed(
        "train", "--data", tiny_data, "--out", run, *TRAIN, kill_at="replace:staged@last"
    )
    assert killed.returncode == -9, killed.stderr
    assert (run / "model_best").is_dir() and not (run / "last").exists()
    best = (run / "model_best" / "model.safetensors").read_bytes()
    one_line_error(run_cli("train", "--data", tiny_data, "--out", run, *TRAIN), "already holds")
    one_line_error(
        run_cli("train", "--data", tiny_data, "--out", run, *TRAIN, "--resume"), "no last/"
    )
    assert (run / "model_best" / "model.safetensors").read_bytes() == best


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_train_refuses_an_out_that_is_a_file_before_training(tiny_data, tmp_path, where):
    """It failed with "File exists" (or "Not a directory") after a whole epoch."""
    (tmp_path / "notes.txt").write_text("keep")
    out = tmp_path / "notes.txt" if where == "file" else tmp_path / "notes.txt" / "run"
    result = run_cli("train", "--data", tiny_data, "--out", out, *TRAIN)
    line = one_line_error(result, f"{tmp_path / 'notes.txt'}: is a file, expected a folder")
    assert "--out" in line and "epoch" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep"
