"""A tiny exported bundle for the engine tests (seeded; R=5 regions, up to 7 words, batch 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from scan_deploy.export.writer import ShapeRanges, export_bundle

from scan_deploy.bundle import MANIFEST, sha256_file
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.choices import Graph
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary

RANGES = ShapeRanges.create(max_batch=8, regions=5, max_words=7)


def make_bundle(path: Path) -> Path:
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(12))], threshold=1)
    config = ModelConfig(vocab_size=len(vocab), img_dim=10, embed_size=8, word_dim=6)
    torch.manual_seed(0)
    checkpoint = Checkpoint(SCAN(config).eval(), vocab, path.parent / "ckpt", {"epoch": 1})
    export_bundle(checkpoint, path, 17, RANGES)
    return path


def add_variant(path: Path, precision: str) -> None:
    """Register copies of the FP32 graphs as a precision variant, as `calibrate` would."""
    manifest = json.loads((path / MANIFEST).read_text())
    graphs = {}
    for name in Graph:
        entry = dict(manifest["graphs"][name])
        entry["file"] = f"{name}.{precision}.onnx"
        shutil.copyfile(path / f"{name}.onnx", path / entry["file"])
        entry["sha256"] = sha256_file(path / entry["file"])
        graphs[name] = entry
    manifest.setdefault("variants", {})[precision] = {"graphs": graphs}
    (path / MANIFEST).write_text(json.dumps(manifest))
