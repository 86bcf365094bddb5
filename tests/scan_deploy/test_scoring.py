import itertools

import pytest
import torch

from scan_deploy.config import AGG_FUNCS, CROSS_ATTNS, RAW_FEATURE_NORMS, ModelConfig
from scan_deploy.scoring import (
    attention_weights,
    l2norm,
    region_mask,
    score_block,
    similarity_matrix,
)
from tests.scan_deploy.scan_oracle import oracle_scores

N, R, M, T, D = 3, 5, 6, 7, 8
LENGTHS = torch.tensor([1, 7, 3, 2, 7, 5])


def _inputs(normalize: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(N, R, D, generator=gen)
    words = torch.randn(M, T, D, generator=gen)
    words[torch.arange(T)[None, :] >= LENGTHS[:, None]] = 0.0
    if normalize:
        images, words = l2norm(images, -1), l2norm(words, -1)
    return images, words


@pytest.mark.parametrize(
    "norm,agg,direction", list(itertools.product(RAW_FEATURE_NORMS, AGG_FUNCS, CROSS_ATTNS))
)
def test_block_matches_oracle_for_every_option(norm, agg, direction):
    cfg = ModelConfig(vocab_size=5, raw_feature_norm=norm, agg_func=agg, cross_attn=direction)
    images, words = _inputs(normalize=True)
    expected = oracle_scores(images, words, LENGTHS, cfg)
    got = score_block(images, words, LENGTHS, cfg)
    assert got.shape == (N, M)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", CROSS_ATTNS)
@pytest.mark.parametrize("norm", ["clipped_l2norm", "softmax", "no_norm"])
def test_unnormalized_embeddings_keep_the_general_cosine(direction, norm):
    cfg = ModelConfig(
        vocab_size=5, cross_attn=direction, raw_feature_norm=norm, no_imgnorm=True, no_txtnorm=True
    )
    images, words = _inputs(normalize=False, seed=1)
    expected = oracle_scores(images, words, LENGTHS, cfg)
    torch.testing.assert_close(
        score_block(images, words, LENGTHS, cfg), expected, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("direction", CROSS_ATTNS)
def test_padding_content_never_changes_scores(direction):
    cfg = ModelConfig(vocab_size=5, cross_attn=direction, raw_feature_norm="softmax")
    images, words = _inputs(normalize=True, seed=2)
    noisy = words.clone()
    pad = torch.arange(T)[None, :] >= LENGTHS[:, None]
    noisy[pad] = torch.randn(int(pad.sum()), D)
    torch.testing.assert_close(
        score_block(images, noisy, LENGTHS, cfg), score_block(images, words, LENGTHS, cfg)
    )


@pytest.mark.parametrize("direction", CROSS_ATTNS)
def test_blocked_similarity_matrix_equals_one_block(direction):
    cfg = ModelConfig(vocab_size=5, cross_attn=direction)
    images, words = _inputs(normalize=True, seed=3)
    whole = score_block(images, words, LENGTHS, cfg)
    blocked = similarity_matrix(images, words, LENGTHS, cfg, block_elements=1)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)


def test_single_image_and_single_one_token_caption():
    cfg = ModelConfig(vocab_size=5)
    images, words = _inputs(normalize=True, seed=4)
    one = torch.tensor([1])
    got = score_block(images[:1], words[:1, :1], one, cfg)
    expected = oracle_scores(images[:1], words[:1, :1], one, cfg)
    assert got.shape == (1, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradients_are_finite():
    cfg = ModelConfig(vocab_size=5)
    images, words = _inputs(normalize=True, seed=5)
    images.requires_grad_(True)
    score_block(images, words, LENGTHS, cfg).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "norm,agg,direction",
    [(n, a, d) for n in RAW_FEATURE_NORMS for a in AGG_FUNCS for d in CROSS_ATTNS],
)
def test_padded_regions_score_as_the_images_alone(norm, agg, direction):
    """Images of 2, R and 4 regions padded to R with all-zero rows (adaptive features): each
    image scores as its own regions alone (the oracle on regions[:count])."""
    cfg = ModelConfig(vocab_size=5, raw_feature_norm=norm, agg_func=agg, cross_attn=direction)
    images, words = _inputs(normalize=True, seed=4)
    counts = torch.tensor([2, R, 4])
    padded = _padded(images, counts)
    got = score_block(padded, words, LENGTHS, cfg)
    for i, count in enumerate(counts.tolist()):
        expected = oracle_scores(images[i : i + 1, :count], words, LENGTHS, cfg)
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=0)


def _padded(images: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    padded = images.clone()
    for i, count in enumerate(counts.tolist()):
        padded[i, count:] = 0.0
    return padded


def test_region_mask_is_none_at_full_counts():
    images, _ = _inputs(normalize=True, seed=5)
    assert region_mask(images) is None  # the fixed-count path: nothing masked
    mask = region_mask(_padded(images, torch.tensor([2, R, 4])))
    assert mask.sum(dim=1).tolist() == [2, R, 4]


@pytest.mark.parametrize("direction", CROSS_ATTNS)
def test_padded_attention_weights_are_zero(direction):
    """explain's weights: none on (t2i) or from (i2t) a padded region; the rest as unpadded."""
    cfg = ModelConfig(vocab_size=5, cross_attn=direction)
    images, words = _inputs(normalize=True, seed=5)
    got = attention_weights(_padded(images, torch.tensor([2, R, 4])), words, LENGTHS, cfg)
    assert got[0, 2:].abs().max() == 0 and got[2, 4:].abs().max() == 0
    alone = attention_weights(images[:1, :2], words, LENGTHS, cfg)
    torch.testing.assert_close(got[:1, :2], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", CROSS_ATTNS)
@pytest.mark.parametrize("norm", ["clipped_l2norm", "l2norm", "l1norm"])
def test_gradients_stay_finite_with_padded_words_and_regions(direction, norm):
    """Padded words (and regions) have all-zero logits: their norm is 0, where sqrt's gradient
    is not finite; training must still get finite gradients."""
    cfg = ModelConfig(vocab_size=5, raw_feature_norm=norm, cross_attn=direction)
    images, words = _inputs(normalize=True, seed=6)
    images = _padded(images, torch.tensor([2, R, 4])).requires_grad_(True)
    words.requires_grad_(True)
    score_block(images, words, LENGTHS, cfg).sum().backward()
    assert torch.isfinite(images.grad).all() and torch.isfinite(words.grad).all()
