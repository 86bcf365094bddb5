"""Inner products for the first stages (`runtime/first_stage.py`), and the only module that
imports FAISS: exact top-k of pooled embeddings by numpy or `faiss.knn`, and the FAISS indexes of
a gallery — made from index-factory strings, trained, written, opened and searched.

Engines of the `global` stage (`auto`: its FAISS index when the gallery has one and faiss
imports, numpy otherwise):
- `numpy`: per shard one GEMM over the float32 memory map, then `argpartition` per query; exact;
- `faiss` (`pip install 'scan-deploy[faiss]'`): the gallery's index (`index --first-stage
  global`, default `SQfp16`: float16 codes memory-mapped with `IO_FLAG_MMAP_IFC`, so it reads 2
  bytes per dimension instead of 4; bench: 200K × 1024 in 16 ms vs 54 ms for float32, 99.98% of
  the float32 top 1000 kept); without one, `faiss.knn` per shard over the float32 memory map
  (blocked BLAS GEMM with a fused heap): exact, the same products as numpy up to summation order.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from scan_deploy.choices import ShortlistEngine
from scan_deploy.errors import UserError, input_error
from scan_deploy.extras import EXTRAS

LOG = logging.getLogger("scan_deploy.runtime")
FAISS_HINT = f"faiss is not installed: {EXTRAS['faiss'].install()}"
FACTORY_HELP = "expected an index-factory string such as SQfp16, IVF1024,SQ8 or HNSW32,SQfp16"
PARAMS_HELP = "expected e.g. nprobe=32 (IVF) or efSearch=128 (HNSW)"
MIN_POINTS_PER_CENTROID = 39  # FAISS's k-means warns below this many points per centroid
MAX_POINTS_PER_CENTROID = 256  # and subsamples above this many
TRAIN_CAP = 262_144  # training vectors at most (1 GB at D = 1024)


def check_engine(engine: ShortlistEngine | str) -> ShortlistEngine:
    """The shortlist engine `engine` names (`faiss` only when FAISS is installed)."""
    engine = ShortlistEngine.parse(engine, "shortlist_engine")
    if engine == ShortlistEngine.FAISS:
        require_faiss()
    return engine


def gallery_engine(engine: ShortlistEngine, has_index: bool) -> ShortlistEngine:
    """`numpy` or `faiss`: what a shortlist with `engine` runs on for a gallery with or without a
    FAISS index. `auto` takes FAISS only for the index: `faiss.knn` over the float32 globals
    measured slower than numpy's GEMM (1M images: 605 vs 410 ms)."""
    if engine != ShortlistEngine.AUTO:
        return engine
    if has_index and faiss_installed():
        return ShortlistEngine.FAISS
    return ShortlistEngine.NUMPY


def top_inner_products(
    queries: np.ndarray, items: np.ndarray, k: int, engine: ShortlistEngine, threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (queries, min(k, items)), of the largest `queries @ items.T` per
    query, in no particular order; `engine` numpy or faiss (`threads` OpenMP threads, 0: all)."""
    k = min(k, len(items))
    if not k:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if engine == ShortlistEngine.FAISS:
        faiss = _faiss_in_this_thread(threads)
        return faiss.knn(queries, items, k, metric=faiss.METRIC_INNER_PRODUCT)
    scores = queries @ items.T
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, best, axis=1), best


def search_faiss_index(
    index: Any, queries: np.ndarray, k: int, threads: int = 0, partial: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (queries, k ≤ index.ntotal), best first, from a gallery's index;
    with `partial`, places the index left empty (an IVF search probing few lists) hold index
    -1. FAISS's CPU `search` is safe to call from several threads."""
    _faiss_in_this_thread(threads)
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if not partial and (indices < 0).any():  # a flat index leaves none empty but for NaN
        raise ValueError("the FAISS index found fewer candidates than asked: non-finite query?")
    return scores, indices


def make_faiss_index(factory: str, dim: int, where: Path) -> Any:
    """An empty inner-product index from a FAISS index-factory string ("SQfp16", "IVF1024,SQ8",
    "HNSW32,SQfp16", "OPQ32,IVF4096,PQ32x4fs", ...); a string FAISS refuses is a one-line
    UserError naming `where` (the gallery being written)."""
    faiss = require_faiss()
    if not isinstance(factory, str) or not factory.strip():
        raise input_error(where, "factory", "expected a FAISS index-factory string, got nothing")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        message = f"FAISS cannot make an index of {factory!r} for {dim} dimensions: {FACTORY_HELP}"
        raise input_error(where, "factory", message) from None


def training_vectors(index: Any, available: int, where: Path, factory: str) -> int:
    """How many vectors to train `index` on (0: it needs no training): at least
    MIN_POINTS_PER_CENTROID per centroid of its largest k-means (IVF lists, PQ codebooks) — FAISS
    itself only warns below that and fails below one point per centroid —, and up to
    MAX_POINTS_PER_CENTROID per centroid (FAISS subsamples beyond it), within TRAIN_CAP.
    Fewer `available` vectors than the minimum is a one-line UserError."""
    if index.is_trained:
        return 0
    centroids = _largest_kmeans(index)
    needed = MIN_POINTS_PER_CENTROID * centroids
    if available < needed:
        raise input_error(
            where,
            "factory",
            f"{factory!r} trains {centroids} centroids on at least {needed} vectors "
            f"({MIN_POINTS_PER_CENTROID} per centroid), the gallery has {available}: expected "
            "fewer IVF lists or PQ bits",
        )
    return min(available, max(needed, min(MAX_POINTS_PER_CENTROID * centroids, TRAIN_CAP)))


def _largest_kmeans(index: Any) -> int:
    """Centroids of the largest k-means training `index` runs: its IVF lists, its product
    quantizer's codebooks, an OPQ rotation's (trained with 8-bit codebooks)."""
    faiss = require_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    sizes = [1, ivf.nlist if ivf is not None else 1]
    inner = index
    if isinstance(index, faiss.IndexPreTransform):
        inner = faiss.downcast_index(index.index)
        for i in range(index.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(index.chain.at(i)), faiss.OPQMatrix):
                sizes.append(256)
    pq = getattr(ivf if ivf is not None else inner, "pq", None)
    sizes.append(pq.ksub if pq is not None else 1)
    return max(sizes)


def default_search_params(index: Any) -> str:
    """The search parameters recorded with a new index (`query --faiss-params` overrides them):
    probe 1/128 of the IVF lists (at least 16), or an HNSW beam of 128. Measured on 3.6M region
    tokens in 4096 lists: nprobe 32 and 128 kept the same share of exhaustive SCAN's top 10
    (98.1% and 98.0% with a 1% shortlist), 32 in 194 ms per query, 128 in 262 ms."""
    faiss = require_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return f"nprobe={min(ivf.nlist, max(16, ivf.nlist // 128))}"
    if "HNSW" in type(index).__name__:
        return "efSearch=128"
    return ""


def apply_search_params(index: Any, params: str, where: Path) -> None:
    """Set FAISS search parameters ("nprobe=32", "efSearch=64", "nprobe=16,efSearch=64") on an
    opened index; one the index does not have is a one-line UserError."""
    if not params:
        return
    faiss = require_faiss()
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError:
        message = f"{type(index).__name__} takes no search parameters {params!r}: {PARAMS_HELP}"
        raise input_error(where, "faiss_params", message) from None


def write_faiss_index(
    path: Path,
    factory: str,
    dim: int,
    count: int,
    sample: Callable[[int], np.ndarray],
    blocks: Callable[[], Iterable[np.ndarray]],
    where: Path,
) -> dict[str, Any]:
    """Build the inner-product index `factory` over `count` float32 vectors of `dim` — trained on
    `sample(n)` (n random vectors, when the index needs training), filled from `blocks()` in
    order (FAISS ids are positions) — and write it to `path`; returns its manifest record."""
    faiss = require_faiss()
    started = time.perf_counter()
    index = make_faiss_index(factory, dim, where)
    trained_on = training_vectors(index, count, where, factory)
    if trained_on:
        index.train(np.ascontiguousarray(sample(trained_on), dtype=np.float32))
    for block in blocks():
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    if index.ntotal != count:  # an internal invariant, not a user error
        raise RuntimeError(f"{path}: indexed {index.ntotal} vectors, expected {count}")
    faiss.write_index(index, str(path))
    return {
        "file": path.name,
        "factory": factory,
        "type": type(index).__name__,
        "vectors": int(index.ntotal),
        "dim": dim,
        "trained_on": trained_on,
        "search_params": default_search_params(index),
        "build_seconds": round(time.perf_counter() - started, 3),
        "bytes": path.stat().st_size,
    }


def open_faiss_index(path: Path, record: dict[str, Any]) -> Any:
    """The index `write_faiss_index` wrote (flat codes memory-mapped, `IO_FLAG_MMAP_IFC`, faiss
    ≥ 1.11; IVF and graph indexes read into memory), checked against its manifest `record`:
    an inner-product index of the recorded vectors and dimension (the record's `type` is what
    `index_factory` made, which FAISS may read back as a subclass: IndexFlat → IndexFlatIP)."""
    faiss = require_faiss()
    fix = "re-run scan-deploy index"
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        raise input_error(path, None, f"not a readable FAISS index: {fix}") from None
    found = (index.metric_type, index.ntotal, index.d)
    expected = (faiss.METRIC_INNER_PRODUCT, record["vectors"], record["dim"])
    if found != expected:
        metric = "inner-product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "L2"
        raise input_error(
            path,
            None,
            f"is an {metric} {type(index).__name__} of {found[1]} × {found[2]}, expected an "
            f"inner-product index of {expected[1]} × {expected[2]} (its manifest record): {fix}",
        )
    return index


def faiss_installed() -> bool:
    return _faiss() is not None


def require_faiss() -> Any:
    faiss = _faiss()
    if faiss is None:
        raise UserError(FAISS_HINT)
    return faiss


def _faiss_in_this_thread(threads: int) -> Any:
    """FAISS, with `threads` OpenMP threads for searches from the calling thread (libgomp keeps
    the setting per thread, so it is set before each search; 0 leaves FAISS's default)."""
    faiss = require_faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    return faiss


@functools.cache
def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    LOG.info("shortlist: faiss %s", faiss.__version__)
    return faiss
