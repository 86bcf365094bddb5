"""Bundles exported from seeded, untrained tiny models (img_dim 12, D 8, R 6)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from scan_deploy.export.writer import ShapeRanges, export_bundle

from scan_deploy.bundle import Bundle, load_bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.choices import Graph
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.precomp import find_vocab
from scan_deploy.vocab import Vocabulary


def make_checkpoint(data: Path, path: Path, **options) -> Checkpoint:
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(vocab_size=len(vocab), img_dim=12, embed_size=8, word_dim=6, **options)
    torch.manual_seed(0)
    return Checkpoint(SCAN(config).eval(), vocab, path)


def make_bundle(data: Path, root: Path, **options) -> tuple[Bundle, Checkpoint]:
    checkpoint = make_checkpoint(data, root / "ckpt", **options)
    export_bundle(checkpoint, root / "bundle", 17, ShapeRanges.create(16, 6, 30))
    return load_bundle(root / "bundle"), checkpoint


def fp32_graphs(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(str(bundle.graph_path(name))) for name in Graph}
