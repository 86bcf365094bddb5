"""First stages of two-stage retrieval on a trained model: how much of exhaustive SCAN's top 10
each keeps (with 95% confidence intervals), at which shortlist sizes, for what latency, build
time and memory — every number measured side by side in one run (ONNX Runtime CPU backend).

    .venv/bin/python benchmarks/bench_first_stage.py --bundle runs/demo/bundle \\
        --data DATA [--images 100000] [--queries 200] [--shortlist 0.001 0.005 0.01] \\
        [--maxsim-factory SQfp16 IVF4096,SQ8 ...] [--threads 2] [--workdir DIR] [--json]

DATA holds the precomp files of the bundle's model (`test_ims.npy`, `test_caps.txt`): for the
README's numbers, the demo model (`make demo`) and a larger test split of the same synthetic
world (the world does not depend on the seed):

    scan-deploy data synth --out DATA --train 500 --dev 10 --test 100000 --img-dim 256 \\
        --noise 0.5 --seed 1

What it does, in a temporary folder under `--workdir` (kept with `--keep`):
- indexes the first `--images` images (fp16 gallery) and one caption per image (their first:
  a caption gallery as large as the image gallery), with a `global` (SQfp16) index and the first
  `--maxsim-factory` as the `maxsim` index (build time and bytes of each); the other maxsim
  factories are built beside it and swapped in, one at a time;
- draws `--queries` text queries (another caption of a random image) and `--queries` image
  queries (a random image's region features), seeded;
- ground truth: exhaustive exact SCAN top 10 of every query (batched);
- per first stage (global by numpy over the float32 globals, global on its SQfp16 index, maxsim
  on each factory) and shortlist size (a fraction of the gallery): the share of the exact top
  10 the two-stage search keeps, with a 95% bootstrap interval over queries (2000 resamples),
  and the share of queries whose top 1 agrees (95% Wilson interval); the first stage's p50
  latency for one query alone (`--latency-queries`), and the whole two-stage query's p50.

A target line says, per direction, the smallest shortlist reaching ≥ 99% top-10 agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.bench import agreement
from scan_deploy.runtime.first_stage import default_candidates, shortlist, write_stage_index
from scan_deploy.runtime.indexer import index_gallery
from scan_deploy.runtime.inner_product import open_faiss_index
from scan_deploy.runtime.retriever import Retriever

from scan_deploy.bundle import load_bundle
from scan_deploy.choices import FirstStage
from scan_deploy.precomp import load_files


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--latency-queries", type=int, default=20)
    parser.add_argument("--shortlist", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02])
    parser.add_argument("--maxsim-factory", nargs="+", default=["IVF4096,SQ8"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32])
    parser.add_argument(
        "--token-candidates",
        type=float,
        nargs="+",
        default=[],
        help="× shortlist × tokens per item (default: the runtime's own default)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="the work folder of a --keep run: its gallery"
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(args, work: Path) -> tuple[Path, Path, list[str]]:
    """Features of the first `--images` images (the file itself when it holds no more) and one
    caption per image; returns (features, captions file, all captions of those images)."""
    data = load_files(args.data / "test_ims.npy", args.data / "test_caps.txt")
    n = min(args.images, len(data.images))
    per = data.captions_per_image
    features = args.data / "test_ims.npy"
    if n < len(data.images):
        features = work / "ims.npy"
        if not features.exists():
            np.save(features, np.asarray(data.images[:n]))
    captions = work / "caps.txt"
    captions.write_text("\n".join(data.captions[i * per] for i in range(n)) + "\n")
    return features, captions, data.captions[: n * per], per


def agreement_row(exact, fast, seed: int) -> dict:
    found = agreement(exact, fast, seed)
    return {
        "top10": found["top_k_agreement"],
        "top10_ci": found["top_k_ci95"],
        "top1": found["top_1_agreement"],
        "top1_ci": found["top_1_ci95"],
    }


def p50_ms(seconds: list[float]) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, 50))


def search(retriever: Retriever, direction: str, queries, k: int, size: int | None):
    if direction == "t2i":
        return retriever.search_text(queries, k, size)
    return retriever.search_image(queries, k, size)


def encode(retriever: Retriever, direction: str, queries):
    if direction == "t2i":
        return retriever.encode_text(queries)
    return retriever.encode_images(queries)


def latency(retriever, direction, queries, size, stage, engine) -> dict:
    """p50 of one query alone: the first stage (encoded query in hand) and the whole search."""
    gallery = retriever.galleries["images" if direction == "t2i" else "captions"]
    first, whole = [], []
    for i in range(len(queries)):
        one = queries[i : i + 1]
        encoded = encode(retriever, direction, one)
        start = time.perf_counter()
        shortlist(encoded, gallery, size, stage, retriever.pooling, engine, retriever.threads,
                  retriever.token_candidates)  # fmt: skip
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        search(retriever, direction, one, 10, size)
        whole.append(time.perf_counter() - start)
    return {"first_stage_p50_ms": p50_ms(first), "two_stage_p50_ms": p50_ms(whole)}


def use_maxsim_index(retriever: Retriever, built: dict, nprobe: int | None) -> None:
    """Swap a built maxsim index (per kind: (path, record)) into the retriever's galleries."""
    for kind, (path, record) in built.items():
        gallery = retriever.galleries[kind]
        index = open_faiss_index(path, record)
        if nprobe is not None and "IVF" in record["factory"]:
            index.nprobe = nprobe
        gallery.first_stages[FirstStage.MAXSIM] = record
        gallery._indexes[FirstStage.MAXSIM] = index


def main() -> None:
    args = parse_args()
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = args.reuse or Path(tempfile.mkdtemp(prefix="bench_first_stage.", dir=parent))
    try:
        report = run(args, work)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)


def run(args, work: Path) -> dict:
    bundle = load_bundle(args.bundle)
    features, captions_file, all_captions, per = prepare(args, work)
    backend = open_backend(bundle, threads=args.threads)
    gallery_path = work / "gallery"
    first, *others = args.maxsim_factory
    start = time.perf_counter()
    if args.reuse:
        log(f"reusing {gallery_path}")
        counts = {kind: json.loads((gallery_path / kind / "manifest.json").read_text())["count"]
                  for kind in ("images", "captions")}  # fmt: skip
    else:
        log(f"indexing {features} (global SQfp16, maxsim {first})")
        stages = {"global": "SQfp16", "maxsim": first}
        counts = index_gallery(bundle, backend, features, captions_file, gallery_path, "fp16",
                               first_stages=stages)  # fmt: skip
    index_seconds = time.perf_counter() - start
    retriever = Retriever.open(bundle, gallery_path, threads=args.threads)
    builds = {first: {}}
    for kind, gallery in retriever.galleries.items():
        record = gallery.first_stages[FirstStage.MAXSIM]
        builds[first][kind] = (gallery.path / record["file"], record)
    for factory in others:
        builds[factory] = {}
        for kind, gallery in retriever.galleries.items():
            path = work / f"{kind}-{len(builds)}.faiss"
            log(f"building maxsim {factory} over {gallery.token_count} {kind} tokens")
            record = write_stage_index(gallery, FirstStage.MAXSIM, factory, work, path)
            builds[factory][kind] = (path, record)
    rng = np.random.default_rng(args.seed)
    n = counts["images"]
    picked = rng.choice(n, min(args.queries, n), replace=False)
    queries = {
        "t2i": [all_captions[i * per + min(1, per - 1)] for i in picked],
        "i2t": np.asarray(load_files(features, None).images[np.sort(picked)]),
    }
    report = {
        "bundle": str(args.bundle),
        "images": n,
        "captions": counts["captions"],
        "queries": len(picked),
        "index_seconds": index_seconds,
        "threads": args.threads,
        "builds": {
            factory: {kind: record for kind, (_, record) in built.items()}
            for factory, built in builds.items()
        },
        "global_index": {
            kind: g.first_stages[FirstStage.GLOBAL] for kind, g in retriever.galleries.items()
        },
        "directions": {},
    }
    for direction, batch in queries.items():
        log(f"{direction}: exhaustive ground truth for {len(picked)} queries")
        start = time.perf_counter()
        exact = search(retriever, direction, batch, 10, None)
        exhaustive_s = time.perf_counter() - start
        rows = []
        configs = [("global", "numpy", None, None, None), ("global", "faiss", None, None, None)]
        for factory in builds:
            for nprobe in args.nprobe if "IVF" in factory else [None]:
                for factor in args.token_candidates or [None]:
                    configs.append(("maxsim", "faiss", factory, nprobe, factor))
        for stage, engine, factory, nprobe, factor in configs:
            if factory is not None:
                use_maxsim_index(retriever, builds[factory], nprobe)
            retriever.first_stage = FirstStage(stage)
            retriever.shortlist_engine = engine
            for fraction in args.shortlist:
                size = max(10, round(fraction * n))
                gallery = retriever.galleries["images" if direction == "t2i" else "captions"]
                per_item = math.ceil(gallery.token_count / gallery.count)
                retriever.token_candidates = (
                    None if factor is None else max(64, round(factor * size * per_item))
                )
                pools_query = (direction == "t2i") == (bundle.config.cross_attn == "t2i")
                per_token = retriever.token_candidates or default_candidates(
                    gallery, size, pools_query
                )
                log(f"{direction} {stage} {factory or engine} nprobe={nprobe} ×{factor} {size}")
                start = time.perf_counter()
                fast = search(retriever, direction, batch, 10, size)
                batch_s = time.perf_counter() - start
                row = {
                    "stage": stage,
                    "index": factory or ("SQfp16" if engine == "faiss" else "float32 numpy"),
                    "nprobe": nprobe,
                    "token_candidates": per_token if stage == "maxsim" else None,
                    "shortlist": size,
                    "fraction": size / n,
                    **agreement_row(exact, fast, args.seed),
                    "batched_ms_per_query": 1e3 * batch_s / len(picked),
                    **latency(
                        retriever,
                        direction,
                        batch[: args.latency_queries],
                        size,
                        FirstStage(stage),
                        engine,
                    ),  # fmt: skip
                }
                rows.append(row)
        report["directions"][direction] = {
            "exhaustive_ms_per_query": 1e3 * exhaustive_s / len(picked),
            "rows": rows,
        }
    return report


def print_report(report: dict) -> None:
    print(
        f"{report['images']} images, {report['captions']} captions, {report['queries']} queries "
        f"per direction, {report['threads']} threads; indexing {report['index_seconds']:.0f} s"
    )
    for factory, kinds in report["builds"].items():
        for kind, record in kinds.items():
            print(
                f"  maxsim {factory} ({kind}): {record['vectors']} tokens, "
                f"{record['bytes'] / 2**20:.0f} MiB, trained on {record['trained_on']}, "
                f"built in {record['build_seconds']:.1f} s"
            )
    for direction, result in report["directions"].items():
        print(f"\n{direction}: exhaustive {result['exhaustive_ms_per_query']:.0f} ms/query batched")
        print(
            f"{'stage':7} {'index':16} {'nprobe':>6} {'tok/qt':>7} {'short':>6} {'%':>5} "
            f"{'top10 [95% CI]':>22} {'top1 [95% CI]':>22} {'1st p50':>8} {'2-stage':>8} "
            f"{'batched':>8}"
        )
        best = None
        for r in result["rows"]:
            ci10, ci1 = r["top10_ci"], r["top1_ci"]
            print(
                f"{r['stage']:7} {r['index']:16} {r['nprobe'] or '':>6} "
                f"{r['token_candidates'] or '':>7} {r['shortlist']:>6} "
                f"{100 * r['fraction']:>5.2f} "
                f"{100 * r['top10']:6.1f} [{100 * ci10[0]:5.1f}, {100 * ci10[1]:5.1f}] "
                f"{100 * r['top1']:6.1f} [{100 * ci1[0]:5.1f}, {100 * ci1[1]:5.1f}] "
                f"{r['first_stage_p50_ms']:8.1f} {r['two_stage_p50_ms']:8.1f} "
                f"{r['batched_ms_per_query']:8.1f}"
            )
            if r["top10"] >= 0.99 and (best is None or r["fraction"] < best["fraction"]):
                best = r
        if best is None:
            print("target (top-10 ≥ 99% with a shortlist ≤ 1%): not reached at these sizes")
        else:
            met = "met" if best["fraction"] <= 0.01 else "missed"
            print(
                f"target (top-10 ≥ 99% with a shortlist ≤ 1%): {met}, smallest: {best['stage']} "
                f"{best['index']} at {100 * best['fraction']:.2f}%"
            )


if __name__ == "__main__":
    main()
