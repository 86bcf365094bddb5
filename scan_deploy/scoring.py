"""The fast exact SCAN scorer: similarities of all (image, caption) pairs without attended contexts.

The original computes, for every pair, the attended context c = Σ a·v explicitly (O(L·R·D) per pair)
and then cos(w, c). Both terms of the cosine follow from quantities that are needed anyway
(docs/design.md §3):

    w_l·c_l = Σ_r a_{l,r} S_{r,l}           (S = V Wᵀ, the attention logits)
    |c_l|²  = a_lᵀ G a_l,  G = V Vᵀ          (the image's R×R Gram matrix, computed once per image)

so t2i costs one large GEMM over all regions × all words plus O(L·R²) per pair; i2t uses the
caption's L×L Gram matrix symmetrically. Every normalisation, softmax and aggregation over words
sees only the first `length` words, so padding never changes a score.

Tensors of one block are laid out (n images, R regions, m captions, T words) so the logits come
from a single GEMM without copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scan_deploy.config import ModelConfig

EPS = 1e-8
# Elements of one (n, R, m, T) block (a block holds about six tensors of this size) and captions
# per block: small blocks stay in cache, which makes the element-wise passes cheap next to the GEMM.
DEFAULT_BLOCK_ELEMENTS = 1 << 21
CAPTION_CHUNK = 64


def l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """L2-normalise as the original does: x / (|x| + eps)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def region_gram(regions: torch.Tensor) -> torch.Tensor:
    """Per-image Gram matrix V Vᵀ, (N, R, D) -> (N, R, R)."""
    return regions @ regions.transpose(1, 2)


def caption_gram(words: torch.Tensor) -> torch.Tensor:
    """Per-caption Gram matrix W Wᵀ, (M, T, D) -> (M, T, T)."""
    return words @ words.transpose(1, 2)


def region_mask(regions: torch.Tensor) -> torch.Tensor | None:
    """(n, R) bool: the rows of (n, R, ·) region features or embeddings that are regions, or None
    when all are (fixed-count features: the scorer then takes its unmasked path).

    A padded region is an all-zero row, in the features (the precomp layout pads adaptive
    features with zeros, docs/formats.md) and in the region embeddings (the image encoder zeroes
    it); a real region is never all zero (an L2-normalised embedding has norm 1, and import
    refuses all-zero feature rows). The convention needs no count array beside the features, and
    every stored form of a gallery (fp16, int8 codes) keeps a zero row zero."""
    return _unless_all(nonzero_rows(regions))


def nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., R) bool: the rows (last axis) of `x` with a non-zero value (`region_mask`)."""
    return x.detach().abs().amax(dim=-1) > 0


def _unless_all(valid: torch.Tensor) -> torch.Tensor | None:
    return None if bool(valid.all()) else valid


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(M,) lengths -> (M, T) boolean mask of the valid words."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def attention_logits(
    logits: torch.Tensor, kind: str, dim: int, scale: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """scale · `raw_feature_norm`(logits) along `dim`.

    Padded positions must hold zero logits (their word vectors are zeroed first): they then add
    nothing to an L1/L2 norm. Only the softmax kind needs `valid` to mask them out.
    """
    if kind == "softmax":
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        return torch.softmax(logits, dim=dim) * scale
    if kind.startswith("clipped"):
        logits = F.leaky_relu(logits, 0.1)
    # The norms as sums, not `torch.linalg.vector_norm`: over a non-last dim (i2t normalises over
    # the regions, dim 1 of (n, R, m, T)) it took 4.7 ms where the sum takes 0.2 (torch 2.13 CPU,
    # one 41 × 36 × 64 × 18 block), 20% of the i2t scorer.
    if kind.endswith("l2norm"):  # clamped: the gradient of sqrt at 0 (all-zero padding) is NaN
        squares = (logits * logits).sum(dim=dim, keepdim=True)
        norm = squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()
        return logits * (scale / (norm + EPS))
    if kind.endswith("l1norm"):  # the original's `l1norm_d` was never defined: this is the intent
        norm = logits.abs().sum(dim=dim, keepdim=True)
        return logits * (scale / (norm + EPS))
    return logits * scale


def aggregate(
    values: torch.Tensor,
    kind: str,
    dim: int,
    lambda_lse: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool the per-word (or per-region) relevances over `dim`: LogSumExp, Mean, Max or Sum."""
    if kind == "LogSumExp":
        if valid is not None:
            values = values.masked_fill(~valid, float("-inf"))
        return torch.logsumexp(values * lambda_lse, dim=dim) / lambda_lse
    if kind == "Max":
        if valid is not None:
            values = values.masked_fill(~valid, float("-inf"))
        return values.amax(dim=dim)
    if valid is not None:
        values = values.masked_fill(~valid, 0.0)
    total = values.sum(dim=dim)
    if kind == "Sum":
        return total
    count = valid.sum(dim=dim) if valid is not None else values.shape[dim]
    return total / count


def _logits(regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """S[n, r, m, t] = v_{n,r} · w_{m,t}, as one GEMM."""
    n, r, d = regions.shape
    m, t, _ = words.shape
    return (regions.reshape(n * r, d) @ words.reshape(m * t, d).T).view(n, r, m, t)


def _cosine(
    numerator: torch.Tensor, norm_a: torch.Tensor, squared_norm_b: torch.Tensor
) -> torch.Tensor:
    """cos as the original: w12 / max(|a|·|b|, eps), with |b|² from the Gram identity."""
    return numerator / (norm_a * squared_norm_b.clamp(min=0).sqrt()).clamp(min=EPS)


@dataclass(frozen=True)
class ImageSide:
    """Per-image tensors of a block: regions (n, R, D), their norms (n, R), the Gram (n, R, R)
    and, when some images have fewer regions than R (adaptive features, padded with all-zero
    rows), the valid mask (n, R) that keeps the padding out of every softmax and pooling."""

    regions: torch.Tensor
    norms: torch.Tensor
    gram: torch.Tensor | None
    valid: torch.Tensor | None = None

    @classmethod
    def prepare(
        cls, regions: torch.Tensor, config: ModelConfig, gram: torch.Tensor | None = None
    ) -> ImageSide:
        norms = regions.norm(dim=-1)
        valid = _unless_all(norms.detach() > 0)  # `region_mask` from the norms it needs anyway
        if config.cross_attn == "t2i" and gram is None:
            gram = region_gram(regions)
        return cls(regions, norms, gram, valid)


@dataclass(frozen=True)
class CaptionSide:
    """Per-caption tensors of a block, computed once and reused against every image chunk:
    words (m, T, D) zeroed beyond each length, lengths (m,), the valid mask (m, T), word norms
    (m, T) and, for i2t, the caption Gram (m, T, T)."""

    words: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    norms: torch.Tensor
    gram: torch.Tensor | None

    @classmethod
    def prepare(
        cls,
        words: torch.Tensor,
        lengths: torch.Tensor,
        config: ModelConfig,
        gram: torch.Tensor | None = None,
    ) -> CaptionSide:
        valid = length_mask(lengths, words.shape[1])
        words = words * valid[..., None]
        if config.cross_attn == "i2t" and gram is None:
            gram = caption_gram(words)
        return cls(words, lengths, valid, words.norm(dim=-1), gram)


def score_t2i_block(images: ImageSide, captions: CaptionSide, config: ModelConfig) -> torch.Tensor:
    """t2i similarities of n images × m captions: words attend to regions. Returns (n, m)."""
    n, r, _ = images.regions.shape
    m, t, _ = captions.words.shape
    valid = captions.valid
    logits = _logits(images.regions, captions.words)  # (n, R, m, T), zero at padded words
    attn = _t2i_attention(logits, valid, config, images.valid)
    numerator = (attn * logits).sum(dim=1)  # (n, m, T)
    gram_attn = (images.gram @ attn.reshape(n, r, m * t)).view(n, r, m, t)
    context_sq = (attn * gram_attn).sum(dim=1)  # |c_l|² = a_lᵀ G a_l
    relevance = _cosine(numerator, captions.norms[None], context_sq)
    return aggregate(relevance, config.agg_func, 2, config.lambda_lse, valid[None])


def score_i2t_block(images: ImageSide, captions: CaptionSide, config: ModelConfig) -> torch.Tensor:
    """i2t similarities of n images × m captions: regions attend to words. Returns (n, m)."""
    n, r, _ = images.regions.shape
    m, t, _ = captions.words.shape
    logits = _logits(images.regions, captions.words)  # (n, R, m, T), zero at padded words
    attn = _i2t_attention(logits, captions.valid, config, images.valid)
    numerator = (attn * logits).sum(dim=3)  # (n, R, m)
    attn_by_caption = attn.permute(2, 0, 1, 3).reshape(m, n * r, t)
    attn_gram = (attn_by_caption @ captions.gram).view(m, n, r, t).permute(1, 2, 0, 3)
    context_sq = (attn * attn_gram).sum(dim=3)  # |c_r|² = a_rᵀ H a_r
    relevance = _cosine(numerator, images.norms[..., None], context_sq)
    regions_valid = None if images.valid is None else images.valid[..., None]  # (n, R, 1)
    return aggregate(relevance, config.agg_func, 1, config.lambda_lse, regions_valid)


def _t2i_attention(
    logits: torch.Tensor,
    valid: torch.Tensor,
    config: ModelConfig,
    regions_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each word's weights over the (valid) regions (softmax over dim 1 of (n, R, m, T))."""
    scaled = attention_logits(
        logits, config.raw_feature_norm, 3, config.lambda_softmax, valid[None, None]
    )
    if regions_valid is not None:
        scaled = scaled.masked_fill(~regions_valid[:, :, None, None], float("-inf"))
    return torch.softmax(scaled, dim=1)


def _i2t_attention(
    logits: torch.Tensor,
    valid: torch.Tensor,
    config: ModelConfig,
    regions_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each region's weights over the caption's valid words (softmax over dim 3)."""
    among = None if regions_valid is None else regions_valid[:, :, None, None]
    scaled = attention_logits(logits, config.raw_feature_norm, 1, config.lambda_softmax, among)
    return torch.softmax(scaled.masked_fill(~valid[None, None], float("-inf")), dim=3)


def attention_weights(
    regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """(n, R, m, T): the attention the scorer uses, in its direction: t2i, each word's weights
    over the (valid) regions (summing to 1 over them); i2t, each region's weights over the words
    (summing to 1 over the valid T; 0 for padded regions). What `scan-deploy explain` shows."""
    valid = length_mask(lengths.to(torch.long), words.shape[1])
    logits = _logits(regions, words * valid[..., None])
    regions_valid = region_mask(regions)
    if config.cross_attn == "t2i":
        return _t2i_attention(logits, valid, config, regions_valid)
    attention = _i2t_attention(logits, valid, config, regions_valid)
    if regions_valid is None:
        return attention
    return attention * regions_valid[:, :, None, None]  # padding attends to nothing


def score_sides(images: ImageSide, captions: CaptionSide, config: ModelConfig) -> torch.Tensor:
    if config.cross_attn == "t2i":
        return score_t2i_block(images, captions, config)
    return score_i2t_block(images, captions, config)


def score_block(
    regions: torch.Tensor,
    words: torch.Tensor,
    lengths: torch.Tensor,
    config: ModelConfig,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarities (n, m) of one block, for the configured attention direction.

    `gram` is the region Gram (n, R, R) for t2i or the caption Gram (m, T, T) for i2t; it is
    computed here when not given (a gallery stores it precomputed). Word vectors beyond each
    length are zeroed, so padding never reaches a score; so are padded regions (all-zero rows,
    `region_mask`: images of fewer regions than R).
    """
    t2i = config.cross_attn == "t2i"
    images = ImageSide.prepare(regions, config, gram if t2i else None)
    captions = CaptionSide.prepare(words, lengths, config, None if t2i else gram)
    return score_sides(images, captions, config)


@torch.no_grad()
def similarity_matrix(
    regions: torch.Tensor,
    words: torch.Tensor,
    lengths: torch.Tensor,
    config: ModelConfig,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress=None,
) -> torch.Tensor:
    """All-pairs similarities (N, M) in blocks of bounded memory.

    Captions are sorted by length and each chunk is cut to its own longest caption, so short
    captions do not pay for the padding of long ones; caption-side tensors are prepared once per
    chunk. `progress(k)` is called after each image chunk with the number of images done in it.
    """
    num_images, num_regions, _ = regions.shape
    lengths = lengths.to(torch.long)
    order = torch.argsort(lengths, descending=True, stable=True)
    dtype = torch.promote_types(regions.dtype, words.dtype)  # autocast mixes them
    out = torch.empty(num_images, words.shape[0], dtype=dtype, device=regions.device)
    caption_chunk = max(1, min(words.shape[0], CAPTION_CHUNK))
    chunks = []
    for start in range(0, words.shape[0], caption_chunk):
        idx = order[start : start + caption_chunk]
        t = int(lengths[idx].max())
        chunks.append((idx, CaptionSide.prepare(words[idx, :t], lengths[idx], config)))
    step = max(1, block_elements // (num_regions * caption_chunk * words.shape[1]))
    for first in range(0, num_images, step):
        images = ImageSide.prepare(regions[first : first + step], config)
        for idx, captions in chunks:
            out[first : first + step, idx] = score_sides(images, captions, config).to(dtype)
        if progress is not None:
            progress(images.regions.shape[0])
    return out


def pooled_embedding(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The cheap global embedding for shortlists: L2-normalised mean of the valid rows.

    (N, R, D) regions, all-zero where padded -> (N, D); with `lengths`, (M, T, D) words zero
    beyond each length -> (M, D).
    """
    if lengths is None:
        lengths = nonzero_rows(x).sum(dim=1).clamp_min(1)
    return l2norm(x.sum(dim=1) / lengths.to(x.dtype)[:, None], -1)
