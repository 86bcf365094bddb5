"""`run_bench` on a tiny gallery: every call is reported to the progress callback, and batch
sizes outside 1..MAX_BATCH are refused in one line before anything runs."""

import numpy as np
import pytest
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.bench import MAX_BATCH, check_batch_sizes, run_bench
from scan_deploy.runtime.indexer import index_gallery
from scan_deploy.runtime.retriever import Retriever

from scan_deploy.bundle import load_bundle
from scan_deploy.errors import UserError
from tests.export.tiny_bundle import make_bundle

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> Retriever:
    """5 seeded images (R=5, img_dim 10) with one caption each, indexed in fp32."""
    root = tmp_path_factory.mktemp("bench")
    bundle = load_bundle(make_bundle(root / "bundle"))
    features = np.random.default_rng(0).standard_normal((5, 5, 10)).astype(np.float32)
    np.save(root / "ims.npy", features)
    (root / "caps.txt").write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(5)))
    index_gallery(bundle, open_backend(bundle), root / "ims.npy", root / "caps.txt",
                  root / "gallery", dtype="fp32")  # fmt: skip
    return Retriever.open(bundle, root / "gallery")


def test_progress_is_told_of_every_call(retriever):
    calls = []
    report = run_bench(retriever, (1, 3), k=2, shortlist=3, warmup=1, iterations=2,
                       progress=lambda *call: calls.append(call))  # fmt: skip
    assert calls == [
        *[("batch 1", 1, 3)] * 3,
        *[("batch 3", 1, 3)] * 3,
        *[("shortlist agreement", 1, 2)] * 2,
    ]
    assert [row["batch"] for row in report["batches"]] == [1, 3]
    assert report["warmup"] == 1 and report["iterations"] == 2
    assert all(row["p50_ms"] > 0 and row["qps"] > 0 for row in report["batches"])


def test_batch_sizes_outside_the_limit_are_refused_before_any_search(retriever, monkeypatch):
    def searched(*args, **kwargs):
        raise AssertionError("searched before the batch sizes were checked")

    monkeypatch.setattr(retriever, "search_text", searched)
    for sizes, bad in (((1, 100_000), 100_000), ((MAX_BATCH + 1,), MAX_BATCH + 1), ((0,), 0)):
        with pytest.raises(UserError) as info:
            run_bench(retriever, sizes, progress=lambda *call: None)
        assert str(info.value) == (
            f"batch_sizes: expected 1 to 4096 queries per call, got {bad} (the retriever scores "
            "queries in batches the engine takes: larger calls only repeat those)"
        )
    check_batch_sizes([1, MAX_BATCH])  # the limit itself is allowed


def test_agreement_reports_means_with_95_percent_intervals():
    """Per-query overlap of the exact top k, its bootstrap interval, and Wilson's interval for
    the top 1 (known values: 0 of 10 → [0, 0.2775], 10 of 10 → [0.7225, 1])."""
    from scan_deploy.runtime.bench import agreement, wilson_interval
    from scan_deploy.runtime.search import Hit

    def hits(*indices):
        return [Hit(i, str(i), 0.0, None) for i in indices]

    exact = [hits(0, 1), hits(2, 3), hits(4, 5), hits(6, 7)]
    fast = [hits(0, 1), hits(3, 9), hits(8, 9), hits(6, 7)]
    found = agreement(exact, fast, seed=1)
    assert found["top_k_agreement"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert found["top_1_agreement"] == 0.5
    low, high = found["top_k_ci95"]
    assert 0 <= low < found["top_k_agreement"] < high <= 1
    assert found["top_1_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert agreement(exact, exact)["top_k_ci95"] == [1.0, 1.0]
