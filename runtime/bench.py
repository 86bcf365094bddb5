"""`scan-deploy bench`: latency and throughput of text→image search, as trtexec summarizes an
engine: warm-up, then per batch size the p50/p95/p99 latency of one `search_text` call, queries
per second and (image, query) pairs scored per second; with a shortlist, its top-k agreement with
exhaustive SCAN on the same queries.

Queries are the gallery's own texts (the first caption of each indexed image), drawn with a seed;
a gallery indexed without captions is benchmarked on seeded random word sequences from the
vocabulary.

A batch is at most MAX_BATCH queries (4096): the retriever scores queries in batches of the
engine's optimal size (`Retriever.sizes.text_batch`), so a larger call only repeats those batches
(queries/s no longer changes) while one timed call takes minutes on a large gallery.
`progress(stage, advance, total)` is told of every call (warm-up and timed: stage `batch N`,
total warm-up + iterations; then `shortlist agreement`, total 2), as
`scan_deploy.progress.stage_bars` draws it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from scan_deploy.runtime.first_stage import reads_index
from scan_deploy.runtime.gallery import Gallery
from scan_deploy.runtime.indexer import Progress
from scan_deploy.runtime.inner_product import gallery_engine
from scan_deploy.runtime.retriever import Retriever, stage_of
from scan_deploy.runtime.search import Hit

from scan_deploy.choices import FirstStage
from scan_deploy.errors import UserError

AGREEMENT_QUERIES = 50
MAX_BATCH = 4096


def check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    """Every batch size is 1 to MAX_BATCH queries (a one-line UserError otherwise)."""
    for batch in batch_sizes:
        if not 1 <= batch <= MAX_BATCH:
            raise UserError(
                f"batch_sizes: expected 1 to {MAX_BATCH} queries per call, got {batch} (the "
                "retriever scores queries in batches the engine takes: larger calls only repeat "
                "those)"
            )


def bench_queries(retriever: Retriever, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = retriever.galleries["images"].texts
    if texts:
        return [texts[i] for i in rng.integers(0, len(texts), count)]
    words = [w for w in retriever.bundle.vocab.word2idx if not w.startswith("<")]
    return [" ".join(rng.choice(words, 8)) for _ in range(count)]


def run_bench(
    retriever: Retriever,
    batch_sizes: Sequence[int] = (1, 8, 32),
    k: int = 10,
    shortlist: int | None = None,
    warmup: int = 3,
    iterations: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    check_batch_sizes(batch_sizes)
    report_progress = progress or (lambda stage, advance, total: None)
    gallery = retriever.gallery_for("text", k, shortlist)
    rows = []
    for batch in batch_sizes:
        queries = bench_queries(retriever, batch * (warmup + iterations), seed)
        seconds = []
        for i in range(warmup + iterations):
            start = time.perf_counter()
            retriever.search_text(queries[i * batch : (i + 1) * batch], k, shortlist)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
            report_progress(f"batch {batch}", 1, warmup + iterations)
        ms = np.array(seconds) * 1e3
        rows.append(
            {
                "batch": batch,
                "p50_ms": float(np.percentile(ms, 50)),
                "p95_ms": float(np.percentile(ms, 95)),
                "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()),
                "qps": float(batch / np.mean(seconds)),
                "pairs_per_s": float(batch * gallery.count / np.mean(seconds)),
            }
        )
    report = {
        "backend": retriever.backend.name,
        "precision": retriever.backend.precision,
        "gallery": {"items": gallery.count, "dtype": gallery.dtype},
        "scorer": "int8" if retriever.scorers[gallery.kind].stored else "float",
        "k": k,
        "shortlist": shortlist,
        **first_stage_report(retriever, gallery),
        "warmup": warmup,
        "iterations": iterations,
        "batches": rows,
    }
    if shortlist is not None:
        report["agreement"] = shortlist_agreement(retriever, k, shortlist, seed, report_progress)
    return report


def first_stage_report(retriever: Retriever, gallery: Gallery) -> dict:
    """The first stage a shortlist runs on `gallery`, and the FAISS index it reads (its
    factory string; None when it reads the float32 globals with numpy)."""
    stage = stage_of(gallery, retriever.first_stage)
    engine = gallery_engine(retriever.shortlist_engine, stage in gallery.first_stages)
    record = gallery.first_stages[stage] if reads_index(gallery, stage, engine) else None
    return {
        "first_stage": stage,
        "shortlist_engine": "faiss" if stage == FirstStage.MAXSIM else engine,
        "first_stage_index": None if record is None else record["factory"],
    }


def shortlist_agreement(
    retriever: Retriever, k: int, shortlist: int, seed: int, progress: Progress
) -> dict:
    """Mean fraction of exhaustive SCAN's top k that the shortlisted search also returns, and
    how often its top 1 agrees."""
    queries = bench_queries(retriever, AGREEMENT_QUERIES, seed + 1)
    exact = retriever.search_text(queries, k)
    progress("shortlist agreement", 1, 2)
    fast = retriever.search_text(queries, k, shortlist)
    progress("shortlist agreement", 1, 2)
    return {"queries": len(queries), **agreement(exact, fast, seed)}


def agreement(exact: list[list[Hit]], fast: list[list[Hit]], seed: int = 0) -> dict:
    """Per query, the share of `exact`'s hits that `fast` also returns, and whether their first
    hits agree: the means, with 95% intervals — a bootstrap over queries (2000 resamples,
    seeded) for the top-k share, Wilson's score interval for the top-1 proportion."""
    overlap = np.array(
        [
            len({h.index for h in a} & {h.index for h in b}) / len(a)
            for a, b in zip(exact, fast, strict=True)
        ]
    )
    top1 = sum(a[0].index == b[0].index for a, b in zip(exact, fast, strict=True))
    resampled = np.random.default_rng(seed).integers(0, len(overlap), (2000, len(overlap)))
    means = overlap[resampled].mean(axis=1)
    return {
        "top_k_agreement": float(overlap.mean()),
        "top_k_ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "top_1_agreement": top1 / len(exact),
        "top_1_ci95": list(wilson_interval(top1, len(exact))),
    }


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion `hits` / `n` (sound at 0 and n, unlike the
    normal approximation)."""
    centre = (hits + z**2 / 2) / (n + z**2)
    half = z * np.sqrt(hits * (n - hits) / n + z**2 / 4) / (n + z**2)
    return float(centre - half), float(centre + half)
