"""Padding token-id lists into batches (numpy only, shared by training, evaluation and runtime)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_tokens(token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> ((B, T) int64 ids padded with 0 (`<pad>`), (B,) int64 lengths)."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.zeros((len(token_lists), int(lengths.max(initial=1))), dtype=np.int64)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = ids
    return tokens, lengths
