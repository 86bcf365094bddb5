"""Retrieval metrics of the SCAN protocol (numpy only): R@1/5/10, median and mean rank, rsum.

A broken model must never look good, so ranks are pessimistic:

- NaN is the worst score: an item scored NaN ranks as if scored -inf.
- Ties go against the ground truth: it ranks after every other item scored the same as it, so a
  constant similarity matrix gives R@1 = 0 rather than 100.
- A ground truth scored NaN (or -inf) ranks after every other item, NaN ones included.

An image has several ground-truth captions (i2t): its rank is that of its best non-NaN one, and
the other ground-truth captions are not counted in front of it. With continuous scores and a
healthy model ties do not occur, and these ranks equal the original SCAN's argsort loops.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def image_to_text_ranks(sims: np.ndarray, captions_per_image: int) -> np.ndarray:
    """For each image (row), the 0-based rank of its best-ranked ground-truth caption."""
    num_images = sims.shape[0]
    gt = sims.reshape(num_images, num_images, captions_per_image)[
        np.arange(num_images), np.arange(num_images)
    ]
    best_gt = np.fmax.reduce(gt, axis=1)  # ignores NaN; NaN only when all are NaN
    at_least = (sims >= best_gt[:, None]).sum(axis=1) - (gt >= best_gt[:, None]).sum(axis=1)
    return np.where(best_gt > -np.inf, at_least, sims.shape[1] - captions_per_image)


def text_to_image_ranks(sims: np.ndarray, captions_per_image: int) -> np.ndarray:
    """For each caption (column), the 0-based rank of its image."""
    images = np.arange(sims.shape[1]) // captions_per_image
    gt = sims[images, np.arange(sims.shape[1])]
    at_least = (sims >= gt[None, :]).sum(axis=0) - 1  # the ground truth itself counts once
    return np.where(gt > -np.inf, at_least, sims.shape[0] - 1)


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """R@K in percent, and medr/meanr 1-based as the original reports them."""
    summary = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in KS}
    summary["medr"] = float(np.floor(np.median(ranks)) + 1)
    summary["meanr"] = float(ranks.mean() + 1)
    return summary


def recall_metrics(
    sims: np.ndarray, captions_per_image: int
) -> dict[str, dict[str, float] | float]:
    """Both directions and rsum for an (images, captions) similarity matrix."""
    sims = np.asarray(sims)
    if sims.shape[1] != sims.shape[0] * captions_per_image:
        raise ValueError(
            f"similarities {sims.shape} do not hold {captions_per_image} captions per image"
        )
    i2t = rank_summary(image_to_text_ranks(sims, captions_per_image))
    t2i = rank_summary(text_to_image_ranks(sims, captions_per_image))
    rsum = sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in KS)
    return {"i2t": i2t, "t2i": t2i, "rsum": float(rsum)}


def mean_metrics(folds: list[dict]) -> dict:
    """Average of per-fold metrics (the COCO 5-fold 1K protocol)."""
    return {
        "i2t": {key: float(np.mean([f["i2t"][key] for f in folds])) for key in folds[0]["i2t"]},
        "t2i": {key: float(np.mean([f["t2i"][key] for f in folds])) for key in folds[0]["t2i"]},
        "rsum": float(np.mean([f["rsum"] for f in folds])),
    }
