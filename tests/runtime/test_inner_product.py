"""The shortlist's inner-product top-k: numpy and FAISS find the same items, and the engine
choice falls back, refuses and names itself as documented."""

import threading

import numpy as np
import pytest
from scan_deploy.runtime import inner_product
from scan_deploy.runtime.inner_product import (
    check_engine,
    gallery_engine,
    search_faiss_index,
    top_inner_products,
)

from scan_deploy.errors import UserError
from tests.runtime.engines import SHORTLIST_ENGINES, needs_faiss


def vectors(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("engine", SHORTLIST_ENGINES)
@pytest.mark.parametrize("k", [1, 7, 50, 80])
def test_engines_find_the_largest_inner_products(engine, k):
    queries, items = vectors(5, 0), vectors(50, 1)
    scores, indices = top_inner_products(queries, items, k, engine)
    kept = min(k, 50)
    assert scores.shape == indices.shape == (5, kept)
    exact = queries @ items.T
    expected = np.argsort(-exact, axis=1)[:, :kept]
    for q in range(5):
        assert set(indices[q].tolist()) == set(expected[q].tolist())
        order = np.argsort(indices[q])
        np.testing.assert_allclose(
            scores[q][order], exact[q, np.sort(indices[q])], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("engine", SHORTLIST_ENGINES)
def test_memory_mapped_items_are_read_in_place(engine, tmp_path):
    items = vectors(40, 2)
    np.save(tmp_path / "g.npy", items)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    _, got = top_inner_products(vectors(3, 3), mapped, 5, engine)
    _, want = top_inner_products(vectors(3, 3), items, 5, "numpy")
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]


def test_no_items_gives_empty_results():
    scores, indices = top_inner_products(vectors(2, 0), vectors(0, 1), 5, "numpy")
    assert scores.shape == indices.shape == (2, 0)


@needs_faiss
def test_auto_takes_faiss_only_for_a_gallery_with_an_index(monkeypatch):
    assert check_engine("auto") == "auto" and check_engine("faiss") == "faiss"
    assert gallery_engine("auto", has_index=True) == "faiss"
    assert gallery_engine("auto", has_index=False) == "numpy"  # faiss.knn: slower than numpy
    assert gallery_engine("faiss", has_index=False) == "faiss"
    assert gallery_engine("numpy", has_index=True) == "numpy"
    monkeypatch.setattr(inner_product, "_faiss", lambda: None)
    assert gallery_engine("auto", has_index=True) == "numpy"
    with pytest.raises(UserError, match=r"faiss is not installed: pip install 'scan-deploy\[faiss"):
        check_engine("faiss")


def test_unknown_engine_is_refused():
    expected = "^shortlist_engine: got 'annoy', expected one of auto, numpy, faiss$"
    with pytest.raises(UserError, match=expected):
        check_engine("annoy")


@needs_faiss
def test_faiss_threads_are_set_in_the_searching_thread():
    """libgomp keeps the thread count per thread: a search from another thread gets it too."""
    import faiss

    seen = []
    items = vectors(50, 1)

    def search():
        top_inner_products(vectors(2, 0), items, 5, "faiss", threads=1)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search)
    worker.start()
    worker.join()
    assert seen == [1]


@needs_faiss
def test_an_index_search_that_leaves_places_empty_is_refused():
    import faiss

    fp16, metric = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexScalarQuantizer(16, fp16, metric)
    index.add(vectors(10, 1))
    _, found = search_faiss_index(index, vectors(2, 0), 10, threads=1)
    assert sorted(found[0].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="fewer candidates than asked: non-finite query"):
        search_faiss_index(index, np.full((1, 16), np.nan, np.float32), 10)
