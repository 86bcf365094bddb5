"""The ONNX scorer in ONNX Runtime against the PyTorch Gram-identity scorer."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scan_deploy.export.scorer import scorer_graph

from scan_deploy.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS, ModelConfig
from scan_deploy.scoring import caption_gram, l2norm, region_gram, score_block

R, D, T = 5, 8, 7


def _inputs(n: int, m: int, seed: int, normalize: bool = True):
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, R, D, generator=gen)
    lengths = torch.randint(1, T + 1, (m,), generator=gen)
    lengths[0] = T
    lengths[-1] = 1
    words = torch.randn(m, T, D, generator=gen)
    words[torch.arange(T)[None] >= lengths[:, None]] = 0
    if normalize:
        regions, words = l2norm(regions, -1), l2norm(words, -1)
    return regions, words, lengths


def _run(config: ModelConfig, regions, words, lengths) -> np.ndarray:
    graph = scorer_graph(config)
    onnx.checker.check_model(graph, full_check=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"regions": regions.numpy(), "words": words.numpy(), "lengths": lengths.numpy()}
    if config.cross_attn == "t2i":
        feeds["region_gram"] = region_gram(regions).numpy()
    else:
        feeds["caption_gram"] = caption_gram(words).numpy()
    return session.run(["similarity"], feeds)[0]


@pytest.mark.parametrize(
    "norm,agg,direction", list(itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS, CROSS_ATTNS))
)
def test_scorer_matches_pytorch_for_every_variant(norm, agg, direction):
    config = ModelConfig(
        vocab_size=5, embed_size=D, raw_feature_norm=norm, agg_func=agg, cross_attn=direction
    )
    regions, words, lengths = _inputs(3, 6, seed=0)
    got = _run(config, regions, words, lengths)
    expected = score_block(regions, words, lengths, config).numpy()
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", CROSS_ATTNS)
@pytest.mark.parametrize("agg", ["LogSumExp", "Mean"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (64, 1), (64, 64)])
def test_scorer_batch_sizes_and_lengths(direction, agg, shape):
    config = ModelConfig(vocab_size=5, embed_size=D, agg_func=agg, cross_attn=direction)
    regions, words, lengths = _inputs(*shape, seed=sum(shape))
    if shape[1] == 1:
        words, lengths = words[:, :1], torch.tensor([1])
    got = _run(config, regions, words, lengths)
    expected = score_block(regions, words, lengths, config).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", CROSS_ATTNS)
def test_scorer_without_normalised_embeddings(direction):
    config = ModelConfig(
        vocab_size=5, embed_size=D, cross_attn=direction, no_imgnorm=True, no_txtnorm=True
    )
    regions, words, lengths = _inputs(4, 5, seed=3, normalize=False)
    got = _run(config, regions, words, lengths)
    np.testing.assert_allclose(
        got, score_block(regions, words, lengths, config).numpy(), atol=1e-4, rtol=0
    )
