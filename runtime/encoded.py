"""The one check of the encoders' outputs, shared by `scan-deploy index` (gallery items) and the
retriever (queries): an item the image or text encoder turns into NaN/Inf or an all-zero
embedding would score alike against everything, so it is refused with a one-line UserError
naming the source and the item. Features far beyond the model's scale (e.g. ×1e30) do this:
they overflow the L2 norm of every region; for captions and text queries only a broken bundle
can."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scan_deploy.errors import input_error


def first_degenerate(embeddings: np.ndarray, pooled: np.ndarray, valid: np.ndarray) -> int | None:
    """The first item of an encoded batch with NaN/Inf in its embeddings (items, T, D) or pooled
    embedding (items, D), or with an all-zero one (among the `valid` (items, T) embeddings: a
    caption's words, an image's regions that are not padding); None if none."""
    zero = (~embeddings.any(axis=2) & valid).any(axis=1) | ~pooled.any(axis=1)
    finite = np.isfinite(embeddings).all(axis=(1, 2)) & np.isfinite(pooled).all(axis=1)
    bad = np.flatnonzero(zero | ~finite)
    return int(bad[0]) if bad.size else None


def check_encoded_images(
    features: np.ndarray,
    regions: np.ndarray,
    pooled: np.ndarray,
    source: str | Path | None,
    start: int = 0,
) -> None:
    """Refuse the first degenerate image of a batch: `FILE: image N: ...` (`image features`
    when the file is not known), N counted from `start`, with its largest feature's magnitude."""
    bad = first_degenerate(regions, pooled, features.any(axis=2))
    if bad is not None:
        peak = float(np.abs(features[bad]).max())
        raise input_error(
            "image features" if source is None else source,
            f"image {start + bad}",
            f"the image encoder's output is zero or NaN/Inf (features up to {peak:.3g}): "
            "expected features of the scale the model was trained on",
        )


def check_encoded_texts(
    words: np.ndarray,
    pooled: np.ndarray,
    lengths: np.ndarray,
    source: str | Path | None,
    items: Sequence[str],
) -> None:
    """Refuse the first degenerate caption or query of a batch: `FILE: ITEM: ...`, where
    `items` names the batch's texts (their lines, or the queries themselves)."""
    valid = np.arange(words.shape[1]) < lengths[:, None]
    bad = first_degenerate(words, pooled, valid)
    if bad is not None:
        message = "the text encoder's output is zero or NaN/Inf: the bundle is broken"
        raise input_error(source, items[bad], message)
