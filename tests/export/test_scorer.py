"""The ONNX scorer in ONNX Runtime against the PyTorch Gram-identity scorer."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scan_deploy.export.scorer import int8_gallery_scorer_graph, scorer_graph

from scan_deploy.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS, ModelConfig
from scan_deploy.int8_rows import quantize_int8
from scan_deploy.scoring import (
    attention_weights,
    caption_gram,
    l2norm,
    region_gram,
    score_block,
)

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
    return session.run(["similarity"], _feeds(config.cross_attn, regions, words, lengths))[0]


def _feeds(direction: str, regions, words, lengths) -> dict:
    """The scorer's inputs: the embeddings, lengths and the direction's Gram."""
    feeds = {"regions": regions.numpy(), "words": words.numpy(), "lengths": lengths.numpy()}
    if direction == "t2i":
        feeds["region_gram"] = region_gram(regions).numpy()
    else:
        feeds["caption_gram"] = caption_gram(words).numpy()
    return feeds


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


def _int8_run(config: ModelConfig, kind: str, regions, words, lengths) -> np.ndarray:
    """The int8-gallery scorer of a `kind` gallery: that side's arrays fed as the gallery
    stores them (codes and per-row scales), the other side float32."""
    graph = int8_gallery_scorer_graph(config, kind)
    onnx.checker.check_model(graph, full_check=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = {"regions": regions.numpy(), "region_gram": region_gram(regions).numpy()}
    captions = {"words": words.numpy(), "caption_gram": caption_gram(words).numpy()}
    stored = images if kind == "images" else captions
    for name, value in list(stored.items()):
        stored[name], stored[f"{name}_scale"] = quantize_int8(value)
    feeds = {**images, **captions, "lengths": lengths.numpy()}
    return session.run(["similarity"], {v.name: feeds[v.name] for v in session.get_inputs()})[0]


@pytest.mark.parametrize("kind", ["images", "captions"])
@pytest.mark.parametrize(
    "norm,agg,direction", list(itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS, CROSS_ATTNS))
)
def test_int8_gallery_scorer_is_close_to_pytorch_for_every_variant(kind, norm, agg, direction):
    config = ModelConfig(
        vocab_size=5, embed_size=32, raw_feature_norm=norm, agg_func=agg, cross_attn=direction
    )
    gen = torch.Generator().manual_seed(4)
    regions = l2norm(torch.randn(3, R, 32, generator=gen), -1)
    lengths = torch.tensor([T, 3, 1, 5])
    words = torch.randn(4, T, 32, generator=gen)
    words[torch.arange(T)[None] >= lengths[:, None]] = 0
    words = l2norm(words, -1)
    got = _int8_run(config, kind, regions, words, lengths)
    expected = score_block(regions, words, lengths, config).numpy()
    error = np.abs(got - expected).max()
    assert got.shape == (3, 4) and 0 < error < 1.5e-2  # quantized (≤ 1/254 of each row), close


@pytest.mark.parametrize("kind,direction", [("images", "t2i"), ("captions", "i2t")])
def test_int8_gallery_scorer_is_the_float_scorer_on_the_quantized_values(kind, direction):
    """Where the query side gives the norms (text queries of t2i models, image queries of i2t
    ones) and its values are on the grid the graph rounds them to, the int8 scorer is the float
    scorer fed the dequantized gallery side: only the GEMM's arithmetic differs."""
    config = ModelConfig(vocab_size=5, embed_size=D, cross_attn=direction, agg_func="Mean")
    regions, words, lengths = _inputs(4, 5, seed=7)

    def on_grid(x):  # symmetric per row, the scale max|x| / 127, as the graph quantizes
        scale = x.abs().amax(-1, keepdim=True) / 127
        return torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)) * scale

    def dequantized(x):
        codes, scale = quantize_int8(x.numpy())
        return torch.from_numpy((codes.astype(np.float32) - 128) * scale[..., None])

    if kind == "images":
        words = on_grid(words)
        feeds = {"regions": dequantized(regions), "words": words}
        feeds["region_gram"] = dequantized(region_gram(regions))
    else:
        regions = on_grid(regions)
        feeds = {"regions": regions, "words": dequantized(words)}
        feeds["caption_gram"] = dequantized(caption_gram(words))
    got = _int8_run(config, kind, regions, words, lengths)
    graph = scorer_graph(config)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in feeds.items()} | {"lengths": lengths.numpy()}
    expected = session.run(["similarity"], feeds)[0]
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("norm,direction", list(itertools.product(RAW_FEATURE_NORMS, CROSS_ATTNS)))
def test_the_explain_graph_outputs_the_references_attention(norm, direction):
    """The attention output (images, regions, captions, words) is the reference's
    `attention_weights` at every valid position (weights of padded words are not shown)."""
    config = ModelConfig(vocab_size=5, embed_size=D, raw_feature_norm=norm, cross_attn=direction)
    regions, words, lengths = _inputs(3, 6, seed=11)
    graph = scorer_graph(config, attention=True)
    onnx.checker.check_model(graph, full_check=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(direction, regions, words, lengths)
    similarity, attention = session.run(["similarity", "attention"], feeds)
    expected = attention_weights(regions, words, lengths, config).numpy()
    valid = (np.arange(T)[None] < lengths.numpy()[:, None])[None, None]  # (1, 1, M, T)
    valid = np.broadcast_to(valid, expected.shape)
    np.testing.assert_allclose(attention[valid], expected[valid], atol=1e-5, rtol=0)
    summed = attention.sum(axis=1 if direction == "t2i" else 3)
    if direction == "t2i":  # each valid word's weights over the regions sum to 1
        np.testing.assert_allclose(summed[:, valid[0, 0]], 1.0, atol=1e-5)
    else:  # each region's weights over the caption's words sum to 1
        np.testing.assert_allclose(summed, 1.0, atol=1e-5)
    np.testing.assert_allclose(similarity, score_block(regions, words, lengths, config), atol=1e-4)


COUNTS = [10, 36, 100]  # adaptive features: images of 10, 36 and 100 regions, padded to 100


def _padded_inputs(seed: int, dim: int = D):
    """Images of COUNTS regions padded to 100 with all-zero rows, and captions."""
    gen = torch.Generator().manual_seed(seed)
    regions = l2norm(torch.randn(len(COUNTS), max(COUNTS), dim, generator=gen), -1)
    for i, count in enumerate(COUNTS):
        regions[i, count:] = 0
    lengths = torch.tensor([T, 3, 1, 5])
    words = torch.randn(4, T, dim, generator=gen)
    words[torch.arange(T)[None] >= lengths[:, None]] = 0
    return regions, l2norm(words, -1), lengths


@pytest.mark.parametrize(
    "norm,agg,direction", list(itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS, CROSS_ATTNS))
)
def test_scorer_masks_padded_regions_for_every_variant(norm, agg, direction):
    """Padded images score in the graph as in the reference, which scores each as its own
    regions alone (tests/scan_deploy/test_scoring.py); and not as the unmasked images would."""
    config = ModelConfig(
        vocab_size=5, embed_size=D, raw_feature_norm=norm, agg_func=agg, cross_attn=direction
    )
    regions, words, lengths = _padded_inputs(seed=12)
    got = _run(config, regions, words, lengths)
    for i, count in enumerate(COUNTS):
        alone = score_block(regions[i : i + 1, :count], words, lengths, config).numpy()
        np.testing.assert_allclose(got[i : i + 1], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["images", "captions"])
@pytest.mark.parametrize("direction", CROSS_ATTNS)
@pytest.mark.parametrize("agg", ["LogSumExp", "Mean"])
def test_int8_gallery_scorer_masks_padded_regions(kind, direction, agg):
    """An int8 images gallery stores a padded region as codes 128 with scale 0: masked."""
    config = ModelConfig(vocab_size=5, embed_size=32, cross_attn=direction, agg_func=agg)
    regions, words, lengths = _padded_inputs(seed=13, dim=32)
    got = _int8_run(config, kind, regions, words, lengths)
    for i, count in enumerate(COUNTS):
        alone = score_block(regions[i : i + 1, :count], words, lengths, config).numpy()
        np.testing.assert_allclose(got[i : i + 1], alone, atol=1.5e-2, rtol=0)


@pytest.mark.parametrize("norm,direction", list(itertools.product(RAW_FEATURE_NORMS, CROSS_ATTNS)))
def test_the_explain_graph_shows_no_attention_on_padded_regions(norm, direction):
    config = ModelConfig(vocab_size=5, embed_size=D, raw_feature_norm=norm, cross_attn=direction)
    regions, words, lengths = _padded_inputs(seed=14)
    graph = scorer_graph(config, attention=True)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds(direction, regions, words, lengths)
    (attention,) = session.run(["attention"], feeds)
    expected = attention_weights(regions, words, lengths, config).numpy()
    valid = np.broadcast_to(
        (np.arange(T)[None] < lengths.numpy()[:, None])[None, None], expected.shape
    )
    np.testing.assert_allclose(attention[valid], expected[valid], atol=1e-5, rtol=0)
    for i, count in enumerate(COUNTS):
        assert not attention[i, count:].any()
