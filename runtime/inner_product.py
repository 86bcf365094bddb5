"""The first stage of two-stage retrieval: the k largest inner products of each query's pooled
embedding with a block of gallery embeddings. Both engines are exact (the same products, up to
float summation order, so near-ties may swap at the k-th place):

- `numpy`: one GEMM, then `argpartition` per query;
- `faiss`: `faiss.knn` (blocked BLAS GEMM with a fused heap, OpenMP threads), when faiss-cpu is
  installed: `pip install 'scan-deploy[faiss]'`.

`auto` takes FAISS when it imports, numpy otherwise. The blocks are the gallery's read-only
memory maps; neither engine copies them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from scan_deploy.errors import UserError, one_of

LOG = logging.getLogger("scan_deploy.runtime")
ENGINES = ("auto", "numpy", "faiss")
FAISS_HINT = "faiss is not installed: pip install 'scan-deploy[faiss]' (or faiss-cpu)"


def resolve_engine(engine: str) -> str:
    """`numpy` or `faiss`: the engine a shortlist named `engine` runs on."""
    if one_of(engine, ENGINES, "--shortlist-engine") == "numpy":
        return engine
    if _faiss() is None:
        if engine == "faiss":
            raise UserError(FAISS_HINT)
        return "numpy"
    return "faiss"


def top_inner_products(
    queries: np.ndarray, items: np.ndarray, k: int, engine: str
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (queries, min(k, items)), of the largest `queries @ items.T` per
    query, in no particular order; `engine` as `resolve_engine` returns it."""
    k = min(k, len(items))
    if not k:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if engine == "faiss":
        faiss = _faiss()
        return faiss.knn(queries, items, k, metric=faiss.METRIC_INNER_PRODUCT)
    scores = queries @ items.T
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, best, axis=1), best


@functools.cache
def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    LOG.info("shortlist: faiss %s", faiss.__version__)
    return faiss
