"""The first stages (`runtime/first_stage.py`): the pooled `global` stage and the multi-vector
`maxsim` stage over a FAISS index of every token, built from index-factory strings; every way
a first stage can be refused."""

import json

import numpy as np
import pytest
from scan_deploy.runtime import inner_product
from scan_deploy.runtime.first_stage import (
    Pooling,
    _item_pooled,
    _query_pooled,
    default_factory,
    global_shortlist,
    maxsim_shortlist,
    query_tokens,
)
from scan_deploy.runtime.gallery import open_gallery
from scan_deploy.runtime.gallery_writer import GalleryWriter
from scan_deploy.runtime.search import Queries

from scan_deploy.choices import FirstStage
from scan_deploy.errors import UserError
from tests.runtime.engines import needs_faiss
from tests.runtime.test_gallery import COUNT, D, fake_bundle, write

pytestmark = needs_faiss
SUM = Pooling("t2i", "Sum")  # ColBERT's MaxSim: text queries' words pooled by a sum


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def text_queries(count: int = 5, words: int = 4, seed: int = 7) -> Queries:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, words + 1, count)
    vectors = unit(rng.standard_normal((count, words, D)))
    vectors[np.arange(words)[None, :] >= lengths[:, None]] = 0
    pooled = unit(vectors.sum(axis=1))
    return Queries({"words": vectors, "lengths": lengths, "global": pooled})


def image_queries(count: int = 4, regions: int = 3, seed: int = 8) -> Queries:
    vectors = unit(np.random.default_rng(seed).standard_normal((count, regions, D)))
    return Queries({"regions": vectors, "global": unit(vectors.mean(axis=1))})


def pool(values: np.ndarray, agg_func: str, lambda_lse: float = 6.0) -> float:
    if agg_func == "LogSumExp":
        return float(np.log(np.exp(lambda_lse * values.astype(np.float64)).sum()) / lambda_lse)
    return float({"Mean": np.mean, "Max": np.max, "Sum": np.sum}[agg_func](values))


def exact_hard_scan(
    query_vectors: np.ndarray, item_tokens: list[np.ndarray], pooling: Pooling, query: str
) -> np.ndarray:
    """SCAN with hard attention, by brute force: each pooled token's best inner product with
    the other side's tokens, pooled by the model's aggregation over the pooled side (the
    caption's words for t2i: the query's for text queries, the item's for image queries)."""
    pools_query = (query == "text") == (pooling.cross_attn == "t2i")
    axis = 1 if pools_query else 0
    return np.array(
        [
            pool((query_vectors @ tokens.T).max(axis=axis), pooling.agg_func, pooling.lambda_lse)
            for tokens in item_tokens
        ]
    )


def exact_maxsim(query_vectors: np.ndarray, item_tokens: list[np.ndarray]) -> np.ndarray:
    """ColBERT's MaxSim: Σ over query tokens of the best inner product with an item token."""
    return exact_hard_scan(query_vectors, item_tokens, SUM, "text")


def item_tokens(kind: str, items: dict) -> list[np.ndarray]:
    if kind == "images":
        return list(items["regions"])
    return [w[:n] for w, n in zip(items["clean_words"], items["lengths"], strict=True)]


@pytest.mark.parametrize("agg_func", ["LogSumExp", "Mean", "Max", "Sum"])
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
@pytest.mark.parametrize(
    ("kind", "queries"), [("images", text_queries()), ("captions", image_queries())]
)
def test_maxsim_over_every_token_is_exact_hard_attention_scan(
    tmp_path, kind, queries, cross_attn, agg_func
):
    """A flat float32 index asked for every token: each item's score is exactly SCAN's with
    hard attention (either side pooled, every aggregation), so the shortlist is its ranking
    (ties by lower index)."""
    pooling = Pooling(cross_attn, agg_func, 6.0)
    query = "text" if kind == "images" else "image"
    path, items, manifest = write(tmp_path, kind, "fp32", first_stages={"maxsim": "Flat"})
    gallery = open_gallery(path)
    record = manifest["first_stages"]["maxsim"]
    tokens = item_tokens(kind, items)
    assert record["vectors"] == gallery.token_count == sum(len(t) for t in tokens)
    assert record["factory"] == "Flat" and record["trained_on"] == 0
    vectors, owners = query_tokens(queries)
    got = maxsim_shortlist(queries, gallery, COUNT, pooling, token_candidates=gallery.token_count)
    for q in range(queries.count):
        scores = exact_hard_scan(vectors[owners == q], tokens, pooling, query)
        np.testing.assert_array_equal(got[q], np.lexsort((np.arange(COUNT), -scores)))


def test_token_order_and_vectors_follow_the_gallery(tmp_path):
    path, items, _ = write(tmp_path, "captions", "fp32", first_stages={"maxsim": "Flat"})
    gallery = open_gallery(path)
    every = np.concatenate(list(gallery.token_blocks(items=3)))
    np.testing.assert_array_equal(every, np.concatenate(item_tokens("captions", items)))
    picked = np.array([0, 4, 5, 33])
    np.testing.assert_array_equal(gallery.token_vectors(picked), every[picked])
    np.testing.assert_array_equal(gallery.token_owner(picked), [0, 2, 2, 10])  # lengths 1, 3, 2


class TenTokensEach:
    """A gallery whose item i owns tokens 10i .. 10i+9."""

    count = 10
    token_starts = np.arange(0, 101, 10)

    def token_owner(self, tokens):
        return np.asarray(tokens) // 10


def test_items_a_query_token_missed_get_its_lowest_retrieved_score():
    """XTR's imputation, query tokens pooled: token 0 retrieved items 1 (0.9) and 2 (0.5);
    token 1 retrieved item 2 (0.8) only: its lowest retrieved score (0.8) stands in for item 1."""
    scores = np.array([[0.9, 0.5], [0.8, 0.0]], np.float32)
    tokens = np.array([[10, 20], [21, -1]])  # -1: the IVF search found nothing more
    items, totals = _query_pooled(scores, tokens, TenTokensEach(), SUM)
    np.testing.assert_array_equal(items, [1, 2])
    np.testing.assert_allclose(totals, [0.9 + 0.8, 0.5 + 0.8])


def test_item_tokens_nobody_retrieved_get_the_lowest_retrieved_score():
    """Item tokens pooled: query token 0 retrieved tokens 10 (0.9) and 20 (0.5), query token 1
    token 20 (0.7) and 11 (0.6). Token 20's best is 0.7, token 10's 0.9, 11's 0.6; each item's 8
    or 9 other tokens get the lowest retrieved score, min(0.5, 0.6) = 0.5."""
    scores = np.array([[0.9, 0.5], [0.7, 0.6]], np.float32)
    tokens = np.array([[10, 20], [20, 11]])
    items, totals = _item_pooled(scores, tokens, TenTokensEach(), SUM)
    np.testing.assert_array_equal(items, [1, 2])
    np.testing.assert_allclose(totals, [0.9 + 0.6 + 8 * 0.5, 0.7 + 9 * 0.5], rtol=1e-6)
    mean = _item_pooled(scores, tokens, TenTokensEach(), Pooling("t2i", "Mean"))[1]
    np.testing.assert_allclose(mean, totals / 10, rtol=1e-6)
    lse = _item_pooled(scores, tokens, TenTokensEach(), Pooling("t2i", "LogSumExp", 6.0))[1]
    expected = [pool(np.array([0.9, 0.6] + [0.5] * 8), "LogSumExp"),
                pool(np.array([0.7] + [0.5] * 9), "LogSumExp")]  # fmt: skip
    np.testing.assert_allclose(lse, expected, rtol=1e-6)


def test_too_few_token_candidates_are_doubled_until_the_shortlist_is_full(tmp_path):
    path, _, _ = write(tmp_path, "images", "fp16", first_stages={"maxsim": None})
    gallery = open_gallery(path)
    got = maxsim_shortlist(text_queries(), gallery, 9, SUM, token_candidates=1)
    assert got.shape == (5, 9)
    assert all(len(set(row)) == 9 for row in got.tolist())
    full = maxsim_shortlist(text_queries(), gallery, 9, SUM, token_candidates=gallery.token_count)
    assert np.isin(full[:, 0], got).all()  # the exact best is among them either way


def large_gallery(tmp_path, factory: str, count: int = 400):
    """`count` images of R=5 clustered regions (2000 tokens: enough to train 16 centroids)."""
    rng = np.random.default_rng(11)
    centres = unit(rng.standard_normal((12, D)))
    regions = unit(
        centres[rng.integers(0, 12, (count, 5))] + 0.3 * rng.standard_normal((count, 5, D))
    )
    arrays = {"regions": regions, "global": unit(regions.mean(axis=1))}
    with GalleryWriter(
        tmp_path / "large", "images", fake_bundle(tmp_path), "fp32", 128,
        first_stages={"maxsim": factory},
    ) as writer:  # fmt: skip
        writer.add(arrays, [str(i) for i in range(count)])
    return open_gallery(tmp_path / "large"), list(regions)


def test_an_ivf_global_stage_that_finds_fewer_fills_with_other_items(tmp_path):
    """An IVF global index probing 1 of 4 lists finds about a quarter of the gallery: a larger
    shortlist keeps what it found, best first, then the lowest-indexed other items (as the
    maxsim stage does) — not an error."""
    rng = np.random.default_rng(3)
    regions = unit(rng.standard_normal((400, 5, D)))
    arrays = {"regions": regions, "global": unit(regions.mean(axis=1))}
    with GalleryWriter(
        tmp_path / "g", "images", fake_bundle(tmp_path), "fp32", 128,
        first_stages={"global": "IVF4,Flat"},
    ) as writer:  # fmt: skip
        writer.add(arrays, [str(i) for i in range(400)])
    gallery = open_gallery(tmp_path / "g")
    index = gallery.stage_index(FirstStage.GLOBAL, "nprobe=1")
    pooled = arrays["global"][:3]
    queries = Queries({"regions": regions[:3], "global": pooled})
    _, found = index.search(pooled, 300)
    assert (found < 0).any()  # one list holds fewer than 300 items
    rows = global_shortlist(queries, gallery, 300, "faiss")
    for row, searched in zip(rows, found, strict=True):
        kept = searched[searched >= 0]
        assert len(set(row)) == 300 and list(row[: len(kept)]) == list(kept)
        assert list(row[len(kept) :]) == sorted(set(range(400)) - set(kept))[: 300 - len(kept)]


@pytest.mark.parametrize(
    ("factory", "trained_on"),
    [("IVF16,SQ8", 2000), ("HNSW16,SQfp16", 0), ("PQ4x4", 2000), ("IVF8,PQ4x4fs", 2000)],
)
def test_factory_strings_train_on_a_sample_and_keep_exact_maxsims_best(
    tmp_path, factory, trained_on
):
    gallery, tokens = large_gallery(tmp_path, factory)
    record = gallery.first_stages[FirstStage.MAXSIM]
    assert record["factory"] == factory and record["vectors"] == 2000
    assert record["trained_on"] == trained_on
    if "IVF" in factory:
        gallery.stage_index(FirstStage.MAXSIM, "nprobe=16")  # every list
    rng = np.random.default_rng(12)  # queries: noisy copies of 4 regions of 20 images
    words = unit(np.stack(tokens[:20])[:, :4] + 0.2 * rng.standard_normal((20, 4, D)))
    queries = Queries({"words": words, "lengths": np.full(20, 4), "global": words[:, 0]})
    vectors, owners = query_tokens(queries)
    exact = [np.argmax(exact_maxsim(vectors[owners == q], tokens)) for q in range(20)]
    found = maxsim_shortlist(queries, gallery, 20, SUM)  # 5% of the gallery
    kept = np.mean([best in row for best, row in zip(exact, found, strict=True)])
    assert kept >= 0.9, kept


def test_default_factories():
    assert default_factory(FirstStage.GLOBAL, 10**9) == "SQfp16"
    assert default_factory(FirstStage.MAXSIM, 2**18) == "SQfp16"
    assert default_factory(FirstStage.MAXSIM, 3_600_000) == "IVF4096,SQ8"  # as measured
    assert default_factory(FirstStage.MAXSIM, 36_000_000) == "IVF16384,SQ8"
    assert default_factory(FirstStage.MAXSIM, 10**12) == "IVF65536,SQ8"


def test_global_stage_takes_a_factory_string_too(tmp_path):
    path, items, manifest = write(tmp_path, "images", "fp32", first_stages={"global": "Flat"})
    gallery = open_gallery(path)
    q = text_queries()
    exact = np.argsort(-(q.arrays["global"] @ items["global"].T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(global_shortlist(q, gallery, 4, "faiss"), exact)
    np.testing.assert_array_equal(global_shortlist(q, gallery, 4, "numpy"), exact)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("IVFbad", r"factory: FAISS cannot make an index of 'IVFbad' for 8 dimensions: expected"),
        ("IVF64,SQ8", r"'IVF64,SQ8' trains 64 centroids on at least 2496 vectors .* has 55"),
        ("OPQ4,Flat", r"'OPQ4,Flat' trains 256 centroids on at least 9984 vectors"),
        (" ", r"factory: expected a FAISS index-factory string, got nothing"),
    ],
)
def test_a_factory_faiss_refuses_is_one_line_and_writes_nothing(tmp_path, factory, message):
    with pytest.raises(UserError, match=message) as caught:
        write(tmp_path, "images", "fp16", first_stages={"maxsim": factory})
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "gallery").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_search_params_are_refused(tmp_path):
    gallery, _ = large_gallery(tmp_path, "IVF8,Flat")
    assert gallery.stage_index(FirstStage.MAXSIM).nprobe == 8  # recorded: all 8 (< 16) lists
    with pytest.raises(UserError, match=r"faiss_params: IndexIVFFlat takes no search param"):
        gallery.stage_index(FirstStage.MAXSIM, "efSearch=3")


def test_a_gallery_indexed_without_the_stage_is_refused_in_one_line(tmp_path):
    path, _, _ = write(tmp_path, "images", "fp16", first_stages={"global": None})
    with pytest.raises(UserError, match=r"first_stages: the gallery has no maxsim first stage "):
        maxsim_shortlist(text_queries(), open_gallery(path), 3, SUM)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r, p: r.update(vectors=54), r"first_stages.maxsim.vectors: got 54, expected 55"),
        (lambda r, p: r.update(dim=4), r"first_stages.maxsim.dim: got 4, expected 8"),
        (lambda r, p: r.update(file="global.faiss"), r"maxsim.file: got 'global.faiss'"),
        (lambda r, p: r.update(bytes=5), r"maxsim.faiss: size: is \d+ bytes"),
        (lambda r, p: r.pop("factory"), r"first_stages.maxsim.factory: expected a string"),
        (lambda r, p: (p / "maxsim.faiss").unlink(), r"maxsim.faiss: missing"),
    ],
)
def test_a_bad_stage_record_is_refused_in_one_line(tmp_path, change, message):
    path, _, manifest = write(tmp_path, "images", "fp16", first_stages={"maxsim": None})
    change(manifest["first_stages"]["maxsim"], path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message) as caught:
        open_gallery(path)
    assert "\n" not in str(caught.value)


def test_an_index_of_another_gallery_is_refused(tmp_path):
    """Copied with its record from a gallery of other items, the index passes the manifest's
    sha256 and size, and is refused when opened (its vector count is another gallery's)."""
    one, _, _ = write(tmp_path, "captions", "fp16", name="a", first_stages={"maxsim": None})
    other, _, m = write(tmp_path, "images", "fp16", name="b", first_stages={"maxsim": None})
    theirs = json.loads((one / "manifest.json").read_text())
    (other / "maxsim.faiss").write_bytes((one / "maxsim.faiss").read_bytes())
    m["first_stages"]["maxsim"] = {**theirs["first_stages"]["maxsim"], "vectors": 55}
    (other / "manifest.json").write_text(json.dumps(m))
    gallery = open_gallery(other)
    with pytest.raises(UserError, match=r"is an inner-product \w+ of 34 × 8, expected .* 55 × 8"):
        gallery.stage_index(FirstStage.MAXSIM)


def test_stages_need_faiss_and_write_nothing_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(inner_product, "_faiss", lambda: None)
    with pytest.raises(UserError, match=r"faiss is not installed: pip install 'scan-deploy\[faiss"):
        GalleryWriter(
            tmp_path / "g", "images", fake_bundle(tmp_path), first_stages={"maxsim": None}
        )
    assert not (tmp_path / "g").exists()


def test_stages_are_checked_before_any_work(tmp_path):
    """`index` checks each stage's factory against the gallery's sizes before encoding."""
    from scan_deploy.runtime.first_stage import check_stages

    where = tmp_path / "g" / "images"
    stages = check_stages({"maxsim": "IVF8,SQ8", "global": None}, D, 10, 400, where)
    assert stages == {FirstStage.MAXSIM: "IVF8,SQ8", FirstStage.GLOBAL: None}
    with pytest.raises(UserError, match=r"g/images: factory: 'IVF8,SQ8' trains 8 centroids on at"):
        check_stages({"global": "IVF8,SQ8"}, D, 10, 400, where)  # 10 pooled vectors
    with pytest.raises(UserError, match=r"factory: FAISS cannot make an index of 'PQ3' for 8 dim"):
        check_stages({"maxsim": "PQ3"}, D, 10, 400, where)
    with pytest.raises(UserError, match=r"first_stages: got 'bm25', expected one of global, maxs"):
        check_stages({"bm25": None}, D, 10, 400, where)
