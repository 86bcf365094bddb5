"""An independent oracle: SCAN scores written from the paper's equations, one caption at a time.

It computes the attended context explicitly (as the original code does) and slices every caption
to its length, so it shares nothing with the vectorized Gram-identity scorer under test.
"""

from __future__ import annotations

import torch


def _norm_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """raw_feature_norm over the last axis of x."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    if kind in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        x = torch.where(x >= 0, x, 0.1 * x)
    if kind.endswith("l2norm"):
        return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + 1e-8)
    if kind.endswith("l1norm"):
        return x / (x.abs().sum(-1, keepdim=True) + 1e-8)
    return x


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / torch.clamp(a.norm(dim=-1) * b.norm(dim=-1), min=1e-8)


def _pool(r: torch.Tensor, agg: str, lambda_lse: float) -> torch.Tensor:
    if agg == "LogSumExp":
        return torch.log(torch.exp(lambda_lse * r).sum()) / lambda_lse
    if agg == "Mean":
        return r.mean()
    if agg == "Max":
        return r.max()
    return r.sum()


def pair_score(v: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    """Score of one image (R, D) and one caption already cut to its length (L, D)."""
    if cfg.cross_attn == "t2i":
        query, context = w, v  # words attend to regions
    else:
        query, context = v, w  # regions attend to words
    s = context @ query.T  # (context items, query items)
    s = _norm_rows(s, cfg.raw_feature_norm)  # across the query items, for each context item
    a = torch.softmax(cfg.lambda_softmax * s.T, dim=-1)  # each query item over the context
    attended = a @ context  # explicit attended context per query item
    relevance = _cos(query, attended)
    return _pool(relevance, cfg.agg_func, cfg.lambda_lse)


def oracle_scores(images, captions, lengths, cfg) -> torch.Tensor:
    """(N, R, D) images, (M, T, D) captions, (M,) lengths -> (N, M), by explicit loops."""
    out = torch.empty(images.shape[0], captions.shape[0], dtype=images.dtype)
    for j in range(captions.shape[0]):
        w = captions[j, : int(lengths[j])]
        for i in range(images.shape[0]):
            out[i, j] = pair_score(images[i], w, cfg)
    return out
