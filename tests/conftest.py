"""Fixtures shared across the test packages."""

from __future__ import annotations

from pathlib import Path

import pytest
from scan_deploy.export.writer import ShapeRanges, export_bundle

from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.precomp import find_vocab, load_split
from scan_deploy.synth import write_synthetic
from scan_deploy.train import BEST, Trainer, TrainOptions
from scan_deploy.vocab import Vocabulary


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data folder, checkpoint folder, exported bundle folder) of a small model trained for 3
    epochs on a harder synthetic set, so that Recall@K is far from chance: precision losses and
    retrieval mistakes can show."""
    root = tmp_path_factory.mktemp("trained")
    write_synthetic(
        root / "data", train=400, dev=50, test=400, img_dim=32, regions=8, seed=5, noise=0.5
    )
    vocab = Vocabulary.load(find_vocab(root / "data"))
    config = ModelConfig(vocab_size=len(vocab), img_dim=32, embed_size=32, word_dim=16)
    options = TrainOptions(epochs=3, batch_size=32, lr=2e-3, lr_update=3, val_images=50)
    splits = load_split(root / "data", "train"), load_split(root / "data", "dev")
    Trainer(root / "run", *splits, vocab, config, options).fit()
    checkpoint = load_checkpoint(root / "run" / BEST)
    export_bundle(checkpoint, root / "bundle", 17, ShapeRanges.create(16, 8, 30))
    return root / "data", root / "run" / BEST, root / "bundle"


@pytest.fixture(scope="session")
def int8_scored(trained, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the trained bundle with both int8-gallery scorers gated on the test split and
    recorded (what `calibrate --precision int8` adds), and their gate records."""
    import shutil

    from scan_deploy.calibration.calibrate import write_int8_scorers
    from scan_deploy.calibration.int8_scorer import gate_int8_scorers

    from scan_deploy.bundle import load_bundle
    from scan_deploy.evaluate import split_similarities

    data, checkpoint, bundle_path = trained
    copy = tmp_path_factory.mktemp("int8_scored") / "bundle"
    shutil.copytree(bundle_path, copy)
    bundle, test = load_bundle(copy), load_split(data, "test")
    reference = split_similarities(load_checkpoint(checkpoint), test)
    graphs, records = gate_int8_scorers(bundle, test, reference)
    write_int8_scorers(bundle, graphs, records)
    return copy, records
