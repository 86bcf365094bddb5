"""`scan-deploy compare`: a bundle's graphs in ONNX Runtime against the PyTorch checkpoint on real
data (Polygraphy-style error statistics per graph output) and on retrieval (Recall@K of both
pipelines on a split)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import numpy as np
from scan_deploy.export.verify import compare_graphs, session

from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import Bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.errors import UserError
from scan_deploy.evaluate import split_similarities
from scan_deploy.metrics import recall_metrics
from scan_deploy.precomp import PrecompSplit
from scan_deploy.weights import check_weights, weights_digest

GRAPH_SAMPLE = 64  # images (and their first captions) used for the per-graph error statistics


def check_same_model(bundle: Bundle, checkpoint: Checkpoint) -> None:
    if bundle.config != checkpoint.config:
        raise UserError(f"{bundle.path}: model config differs from {checkpoint.path}")
    if bundle.vocab != checkpoint.vocab:
        raise UserError(f"{bundle.path}: vocabulary differs from {checkpoint.path}")
    check_weights(bundle, weights_digest(checkpoint.model.state_dict()), checkpoint.path)


def scorer_blocks(
    scorer,
    t2i: bool,
    regions: np.ndarray,
    region_grams: np.ndarray | None,
    caption_chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
    num_captions: int,
    block_images: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run `scorer.onnx` over image blocks × caption chunks `(indices, words, lengths,
    caption_gram)` and gather the (images, captions) similarity matrix."""
    sims = np.empty((regions.shape[0], num_captions), np.float32)
    for idx, words, lengths, caption_gram in caption_chunks:
        for first in range(0, regions.shape[0], block_images):
            block = slice(first, first + block_images)
            feeds = {"regions": regions[block], "words": words, "lengths": lengths}
            if t2i:
                feeds["region_gram"] = region_grams[block]
            else:
                feeds["caption_gram"] = caption_gram
            sims[block, idx] = scorer.run(None, feeds)[0]
        if progress is not None:
            progress(len(idx))
    return sims


def ort_similarities(
    bundle: Bundle,
    sessions: dict,
    split: PrecompSplit,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The deployed pipeline: ONNX encoders, then the ONNX scorer over blocks of
    (`batch` images × `batch` captions, captions grouped by length)."""
    regions, region_grams = encode_split_images(sessions["image_encoder"], split, batch)
    t2i = bundle.config.cross_attn == "t2i"
    return scorer_blocks(
        sessions["scorer"],
        t2i,
        regions,
        region_grams,
        caption_chunks(bundle, sessions["text_encoder"], split, batch),
        split.num_captions,
        batch,
        progress,
    )


def encode_split_images(encoder, split: PrecompSplit, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`regions` and `region_gram` of every image of the split, by the image encoder session."""
    outputs = [
        encoder.run(None, {"features": np.asarray(split.images[s : s + batch])})
        for s in range(0, split.num_images, batch)
    ]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def caption_chunks(
    bundle: Bundle, encoder, split: PrecompSplit, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(indices, words, lengths, caption_gram) of `batch` captions at a time, longest first, by
    the text encoder session (one chunk in memory at a time)."""
    token_lists = [bundle.vocab.encode(c) for c in split.captions]
    order = np.argsort([-len(t) for t in token_lists], kind="stable")
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        tokens, lengths = pad_tokens([token_lists[j] for j in idx])
        words, caption_gram, _ = encoder.run(None, {"tokens": tokens, "lengths": lengths})
        yield idx, words, lengths, caption_gram


def graph_sample(bundle: Bundle, split: PrecompSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of the first GRAPH_SAMPLE images, and token ids + lengths of their first captions:
    the inputs of the per-graph error statistics."""
    sample = min(GRAPH_SAMPLE, split.num_images)
    first_captions = [split.captions[i * split.captions_per_image] for i in range(sample)]
    tokens, lengths = pad_tokens([bundle.vocab.encode(c) for c in first_captions])
    return np.asarray(split.images[:sample], dtype=np.float32), tokens, lengths


def compare_bundle(
    bundle: Bundle,
    checkpoint: Checkpoint,
    split: PrecompSplit,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Per-graph error statistics on real inputs, and Recall@K of ORT vs PyTorch on the split."""
    check_same_model(bundle, checkpoint)
    sessions = {
        name: session(str(bundle.graph_path(name)), threads) for name in bundle.manifest["graphs"]
    }
    errors = compare_graphs(sessions, checkpoint.model.eval(), *graph_sample(bundle, split))
    ort_sims = ort_similarities(bundle, sessions, split, progress=progress)
    torch_sims = split_similarities(checkpoint, split)
    similarity_error = float(np.abs(ort_sims - torch_sims).max())
    ort_metrics = recall_metrics(ort_sims, split.captions_per_image)
    torch_metrics = recall_metrics(torch_sims, split.captions_per_image)
    return {
        "graphs": [asdict(e) for e in errors],
        "similarity_max_abs": similarity_error,
        "onnxruntime": ort_metrics,
        "pytorch": torch_metrics,
        "recall_identical": all(
            ort_metrics[d][f"r{k}"] == torch_metrics[d][f"r{k}"]
            for d in ("i2t", "t2i")
            for k in (1, 5, 10)
        ),
    }
