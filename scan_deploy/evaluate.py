"""Evaluation of the reference: encode a split, score all pairs, Recall@K, 5-fold, ensemble."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from scan_deploy.batching import pad_tokens
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.errors import input_error
from scan_deploy.metrics import mean_metrics, recall_metrics
from scan_deploy.precomp import PrecompSplit

Progress = Callable[[int], None]


@torch.no_grad()
def encode_images(
    model, images: np.ndarray, batch_size: int = 128, progress: Progress | None = None
) -> torch.Tensor:
    """Region embeddings (N, R, D) of (N, R, F) features (a memmap is read batch by batch)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
        out.append(model.img_enc(batch.to(device)))
        if progress is not None:
            progress(out[-1].shape[0])
    return torch.cat(out)


@torch.no_grad()
def encode_captions(
    model,
    token_lists: Sequence[Sequence[int]],
    batch_size: int = 256,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Word embeddings (M, T, D), zero beyond each length, and lengths (M,)."""
    device = next(model.parameters()).device
    tokens, lengths = (torch.from_numpy(a) for a in pad_tokens(token_lists))
    words = torch.zeros(len(token_lists), tokens.shape[1], model.config.embed_size, device=device)
    for start in range(0, len(token_lists), batch_size):
        stop = start + batch_size
        batch_lengths = lengths[start:stop]
        t = int(batch_lengths.max())
        words[start:stop, :t] = model.txt_enc(tokens[start:stop, :t].to(device), batch_lengths)
        if progress is not None:
            progress(batch_lengths.shape[0])
    return words, lengths.to(device)


def split_similarities(
    checkpoint: Checkpoint,
    split: PrecompSplit,
    num_images: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Similarities (images, captions) of the first `num_images` images of a split."""
    model = checkpoint.model.eval()
    n = split.num_images if num_images is None else min(num_images, split.num_images)
    m = n * split.captions_per_image
    token_lists = [checkpoint.vocab.encode(c) for c in split.captions[:m]]
    regions = encode_images(model, split.images[:n])
    words, lengths = encode_captions(model, token_lists)
    return model.similarity(regions, words, lengths, progress=progress).cpu().numpy()


def evaluate_split(
    checkpoints: Sequence[Checkpoint],
    split: PrecompSplit,
    fold5: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Recall metrics of one model, or of an ensemble (the average of similarity matrices)."""
    sims = sum(split_similarities(c, split, progress=progress) for c in checkpoints)
    sims = sims / len(checkpoints)
    per_image = split.captions_per_image
    if not fold5:
        return recall_metrics(sims, per_image)
    if split.num_images % 5:
        raise input_error(
            None, "--fold5", f"needs a multiple of 5 images, the split has {split.num_images}"
        )
    size = split.num_images // 5
    folds = [
        recall_metrics(
            sims[i * size : (i + 1) * size, i * size * per_image : (i + 1) * size * per_image],
            per_image,
        )
        for i in range(5)
    ]
    return {**mean_metrics(folds), "folds": folds}
