"""A tiny seeded i2t bundle (bi-GRU, Mean aggregation, softmax norm: the scorer takes
caption_gram), with the checkpoint it was exported from; R=5 regions, up to 7 words, batch 8."""

from __future__ import annotations

from pathlib import Path

import torch
from scan_deploy.export.writer import export_bundle

from scan_deploy.checkpoint import load_checkpoint, save_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary

from ..export.tiny_bundle import RANGES


def make_i2t_bundle(root: Path) -> tuple[Path, Path]:
    """(bundle folder, checkpoint folder) under `root`."""
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(12))], threshold=1)
    config = ModelConfig(
        vocab_size=len(vocab),
        img_dim=10,
        embed_size=8,
        word_dim=6,
        bi_gru=True,
        cross_attn="i2t",
        agg_func="Mean",
        raw_feature_norm="softmax",
    )
    torch.manual_seed(1)
    save_checkpoint(root / "checkpoint", SCAN(config).eval(), vocab)
    export_bundle(load_checkpoint(root / "checkpoint"), root / "bundle", 17, RANGES)
    return root / "bundle", root / "checkpoint"
