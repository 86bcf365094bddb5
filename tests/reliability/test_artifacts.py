"""Artifacts made from other artifacts are checked, from the command line: a truncated INT8
calibration cache is rebuilt (one warning) instead of blocking `calibrate`; the torch backend
refuses a checkpoint whose weights are not the bundle's (one line, nothing written) and opens a
bundle that records no weights digest with one warning; `bench` refuses a batch too large to
report on in one line instead of running for minutes without a word."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scan_deploy.export.writer import ShapeRanges, export_bundle
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.indexer import index_gallery

from scan_deploy.bundle import MANIFEST, load_bundle
from scan_deploy.checkpoint import load_checkpoint, save_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.precomp import find_vocab
from scan_deploy.synth import write_synthetic
from scan_deploy.vocab import Vocabulary
from tests.cli_runner import run_cli


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Tiny synthetic data (R=6, img_dim 12), a seeded untrained checkpoint, the bundle exported
    from it, a checkpoint of the same config and vocabulary with other weights, and a gallery."""
    root = tmp_path_factory.mktemp("artifacts")
    write_synthetic(root / "data", train=40, dev=10, test=60, img_dim=12, regions=6, seed=3)
    vocab = Vocabulary.load(find_vocab(root / "data"))
    config = ModelConfig(vocab_size=len(vocab), img_dim=12, embed_size=8, word_dim=6)
    for name, seed in (("ckpt", 0), ("other", 5)):
        torch.manual_seed(seed)
        save_checkpoint(root / name, SCAN(config).eval(), vocab)
    ranges = ShapeRanges.create(16, 6, 30)
    export_bundle(load_checkpoint(root / "ckpt"), root / "bundle", 17, ranges)
    bundle = load_bundle(root / "bundle")
    index_gallery(bundle, open_backend(bundle), root / "data" / "test_ims.npy",
                  root / "data" / "test_caps.txt", root / "gallery", dtype="fp32")  # fmt: skip
    return {name: root / name for name in ("data", "ckpt", "other", "bundle", "gallery")}


def error_line(result) -> str:
    """The one line on stderr of a command that failed on a user's input."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def warnings(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_calibrate_rebuilds_a_truncated_int8_cache(made, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    args = ("calibrate", bundle, "--data", made["data"], "--precision", "int8", "--samples", 20,
            "--eval-split", "dev", "--accept-loss", "--json")  # fmt: skip
    first = run_cli(*args)
    assert first.returncode in (0, 1) and warnings(first) == [], first.stderr
    caches = sorted((bundle / "calibration").iterdir())
    assert [c.name.split(".")[0] for c in caches] == ["image_encoder", "scorer", "text_encoder"]
    cache = caches[1]
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 3])  # a run killed while an old version wrote it
    again = run_cli(*args)
    assert again.returncode == first.returncode, again.stderr
    [warning] = warnings(again)
    assert warning.startswith(f"warning: {cache}: unusable calibration cache (invalid JSON (")
    assert warning.endswith("): ignored, calibrating again")
    assert json.loads(cache.read_bytes()) == json.loads(whole)  # rebuilt: the same ranges
    assert sorted((bundle / "calibration").iterdir()) == caches  # no temporary files left
    assert json.loads(again.stdout)["gate"] == json.loads(first.stdout)["gate"]
    assert warnings(run_cli(*args)) == []  # and used as it is from then on


def test_torch_backend_refuses_a_checkpoint_with_other_weights(made, tmp_path):
    out = tmp_path / "gallery"
    features = ("--features", made["data"] / "test_ims.npy")
    done = run_cli("index", made["bundle"], *features, "--out", out, "--backend", "torch",
                   "--checkpoint", made["other"])  # fmt: skip
    line = error_line(done)
    assert line.startswith(
        f"error: {made['other']}: not the checkpoint of {made['bundle'] / MANIFEST}: its "
        "weights digest is "
    )
    recorded = json.loads((made["bundle"] / MANIFEST).read_text())["weights"]["sha256"]
    assert line.endswith(f", the bundle was exported from weights with digest {recorded[:12]}…")
    assert list(tmp_path.iterdir()) == []  # nothing written
    done = run_cli("index", made["bundle"], *features, "--out", out, "--backend", "torch",
                   "--checkpoint", made["ckpt"])  # fmt: skip
    assert done.returncode == 0 and warnings(done) == [], done.stderr


def test_bundle_without_weights_digest_opens_with_one_warning(made, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.pop("weights", None)  # as exported before the digest was recorded
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    done = run_cli("index", bundle, "--features", made["data"] / "test_ims.npy",
                   "--out", tmp_path / "gallery", "--backend", "torch",
                   "--checkpoint", made["other"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert warnings(done) == [
        f"warning: {bundle / MANIFEST}: records no weights digest (exported before bundles "
        f"recorded one): cannot check that {made['other']} holds the bundle's weights (re-export "
        "the bundle to record it)"
    ]
    assert (tmp_path / "gallery" / "images").is_dir()


def test_bench_refuses_a_batch_too_large_in_one_line(made):
    done = run_cli("bench", made["gallery"], "--batch", 8, "--batch", 100_000)
    assert error_line(done) == (
        "error: batch_sizes: expected 1 to 4096 queries per call, got 100000 (the retriever scores "
        "queries in batches the engine takes: larger calls only repeat those)"
    )
