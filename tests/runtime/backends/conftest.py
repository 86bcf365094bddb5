"""Tiny seeded bundles with the checkpoints they were exported from (for the torch backend)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scan_deploy.bundle import Bundle, load_bundle


@dataclass(frozen=True)
class Tiny:
    bundle: Bundle
    checkpoint: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """tests/export/tiny_bundle.py's bundle (t2i, LogSumExp) and its checkpoint. make_bundle does
    not save the model it exports; it is SCAN(config) initialised after torch.manual_seed(0), so
    the same recipe saves the same weights (the torch-vs-ORT parity tests would show a drift)."""
    torch = pytest.importorskip("torch")
    from scan_deploy.checkpoint import save_checkpoint
    from scan_deploy.model import SCAN

    from ...export.tiny_bundle import make_bundle

    root = tmp_path_factory.mktemp("backends")
    bundle = load_bundle(make_bundle(root / "bundle"))
    torch.manual_seed(0)
    save_checkpoint(root / "checkpoint", SCAN(bundle.config).eval(), bundle.vocab)
    return Tiny(bundle, root / "checkpoint")


@pytest.fixture(scope="session")
def tiny_i2t(tmp_path_factory) -> Tiny:
    """An i2t variant (bi-GRU, Mean aggregation, softmax norm): the scorer takes caption_gram."""
    pytest.importorskip("torch")
    from ..tiny_i2t import make_i2t_bundle

    bundle, checkpoint = make_i2t_bundle(tmp_path_factory.mktemp("backends_i2t"))
    return Tiny(load_bundle(bundle), checkpoint)


def copy_bundle(bundle: Bundle, target: Path) -> Path:
    """A private copy, for tests that add engines or variants."""
    shutil.copytree(bundle.path, target)
    return target


def encoder_inputs(
    bundle: Bundle, batch: int = 6, seed: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded features (batch, R, img_dim), tokens (batch, max words) and lengths covering 1 and
    the maximum (padding ids 0)."""
    rng = np.random.default_rng(seed)
    regions = bundle.manifest["shape_ranges"]["regions"]["opt"]
    words = bundle.manifest["shape_ranges"]["words"]["max"]
    features = rng.random((batch, regions, bundle.config.img_dim), dtype=np.float32)
    lengths = rng.integers(1, words + 1, size=batch).astype(np.int64)
    lengths[0], lengths[-1] = words, 1
    tokens = rng.integers(1, bundle.config.vocab_size, size=(batch, words)).astype(np.int64)
    tokens[np.arange(words)[None] >= lengths[:, None]] = 0
    return features, tokens, lengths


def run_pipeline(backend, features, tokens, lengths) -> dict[str, list[np.ndarray]]:
    """The three runners as the runtime chains them: the scorer on the encoders' outputs."""
    image = backend.runner("image_encoder").run({"features": features})
    text = backend.runner("text_encoder").run({"tokens": tokens, "lengths": lengths})
    feeds = {
        "regions": image[0],
        "region_gram": image[1],
        "words": text[0],
        "caption_gram": text[1],
        "lengths": lengths,
    }
    return {
        "image_encoder": image,
        "text_encoder": text,
        "scorer": backend.runner("scorer").run(feeds),
    }
