"""The first stage of two-stage retrieval: the gallery items the exact SCAN scorer re-ranks.

Stages (`scan_deploy.choices.FirstStage`):
- `global`: the largest inner products of the query's pooled embedding with the items' pooled
  embeddings: numpy over the float32 globals, or the gallery's FAISS index of them
  (`index --first-stage global[:FACTORY]`), per `ShortlistEngine`.
- `maxsim`: late interaction over the token vectors the encoders already produce (regions for
  text queries, words for image queries): SCAN with its attention made hard. For t2i, each word
  of the caption takes its best region (ColBERT's MaxSim) instead of a softmax-weighted mix, and
  the model's own aggregation (`Pooling`: LogSumExp with lambda_lse, Mean, Max, Sum) pools the
  words; i2t swaps the roles. Pooling as the model does matters: on the demo model a 1% image→
  text shortlist kept 94% of exhaustive SCAN's top 10 with LogSumExp over the caption's words,
  63% with ColBERT's sum over the query's regions. It runs on a FAISS index of every gallery
  token (`index --first-stage maxsim[:FACTORY]`): each query token retrieves its
  `token_candidates` nearest gallery tokens (ColBERT v1's candidate generation), and the
  missing similarities are imputed from what was retrieved (XTR, Lee et al., NeurIPS 2023), so
  no gallery row is read before the re-rank: when the query's tokens are pooled, an item's
  best token for a query token it was not retrieved by counts as that query token's lowest
  retrieved score; when the item's tokens are pooled, a token of it no query token retrieved
  counts as the lowest score retrieved. When fewer than `size` items come back, the token
  search is repeated with twice the candidates. With every token retrieved the scores are
  exactly hard-attention SCAN's (tests/runtime/test_first_stage.py).

A stage's index is a FAISS index-factory string (flat `SQfp16`, `IVF…`, `HNSW…`, `PQ…`/`OPQ…`,
scalar quantizers), trained at `index` time on a random sample of the vectors it holds
(`runtime.inner_product.write_faiss_index`); `--faiss-params` (nprobe, efSearch) tunes its
search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scan_deploy.runtime.gallery_format import link_or_copy
from scan_deploy.runtime.inner_product import (
    check_engine,
    gallery_engine,
    make_faiss_index,
    require_faiss,
    search_faiss_index,
    top_inner_products,
    training_vectors,
    write_faiss_index,
)

from scan_deploy.choices import FirstStage, ShortlistEngine
from scan_deploy.errors import input_error

if TYPE_CHECKING:  # the gallery imports this module to write the indexes
    from scan_deploy.runtime.gallery import Gallery
    from scan_deploy.runtime.search import Queries

INDEX_FILES = {FirstStage.GLOBAL: "global.faiss", FirstStage.MAXSIM: "maxsim.faiss"}
MIN_TOKEN_CANDIDATES = 64
SAMPLE_SEED = 0


def default_factory(stage: FirstStage, vectors: int) -> str:
    """The index-factory string `index --first-stage STAGE` uses without one: flat float16
    (`SQfp16`: exact up to float16 rounding, 2 bytes per dimension) for the pooled vectors and
    for up to 2^18 tokens; beyond (a flat scan would read over 128 MiB per query token at
    D = 256), an inverted file of about 2·√tokens lists (a power of two, at most 2^16) over
    8-bit scalar-quantized tokens (`IVFn,SQ8`: 1 byte per dimension). Measured at 100K images
    (3.6M region tokens, D = 256, benchmarks/bench_first_stage.py): IVF4096,SQ8 kept 98.1% of
    exhaustive SCAN's top 10 with a 1% shortlist, within 0.1 point of what nprobe 128 kept."""
    if stage == FirstStage.GLOBAL or vectors <= 2**18:
        return "SQfp16"
    lists = min(2**16, 2 ** round(math.log2(2 * math.sqrt(vectors))))
    return f"IVF{lists},SQ8"


def write_stage_index(
    gallery: Gallery,
    stage: FirstStage,
    factory: str | None,
    where: Path,
    path: Path | None = None,
) -> dict[str, Any]:
    """Build and write the FAISS index of `stage` for `gallery` (the pooled vectors, or every
    token in gallery order) to `path` (default: its file in the gallery's folder); returns its
    manifest record. `where` names the gallery in errors (a factory string FAISS refuses)."""
    path = gallery.path / INDEX_FILES[stage] if path is None else path
    if stage == FirstStage.GLOBAL:
        count = gallery.count

        def sample(n: int) -> np.ndarray:
            return gallery.rows("global", _sample(count, n))

        def blocks() -> Iterator[np.ndarray]:
            return (rows for _, rows in gallery.global_embeddings())

    else:
        count, blocks = gallery.token_count, gallery.token_blocks

        def sample(n: int) -> np.ndarray:
            return gallery.token_vectors(_sample(count, n))

    factory = factory or default_factory(stage, count)
    record = write_faiss_index(path, factory, gallery.embed_size, count, sample, blocks, where)
    return {"stage": str(stage), **record}


def extend_stage_index(base: Gallery, written: Gallery, stage: FirstStage) -> dict[str, Any]:
    """The base gallery's index of `stage` with the vectors of the items `written` adds after
    the base's (its shards past the base's), written into `written`'s folder; returns the
    record. The base's training (IVF centroids, quantizer ranges) is kept: appending stays
    O(items added), and ids stay positions in gallery order."""
    faiss = require_faiss()
    started = time.perf_counter()
    record = base.first_stages[stage]
    path = written.path / INDEX_FILES[stage]
    if written.count == base.count:  # nothing added (a delete): the index file is shared
        link_or_copy(base.path / record["file"], path)
        return {**record, "file": path.name}  # its sha256 too
    index = faiss.read_index(str(base.path / record["file"]))  # a private, writable copy
    first = len(base.shards)
    if stage == FirstStage.GLOBAL:
        blocks = (rows for offset, rows in written.global_embeddings() if offset >= base.count)
    else:
        blocks = written.token_blocks(first_shard=first)
    for vectors in blocks:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    expected = written.count if stage == FirstStage.GLOBAL else written.token_count
    if index.ntotal != expected:  # an internal invariant, not a user error
        raise RuntimeError(f"{written.path}: indexed {index.ntotal} vectors, expected {expected}")
    faiss.write_index(index, str(path))
    seconds = round(time.perf_counter() - started, 3)
    extended = {"vectors": int(index.ntotal), "bytes": path.stat().st_size}
    kept = {key: value for key, value in record.items() if key != "sha256"}  # a new file
    return {**kept, **extended, "file": path.name, "extend_seconds": seconds}


def check_stages(
    stages: dict[FirstStage | str, str | None], dim: int, items: int, tokens: int, where: Path
) -> dict[FirstStage, str | None]:
    """The first stages to index, parsed and checked before any work: each factory string
    FAISS can make, and trainable on the gallery's `items` pooled vectors or `tokens` tokens
    (one-line UserErrors naming `where`)."""
    parsed = {FirstStage.parse(stage, "first_stages"): factory for stage, factory in stages.items()}
    for stage, factory in parsed.items():
        vectors = items if stage == FirstStage.GLOBAL else tokens
        factory = factory or default_factory(stage, vectors)
        training_vectors(make_faiss_index(factory, dim, where), vectors, where, factory)
    return parsed


def reads_index(gallery: Gallery, stage: FirstStage, engine: ShortlistEngine | str) -> bool:
    """Whether a `stage` shortlist on `gallery` reads the gallery's FAISS index of that stage:
    `maxsim` always (it has no other way), `global` when `engine` resolves to FAISS."""
    if stage not in gallery.first_stages:
        return False
    engine = ShortlistEngine.parse(engine, "shortlist_engine")
    return stage == FirstStage.MAXSIM or gallery_engine(engine, True) == ShortlistEngine.FAISS


def shortlist(
    queries: Queries,
    gallery: Gallery,
    size: int,
    stage: FirstStage,
    pooling: Pooling,
    engine: ShortlistEngine | str = ShortlistEngine.AUTO,
    threads: int = 0,
    token_candidates: int | None = None,
) -> np.ndarray:
    """(queries, min(size, gallery.count)) candidate item indices per query, best first;
    `pooling`: the model's (`Pooling.of(config)`), for the maxsim stage."""
    if stage == FirstStage.MAXSIM:
        return maxsim_shortlist(queries, gallery, size, pooling, threads, token_candidates)
    return global_shortlist(queries, gallery, size, engine, threads)


def global_shortlist(
    queries: Queries,
    gallery: Gallery,
    size: int,
    engine: ShortlistEngine | str = ShortlistEngine.AUTO,
    threads: int = 0,
) -> np.ndarray:
    """The `size` items with the largest pooled-embedding inner products, on `engine` (FAISS
    reads the gallery's `global` index when it has one). An IVF index probing few lists may
    find fewer: the rest are the lowest-indexed other items, as the maxsim stage does."""
    from scan_deploy.runtime.search import TopK  # search → gallery → this module

    pooled, top = queries.arrays["global"], TopK(queries.count, size)
    has_index = FirstStage.GLOBAL in gallery.first_stages
    engine = gallery_engine(check_engine(engine), has_index)
    if engine == ShortlistEngine.FAISS and has_index:
        index = gallery.stage_index(FirstStage.GLOBAL)
        scores, found = search_faiss_index(index, pooled, min(size, gallery.count), threads, True)
        if (found < 0).any():
            return np.stack([_filled(row) for row in found])
        top.update(scores, found)
        return top.result()[1]
    for offset, embeddings in gallery.global_embeddings():
        scores, indices = top_inner_products(pooled, embeddings, size, engine, threads)
        top.update(scores, offset + indices)
    return top.result()[1]


@dataclass(frozen=True)
class Pooling:
    """How SCAN pools its per-token relevances into a score, read from the model's config:
    `agg_func` (LogSumExp with `lambda_lse`, Mean, Max, Sum) over the caption's words (t2i) or
    the image's regions (i2t)."""

    cross_attn: str = "t2i"
    agg_func: str = "LogSumExp"
    lambda_lse: float = 6.0

    @classmethod
    def of(cls, config: Any) -> Pooling:
        return cls(config.cross_attn, config.agg_func, float(config.lambda_lse))

    def pools_query(self, queries: Queries) -> bool:
        """Whether the query's tokens are the ones pooled (text queries of a t2i model, image
        queries of an i2t model), else the gallery item's."""
        return ("words" in queries.arrays) == (self.cross_attn == "t2i")

    def dense(self, best: np.ndarray) -> np.ndarray:
        """Pool (tokens, items) relevances over the tokens."""
        if self.agg_func == "LogSumExp":
            top = best.max(axis=0)
            spread = np.exp(self.lambda_lse * (best - top)).sum(axis=0)
            return top + np.log(spread) / self.lambda_lse
        return {"Mean": np.mean, "Max": np.max, "Sum": np.sum}[self.agg_func](best, axis=0)

    def sparse(
        self, values: np.ndarray, item: np.ndarray, counts: np.ndarray, imputed: float
    ) -> np.ndarray:
        """Pool, per item, its tokens' relevances: `values` of some of its tokens (`item`:
        which item, 0..len(counts)-1), and `imputed` for each of its `counts` tokens not given."""
        given = np.bincount(item, minlength=len(counts))
        missing = counts - given
        if self.agg_func in ("Sum", "Mean"):
            total = np.bincount(item, values, minlength=len(counts)) + missing * imputed
            return total / counts if self.agg_func == "Mean" else total
        top = np.full(len(counts), -np.inf)
        np.maximum.at(top, item, values)
        top = np.where(missing > 0, np.maximum(top, imputed), top)
        if self.agg_func == "Max":
            return top
        lam = self.lambda_lse
        spread = np.bincount(item, np.exp(lam * (values - top[item])), minlength=len(counts))
        spread += missing * np.exp(lam * (imputed - top))
        return top + np.log(spread) / lam


def maxsim_shortlist(
    queries: Queries,
    gallery: Gallery,
    size: int,
    pooling: Pooling,
    threads: int = 0,
    token_candidates: int | None = None,
) -> np.ndarray:
    """The `size` items with the best imputed hard-attention score (module docstring) from the
    gallery's token index; `token_candidates` gallery tokens per query token (default
    `default_candidates`)."""
    if FirstStage.MAXSIM not in gallery.first_stages:
        raise missing_stage(gallery, FirstStage.MAXSIM)
    index = gallery.stage_index(FirstStage.MAXSIM)
    size = min(size, gallery.count)
    vectors, owners = query_tokens(queries)
    pools_query = pooling.pools_query(queries)
    score = _query_pooled if pools_query else _item_pooled
    default = default_candidates(gallery, size, pools_query)
    per_token = min(index.ntotal, token_candidates or default)
    while True:
        scores, tokens = search_faiss_index(index, vectors, per_token, threads, partial=True)
        found = [
            score(scores[owners == q], tokens[owners == q], gallery, pooling)
            for q in range(queries.count)
        ]
        if per_token == index.ntotal or all(len(items) >= size for items, _ in found):
            break
        per_token = min(index.ntotal, 2 * per_token)
    return np.stack([_best(items, totals, size, gallery.count) for items, totals in found])


def default_candidates(gallery: Gallery, size: int, pools_query: bool) -> int:
    """Gallery tokens each query token retrieves by default: the shortlist's share of the
    gallery's tokens (size × tokens per item) when the query's tokens are pooled, half of it when
    the item's are (each item token then needs to be found by one of the query's tokens only),
    at least MIN_TOKEN_CANDIDATES. Measured at 100K (1% shortlist, IVF4096,SQ8, nprobe 32;
    top-10 agreement and first-stage p50): text→image 96.7% in 106 ms at a quarter, 97.6% / 156
    ms at half, 98.1% / 219 ms at 1×, 98.1% at 2×; image→text 99.4% / 72 ms at a quarter, 99.3%
    / 119 ms at half, 99.5% / 164 ms at 1×. On the test suite's tiny model a quarter lost 8
    points image→text (0.83 vs 0.91 at 1×), half 4 (0.87): hence half."""
    per_item = math.ceil(gallery.token_count / gallery.count)
    share = size * per_item if pools_query else math.ceil(size * per_item / 2)
    return max(MIN_TOKEN_CANDIDATES, share)


def query_tokens(queries: Queries) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (tokens, D), the query of each token): text queries' valid words, image
    queries' regions (without padding: all-zero rows)."""
    if "regions" in queries.arrays:
        regions = queries.arrays["regions"]
        valid = regions.any(axis=2)
        return regions[valid], np.repeat(np.arange(len(regions)), valid.sum(axis=1))
    words, lengths = queries.arrays["words"], queries.arrays["lengths"]
    valid = np.arange(words.shape[1]) < lengths[:, None]
    return words[valid], np.repeat(np.arange(len(words)), lengths)


def missing_stage(gallery: Gallery, stage: FirstStage):
    indexed = ", ".join(gallery.first_stages) or "none"
    return input_error(
        gallery.path / "manifest.json",
        "first_stages",
        f"the gallery has no {stage} first stage (indexed: {indexed}): re-run scan-deploy index "
        f"--first-stage {stage}",
    )


def _query_pooled(
    scores: np.ndarray, tokens: np.ndarray, gallery: Gallery, pooling: Pooling
) -> tuple[np.ndarray, np.ndarray]:
    """(items, scores) when the query's tokens are pooled: per query token, the best retrieved
    token of each item, or the lowest score that query token retrieved (an upper bound of the
    item's unseen tokens), pooled over the query's tokens."""
    found = tokens >= 0  # an IVF search that probes few lists may return fewer than asked
    rows, cols = np.nonzero(found)
    owners = gallery.token_owner(tokens[rows, cols])
    hit = np.zeros(gallery.count, bool)  # the items found, without sorting the owners:
    hit[owners] = True  # 432K owners at 100K images, 1.5× faster than np.unique
    items = np.flatnonzero(hit)
    slot = np.empty(gallery.count, np.int64)
    slot[items] = np.arange(len(items))
    floor = np.where(found.any(axis=1), np.where(found, scores, np.inf).min(axis=1), 0)
    best = np.repeat(floor[:, None].astype(np.float32), len(items), axis=1)
    np.maximum.at(best.reshape(-1), rows * len(items) + slot[owners], scores[rows, cols])
    return items, pooling.dense(best)


def _item_pooled(
    scores: np.ndarray, tokens: np.ndarray, gallery: Gallery, pooling: Pooling
) -> tuple[np.ndarray, np.ndarray]:
    """(items, scores) when the item's tokens are pooled: each retrieved gallery token's best
    query token; an item's tokens no query token retrieved get the lowest score any query
    token retrieved (not the upper bound, the highest such floor: on the demo model, image
    queries over 5000 captions, a 50-caption shortlist kept 93.4% of the exact top 10 with it,
    86.6% with the bound, which favours items that were barely retrieved); pooled over each
    item's tokens."""
    found = tokens >= 0
    retrieved, inverse = np.unique(tokens[found], return_inverse=True)
    best = np.full(len(retrieved), -np.inf)
    np.maximum.at(best, inverse, scores[found])
    floors = np.where(found, scores, np.inf).min(axis=1)
    imputed = float(floors[np.isfinite(floors)].min()) if np.isfinite(floors).any() else 0.0
    owners = gallery.token_owner(retrieved)
    items, item = np.unique(owners, return_inverse=True)
    counts = gallery.token_starts[items + 1] - gallery.token_starts[items]
    return items, pooling.sparse(best, item, counts, imputed)


def _filled(row: np.ndarray) -> np.ndarray:
    """A row of items found, best first (-1 where the index found none), with the places left
    empty given to the lowest-indexed other items."""
    found = row[row >= 0]
    others = np.setdiff1d(np.arange(len(row)), found, assume_unique=True)
    return np.concatenate([found, others[: len(row) - len(found)]])


def _best(items: np.ndarray, totals: np.ndarray, size: int, count: int) -> np.ndarray:
    """The `size` best items (ties by lower index); when the index returned fewer, the rest are
    the lowest-indexed other items (none of their tokens came close to the query)."""
    order = np.lexsort((items, -totals))[:size]
    chosen = items[order]
    if len(chosen) < size:
        others = np.setdiff1d(np.arange(count), chosen, assume_unique=True)
        chosen = np.concatenate([chosen, others[: size - len(chosen)]])
    return chosen.astype(np.int64)


def _sample(count: int, n: int) -> np.ndarray:
    """About `n` distinct positions out of `count`, sorted, seeded (all of them when n ≥ count)."""
    if n >= count:
        return np.arange(count)
    rng = np.random.default_rng(SAMPLE_SEED)
    picked = np.unique(rng.integers(0, count, n))
    while len(picked) < n:  # without an O(count) permutation: 36M tokens at 1M images
        picked = np.union1d(picked, rng.integers(0, count, n - len(picked)))
    return np.sort(rng.choice(picked, n, replace=False))
