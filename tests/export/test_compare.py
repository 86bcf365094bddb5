"""`compare_bundle` on a tiny synthetic split: ORT pipeline vs PyTorch."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scan_deploy.export.compare import compare_bundle, ort_similarities
from scan_deploy.export.verify import session
from scan_deploy.export.writer import ShapeRanges, export_bundle

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.evaluate import split_similarities
from scan_deploy.model import SCAN
from scan_deploy.precomp import find_vocab, load_split
from scan_deploy.synth import write_synthetic
from scan_deploy.vocab import Vocabulary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, train=30, dev=10, test=70, img_dim=12, regions=6, seed=2)
    return out


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_ort_pipeline_reproduces_pytorch_recall(data, tmp_path, direction):
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(
        vocab_size=len(vocab), img_dim=12, embed_size=8, word_dim=6, cross_attn=direction
    )
    torch.manual_seed(0)
    ckpt = Checkpoint(SCAN(config).eval(), vocab, tmp_path / "ckpt")
    export_bundle(ckpt, tmp_path / "bundle", 17, ShapeRanges.create(16, 6, 30))
    bundle = load_bundle(tmp_path / "bundle")
    split = load_split(data, "test")
    report = compare_bundle(bundle, ckpt, split)
    assert report["recall_identical"]
    assert report["onnxruntime"] == report["pytorch"]
    assert report["similarity_max_abs"] <= 1e-4
    assert all(row["max_abs"] <= row["tolerance"] for row in report["graphs"])
    sessions = {
        n: session(str(bundle.graph_path(n))) for n in ("image_encoder", "text_encoder", "scorer")
    }
    blocked = ort_similarities(bundle, sessions, split, batch=16)  # several blocks each way
    np.testing.assert_allclose(blocked, split_similarities(ckpt, split), atol=1e-4, rtol=0)


def test_compare_refuses_another_checkpoint(data, tmp_path):
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(vocab_size=len(vocab), img_dim=12, embed_size=8, word_dim=6)
    ckpt = Checkpoint(SCAN(config).eval(), vocab, tmp_path / "ckpt")
    export_bundle(ckpt, tmp_path / "bundle", 17, ShapeRanges.create(16, 6, 30))
    other = Checkpoint(SCAN(replace(config, agg_func="Mean")), vocab, tmp_path / "other")
    with pytest.raises(UserError, match="model config differs"):
        compare_bundle(load_bundle(tmp_path / "bundle"), other, load_split(data, "test"))
