"""Scoring queries against a gallery: exhaustive exact SCAN, or the candidates of a first stage
(`runtime.first_stage`) re-ranked by the exact scorer, with a streaming top-k so memory stays
bounded by one block.

The scorer graph computes similarity(image, caption) for either search direction: text queries
are the caption side against gallery images; image queries are the image side against gallery
captions. Blocks of gallery items are read (and dequantized) from the memory-mapped shards one at
a time, scored against every query of a batch in one scorer call, and merged into each query's
top k. With the int8 scorer (`GalleryScorer.stored`) an int8 gallery's blocks go to it as
stored, with no dequantization pass. A block holds `block` items: the most the backend's scorer
takes (`runtime.backends.base.CallSizes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scan_deploy.runtime.gallery import Gallery, Shard


@dataclass(frozen=True)
class Hit:
    index: int  # position in the gallery
    id: str
    score: float
    text: str | None
    image: str | None = None  # the image file (of a caption: of its image), when known


@dataclass(frozen=True)
class Queries:
    """Encoded queries: the scorer's inputs for the query side, plus the pooled embeddings.
    Text queries hold `words`, `lengths`, `caption_gram`; image queries `regions`,
    `region_gram`. `global` (queries, D) drives the shortlist."""

    arrays: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return int(self.arrays["global"].shape[0])

    def take(self, rows: np.ndarray) -> Queries:
        return Queries({name: value[rows] for name, value in self.arrays.items()})


class TopK:
    """The k best (score, index) of each query over blocks seen so far."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((queries, 0), -np.inf, np.float32)
        self.indices = np.zeros((queries, 0), np.int64)

    def update(self, scores: np.ndarray, indices: np.ndarray) -> None:
        """`scores` (queries, b) for the gallery items `indices` (b,) or (queries, b)."""
        indices = np.broadcast_to(indices, scores.shape)
        merged = np.concatenate([self.scores, scores], axis=1)
        merged_indices = np.concatenate([self.indices, indices], axis=1)
        keep = min(self.k, merged.shape[1])
        best = np.argpartition(-merged, keep - 1, axis=1)[:, :keep]
        self.scores = np.take_along_axis(merged, best, axis=1)
        self.indices = np.take_along_axis(merged_indices, best, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (queries, k), best first (ties by lower index)."""
        order = np.lexsort((self.indices, -self.scores), axis=1)
        return (
            np.take_along_axis(self.scores, order, axis=1),
            np.take_along_axis(self.indices, order, axis=1),
        )


def scorer_feeds(queries: Queries, items: dict[str, np.ndarray], cross_attn: str) -> dict:
    """The scorer's inputs for queries × gallery items: the image side comes from whichever of
    the two holds `regions`."""
    images, captions = (items, queries.arrays) if "regions" in items else (queries.arrays, items)
    feeds = {"regions": images["regions"], "words": captions["words"]}
    feeds["lengths"] = captions["lengths"]
    if cross_attn == "t2i":
        feeds["region_gram"] = images["region_gram"]
    else:
        feeds["caption_gram"] = captions["caption_gram"]
    return feeds


@dataclass(frozen=True)
class GalleryScorer:
    """A scorer graph's runner and how gallery items reach it: dequantized to float32 for the
    bundle's scorer, or, with `stored`, as an int8 gallery stores them (uint8 codes and per-row
    scales, straight from the memory maps) for the int8 scorer
    (`export/scorer.int8_gallery_scorer_graph`)."""

    runner: Any  # .run(feeds) -> [similarity (images, captions)]
    cross_attn: str
    stored: bool = False
    # The backend's `resident(arrays)`: device copies of a block, or None past its budget
    # (`TorchBackend.resident`); the blocks it took are kept here and scored from the device.
    resident: Callable[[dict], dict | None] | None = None
    # The backend's `release(blocks)`: the budget of device blocks dropped (`close`).
    release: Callable[[list[dict]], None] | None = None
    device_blocks: dict = field(default_factory=dict, compare=False, repr=False)

    def block(self, gallery: Gallery, shard: Shard, start: int, stop: int) -> dict:
        """The scorer's inputs for the shard's items start:stop (the device copy when the
        backend keeps it)."""
        key = (gallery.path, shard.index, start, stop)
        if key in self.device_blocks:
            return self.device_blocks[key]
        if self.stored:
            return {name: shard.stored_block(name, start, stop) for name in _stored(gallery)}
        items = {name: shard.block(name, start, stop) for name in _item_arrays(gallery)}
        on_device = self.resident(items) if self.resident is not None else None
        if on_device is None:
            return items
        self.device_blocks[key] = on_device
        return on_device

    def close(self) -> None:
        """Drop the device blocks (freed with their last reference) and give their budget
        back to the backend (another scorer on it may keep blocks: `serve` switching to a
        gallery's next generation); the runner is the backend's, closed with it."""
        if self.release is not None and self.device_blocks:
            self.release(list(self.device_blocks.values()))
        self.device_blocks.clear()

    def rows(self, gallery: Gallery, indices: np.ndarray) -> dict:
        """The scorer's inputs for the gallery items at `indices`."""
        if self.stored:
            return {name: gallery.stored_rows(name, indices) for name in _stored(gallery)}
        return {name: gallery.rows(name, indices) for name in _item_arrays(gallery)}

    def score(self, queries: Queries, items: dict[str, np.ndarray]) -> np.ndarray:
        """(queries, items) similarities of one block (the runner ignores inputs its graph
        does not take)."""
        if self.stored:
            feeds = {**queries.arrays, **items}
        else:
            feeds = scorer_feeds(queries, items, self.cross_attn)
        similarity = self.runner.run(feeds)[0]
        return similarity.T if "regions" in items else similarity


def exhaustive(
    scorer: GalleryScorer, queries: Queries, gallery: Gallery, k: int, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact SCAN scores of every query against every gallery item, streamed `block` items at
    a time."""
    top = TopK(queries.count, k)
    deleted = gallery.deleted_mask if len(gallery.deleted) else None
    for shard in gallery.shards:
        for start in range(0, shard.count, block):
            stop = min(start + block, shard.count)
            items = scorer.block(gallery, shard, start, stop)
            indices = shard.offset + np.arange(start, stop)
            scores = scorer.score(queries, items)
            if deleted is not None:  # tombstones: never a hit
                scores = np.where(deleted[indices], -np.inf, scores).astype(np.float32)
            top.update(scores, indices)
    return top.result()


def live_candidates(candidates: np.ndarray, gallery: Gallery, size: int) -> np.ndarray:
    """The first `size` candidates of each row that are not deleted (the first stage was
    asked for as many more as there are deleted items, so every row has `size`)."""
    live = ~gallery.deleted_mask[candidates]
    return np.stack([row[keep][:size] for row, keep in zip(candidates, live, strict=True)])


def reranked(
    scorer: GalleryScorer,
    queries: Queries,
    gallery: Gallery,
    k: int,
    candidates: np.ndarray,
    block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact SCAN on each query's `candidates` (queries, size) only (`runtime.first_stage`
    picks them), `block` candidates per scorer call."""
    if gallery.larger_than_memory():  # the rows come from disk: queue all the reads at once
        gallery.prefetch(candidates.ravel())
    keep = min(k, candidates.shape[1])
    scores = np.empty((queries.count, keep), np.float32)
    indices = np.empty((queries.count, keep), np.int64)
    for q in range(queries.count):
        one, top = queries.take(np.array([q])), TopK(1, keep)
        for start in range(0, candidates.shape[1], block):
            chosen = candidates[q, start : start + block]
            top.update(scorer.score(one, scorer.rows(gallery, chosen)), chosen)
        (scores[q],), (indices[q],) = top.result()
    return scores, indices


def reranked_lists(
    scorer: GalleryScorer,
    queries: Queries,
    gallery: Gallery,
    k: int,
    candidates: Sequence[np.ndarray],
    block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`reranked` with each query's own candidates, any number, maybe none (a Ray shard actor
    gets those in its shards): (queries, k) best first, padded with -inf scores and index -1."""
    scores = np.full((queries.count, k), -np.inf, np.float32)
    indices = np.full((queries.count, k), -1, np.int64)
    for q, chosen in enumerate(candidates):
        if len(chosen):
            top = reranked(scorer, queries.take(np.array([q])), gallery, k, chosen[None], block)
            kept = top[0].shape[1]
            scores[q, :kept], indices[q, :kept] = top[0][0], top[1][0]
    return scores, indices


def _item_arrays(gallery: Gallery) -> tuple[str, ...]:
    if gallery.kind == "images":
        return ("regions", "region_gram")
    return ("words", "lengths", "caption_gram")


def _stored(gallery: Gallery) -> tuple[str, ...]:
    """Every stored array but `global`: the int8 scorer's gallery inputs."""
    return tuple(name for name in gallery.shards[0].files if name != "global")
