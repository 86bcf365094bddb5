"""Exhaustive text→image search on an int8 gallery, on the ONNX Runtime CPU backend: the float
scorer (rows dequantized to float32, the bundle's scorer) against the int8 scorer (the stored
uint8 codes straight into an integer GEMM, `export/scorer.int8_gallery_scorer_graph`), every
number side by side in one run.

    .venv/bin/python benchmarks/bench_int8_scorer.py [--images 10000] [--dim 1024]
        [--iterations 20] [--batch 32] [--threads 2] [--json]

Built in a temporary folder (`--workdir` picks its parent): the untrained, seeded D=1024 bundle
and the structured synthetic int8 gallery of `bench_query.py` (its helpers), and queries made
in embedding space from gallery regions (`bench_query.make_queries`), fed straight to
`search.exhaustive` as the retriever feeds them. The int8 scorer is the graph
`calibrate --precision int8` writes, built here without its gate: the model is untrained, so
its accuracy is the gate's business (on a trained model: tests/calibration, the README), and
this reports the two paths' top-10 agreement and largest score difference instead.

Reported per path: p50/p95 of one query (k = 10) and its split (scorer calls vs gallery reads
and dequantization), pairs/s with `--batch` queries per call; the logits GEMM of one query alone
in each precision (fp32 MatMul of the dequantized rows, u8s8 MatMulInteger of the codes) against
the GEMM peak of that precision measured in the same run (4096 × 1024 × 4096), and the gallery
bytes each path reads per query.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
from bench_logits_precision import float_session, int8_session, peaks
from bench_query import (
    TimedRunner,
    build_bundle,
    cropped,
    make_queries,
    stats,
    text_batches,
    write_gallery,
)
from scan_deploy.export.scorer import int8_gallery_scorer_graph
from scan_deploy.export.verify import session
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.base import CallSizes
from scan_deploy.runtime.gallery import open_gallery
from scan_deploy.runtime.search import GalleryScorer, exhaustive
from workload import workload_parser

from scan_deploy.bundle import load_bundle


def parse_args() -> Namespace:
    parser = workload_parser(__doc__.split("\n")[0])
    parser.set_defaults(images=10_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="queries per call, batched run")
    parser.add_argument("--agreement", type=int, default=50, help="queries compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--img-dim", type=int, default=2048)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--concepts", type=int, default=256)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


class SessionRunner:
    """An ONNX Runtime session as a runner: feeds by name, the graph's inputs only."""

    def __init__(self, sess) -> None:
        self.session, self.names = sess, [value.name for value in sess.get_inputs()]

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.session.run(None, {name: feeds[name] for name in self.names})


def single(scorer: GalleryScorer, timer: TimedRunner, gallery, queries, args) -> dict:
    """One query per exhaustive call: latency and the time inside the scorer calls."""
    block = CallSizes.of(open_backend(load_bundle(args.bundle))).block("images")
    seconds, inside = [], []
    for i in range(args.warmup + args.iterations):
        one = cropped(queries, [i])
        timer.reset()
        start = time.perf_counter()
        exhaustive(scorer, one, gallery, 10, block)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            inside.append(timer.seconds)
    return {**stats(seconds), "scorer_ms": 1e3 * float(np.median(inside)), "block": block}


def batched(scorer: GalleryScorer, gallery, queries, args) -> dict:
    block = CallSizes.of(open_backend(load_bundle(args.bundle))).block("images")
    start = time.perf_counter()
    for batch in text_batches(queries, args.batch):
        exhaustive(scorer, batch, gallery, 10, block)
    seconds = time.perf_counter() - start
    return {"queries": queries.count, "pairs_per_s": queries.count * gallery.count / seconds}


def top10(scorer: GalleryScorer, gallery, queries, count: int) -> tuple[np.ndarray, np.ndarray]:
    block = 256
    scores, indices = zip(
        *(exhaustive(scorer, cropped(queries, [i]), gallery, 10, block) for i in range(count)),
        strict=True,
    )
    return np.concatenate(scores), np.concatenate(indices)


def gemm_alone(args, words: int, peak: dict) -> dict:
    """The logits GEMM of one query over the whole gallery, each precision, vs its peak."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.images * args.regions, args.dim), np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    scale = (np.abs(rows).max(axis=1) / 127).astype(np.float32)
    codes = (np.rint(rows / scale[:, None]) + 128).astype(np.uint8)
    text = rng.standard_normal((words, args.dim), np.float32)
    ops = 2 * rows.shape[0] * args.dim * words
    result = {}
    for name, sess, feeds, precision in (
        ("fp32", float_session(False, args.threads), {"rows": rows}, "fp32"),
        ("int8 (u8s8)", int8_session("u8 rows", args.threads),
         {"rows": codes, "row_scale": scale}, "int8"),
    ):  # fmt: skip
        feeds = {**feeds, "words": text}
        sess.run(None, feeds)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        result[name] = {
            "ms": 1e3 * seconds,
            "gops": ops / seconds / 1e9,
            "of_peak": ops / seconds / 1e9 / peak[precision],
            "gallery_mb": next(iter(feeds.values())).nbytes / 1e6,
        }
    return result


def run(args: Namespace, work: Path) -> dict:
    args.bundle = str(build_bundle(work / "bundle", args))
    bundle = load_bundle(args.bundle)
    write_gallery(str(work / "gallery"), args.bundle, args, args.images, "int8", float("inf"))
    gallery = open_gallery(work / "gallery")
    queries = make_queries(gallery, args.warmup + max(args.iterations, args.agreement), args.seed)
    timers = {
        "float": TimedRunner(open_backend(bundle, threads=args.threads).runner("scorer")),
        "int8": TimedRunner(
            SessionRunner(session(int8_gallery_scorer_graph(bundle.config, "images"), args.threads))
        ),
    }
    scorers = {
        "float": GalleryScorer(timers["float"], "t2i"),
        "int8": GalleryScorer(timers["int8"], "t2i", stored=True),
    }
    report: dict = {"args": vars(args), "paths": {}}
    for name, scorer in scorers.items():
        report["paths"][name] = {
            "single": single(scorer, timers[name], gallery, queries, args),
            "batched": batched(scorer, gallery, queries, args),
        }
    exact_scores, exact = top10(scorers["float"], gallery, queries, args.agreement)
    fast_scores, fast = top10(scorers["int8"], gallery, queries, args.agreement)
    report["agreement"] = {
        "queries": args.agreement,
        "top10": float(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, fast, strict=True)])
        ),
        "top1": float(np.mean(exact[:, 0] == fast[:, 0])),
        "max_score_difference_top1": float(np.abs(exact_scores[:, 0] - fast_scores[:, 0]).max()),
    }
    peak = peaks(args.threads, 5)
    words = int(np.median(queries.arrays["lengths"]))
    report["peak_gops"] = peak
    report["gemm_alone"] = gemm_alone(args, words, peak)
    report["gemm_words"] = words
    return report


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_int8_scorer.", dir=args.workdir))
    try:
        report = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
        return
    paths = report["paths"]
    print(
        f"{args.images} int8 images × {args.regions} regions × D {args.dim}, {args.threads} "
        f"threads, exhaustive text query, k = 10 (scorer block {paths['float']['single']['block']})"
    )
    print(
        f"{'path':8} {'p50 ms':>8} {'p95 ms':>8} {'in scorer':>10} "
        f"{f'pairs/s (batch {args.batch})':>22}"
    )
    for name, r in paths.items():
        s = r["single"]
        print(
            f"{name:8} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} {s['scorer_ms']:8.1f}ms "
            f"{r['batched']['pairs_per_s']:22,.0f}"
        )
    ratio = paths["float"]["single"]["p50_ms"] / paths["int8"]["single"]["p50_ms"]
    batch_ratio = paths["int8"]["batched"]["pairs_per_s"] / paths["float"]["batched"]["pairs_per_s"]
    print(f"int8 / float: {ratio:.2f}× faster per query, {batch_ratio:.2f}× the pairs/s batched")
    a = report["agreement"]
    print(
        f"agreement over {a['queries']} queries: top-10 {100 * a['top10']:.1f}%, top-1 "
        f"{100 * a['top1']:.1f}%, largest top-1 score difference "
        f"{a['max_score_difference_top1']:.2e}"
    )
    peak = report["peak_gops"]
    print(
        f"logits GEMM of one query alone ({report['gemm_words']} words; peaks in this run: fp32 "
        f"{peak['fp32']:.0f} GFLOP/s, u8s8 {peak['int8']:.0f} GOP/s):"
    )
    for name, g in report["gemm_alone"].items():
        print(
            f"  {name:12} {g['ms']:7.1f} ms {g['gops']:6.0f} GOP/s = {100 * g['of_peak']:3.0f}% of "
            f"its peak, reads {g['gallery_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
