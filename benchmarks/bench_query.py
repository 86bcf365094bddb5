"""Text→image query latency, throughput, shortlist agreement and memory of the retrieval runtime
(ONNX Runtime CPU backend), every number printed side by side in one run.

    .venv/bin/python benchmarks/bench_query.py [--images 10000] [--large 1000000]
        [--large-budget 240] [--shortlist 1000] [--threads 2] [--json]

The README's numbers: `--large 1000000 --large-budget 700` (1M int8 images, 44.6 GB: larger
than this machine's 23 GiB of memory, so the re-rank reads from disk).

What it builds, in a temporary folder removed at the end (`--workdir` picks its parent):
- a bundle exported from an untrained, seeded SCAN (embed 1024, word_dim 300, t2i,
  clipped_l2norm, LogSumExp: the defaults; `--img-dim` only sizes the image encoder, which is
  not on the query path);
- two galleries written with `GalleryWriter` (Grams computed by the writer) from synthetic,
  seeded, L2-normalised region embeddings with structure: each image draws a few of
  `--concepts` concept vectors and each region is one of them plus noise (in a `--latent`-dim
  subspace of R^D), so images that share concepts have related regions, Grams and pooled
  embeddings. `--images` (default fp16) for the exhaustive path, `--large` (default int8) for the
  shortlist. The large one is written in a child process (so its memory does not count against
  the querying process) until `--large` images or `--large-budget` seconds or 80% of the free
  disk, whichever comes first; numbers for `--large` are then EXTRAPOLATED linearly from the size
  written, and the output says so.

Queries are built in embedding space, not from text: with an untrained model, encoded text would
be unrelated to synthetic images and agreement numbers would mean nothing. Each query's words are
noisy copies of random regions of one gallery image (10-22 words, as captions with
<start>/<end>), L2-normalised, with their Gram and pooled (mean, L2-normalised) embedding, and go
straight to `exhaustive` / `reranked` with the bundle's scorer runner. The end-to-end single
query (`Retriever.search_text`, text encoding included) is timed on random vocabulary words.

`--captions` (default 100) is the number of queries of the batched run.

The bundle is exported with `scan-deploy export`'s default shape ranges (`--max-batch`,
`--max-words`), and every call is sized as the runtime sizes it on that bundle and backend
(`CallSizes.of(backend)`): gallery blocks of `image_block` images, query batches of
`text_batch` captions.

Reported: p50/p95/p99 latency of one query, exhaustive, search only and end to end; batched
queries (sorted by length, `text_batch` per scorer call, as `search_text` does) in pairs/s vs the
single path; the shortlist search on the large gallery (shortlist engine `auto`, and which engine
that resolved to) split into shortlist and re-rank stages, its top-10 and top-1 agreement with
exhaustive SCAN on a subset of queries (sized by `--agreement-budget`); resident set (VmRSS,
VmHWM, RssAnon, RssFile, ru_maxrss) before/after querying vs the gallery's size on disk, and one
cold-cache query; GFLOP/s of the logits GEMM (2·N·R·D·T per query, T the padded words of the
scorer call) vs a measured fp32 GEMM peak and the bytes/s of the shortlist stage vs a measured
memory read bandwidth. Breakdowns are measured by timing the scorer calls, the gallery reads and
the same GEMM alone, not guessed. The large gallery gets a float16 FAISS index (`index
--faiss-index`) when faiss is installed. Side by side on the same data in the same run: the
shortlist stage alone by numpy (exact), `faiss.knn` (exact) and the FAISS index (p50 over the
same queries, and how many of numpy's candidates each keeps; FAISS skipped when not installed),
and the runtime's
dequantization of one stored `regions` block (`to_float32`) vs numpy's plain `astype(float32)`
(times the int8 scale), the baseline it replaced.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto
from scan_deploy.export.writer import ShapeRanges, export_bundle
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.base import CallSizes
from scan_deploy.runtime.dequantize import to_float32
from scan_deploy.runtime.first_stage import global_shortlist
from scan_deploy.runtime.gallery import Gallery, open_gallery
from scan_deploy.runtime.gallery_format import stored_arrays
from scan_deploy.runtime.gallery_writer import GalleryWriter
from scan_deploy.runtime.inner_product import FAISS_HINT, faiss_installed, gallery_engine
from scan_deploy.runtime.retriever import Retriever
from scan_deploy.runtime.search import GalleryScorer, Queries, exhaustive, reranked
from workload import gemm_peak, workload_parser

from scan_deploy import cli
from scan_deploy.allocator import keep_freed_memory
from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.choices import FirstStage, ShortlistEngine
from scan_deploy.config import ModelConfig
from scan_deploy.int8_rows import INT8_ZERO_POINT
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary

MIB = 1024 * 1024
FLOAT = TensorProto.FLOAT
WRITE_BATCH = 1024  # images per GalleryWriter.add
SHORTLIST_ENGINE = ShortlistEngine.AUTO  # of the latency rows; the engine it resolves to is printed
SHORTLIST_SIZES = (1000, 2000, 5000, 10000)  # exact top-k recall inside the shortlist, by size
TARGETS = {"single_p50_ms": 50.0, "shortlist_p50_ms": 200.0, "agreement": 0.99}


def parse_args():
    parser = workload_parser(__doc__.split("\n")[0])
    parser.set_defaults(images=10_000, captions=100)  # captions: queries of the batched run
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--large-budget", type=float, default=240.0, help="seconds of writing")
    parser.add_argument("--shortlist", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--dtype", default="fp16", help="storage of the --images gallery")
    parser.add_argument("--large-dtype", default="int8")
    parser.add_argument("--img-dim", type=int, default=2048)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=5000, help="synthetic vocabulary words")
    parser.add_argument("--concepts", type=int, default=256)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--agreement-budget", type=float, default=90.0, help="seconds")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache query")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Synthetic data


def unit(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)).astype(np.float32)


class SyntheticImages:
    """Seeded images with structure: each image draws `topics` of `concepts` unit vectors, each
    region is one of them plus Gaussian noise (norm ≈ `noise`), all in a `latent`-dim subspace
    of R^D spanned by orthonormal rows (so L2-normalising in the subspace normalises in R^D)."""

    def __init__(self, args, topics: int = 3, noise: float = 0.6) -> None:
        rng = np.random.default_rng(args.seed)
        self.regions, self.seed, self.topics, self.noise = args.regions, args.seed, topics, noise
        self.concepts = unit(rng.standard_normal((args.concepts, args.latent)))
        basis = np.linalg.qr(rng.standard_normal((args.dim, args.latent)))[0]
        self.basis = np.ascontiguousarray(basis.T, dtype=np.float32)  # (latent, D)

    def batch(self, start: int, n: int) -> dict[str, np.ndarray]:
        """Images start..start+n: `regions` (n, R, D) and `global` (n, D) as the encoder pools."""
        rng = np.random.default_rng([self.seed, start])
        latent = self.basis.shape[0]
        topics = rng.integers(0, len(self.concepts), (n, self.topics))
        which = np.take_along_axis(topics, rng.integers(0, self.topics, (n, self.regions)), 1)
        noise = rng.standard_normal((n, self.regions, latent), dtype=np.float32)
        z = unit(self.concepts[which] + noise * np.float32(self.noise / math.sqrt(latent)))
        regions = (z.reshape(-1, latent) @ self.basis).reshape(n, self.regions, -1)
        return {"regions": regions, "global": unit(z.mean(axis=1)) @ self.basis}


def make_queries(gallery: Gallery, count: int, seed: int, noise: float = 0.5) -> Queries:
    """Queries whose words are noisy copies of random regions of random gallery images."""
    rng = np.random.default_rng([seed, 1])
    targets = np.sort(rng.choice(gallery.count, count, replace=False))
    regions = gallery.rows("regions", targets)
    lengths = rng.integers(10, 23, count)
    longest, dim = int(lengths.max()), regions.shape[2]
    picked = np.take_along_axis(
        regions, rng.integers(0, regions.shape[1], (count, longest))[..., None], 1
    )
    words = unit(
        picked + rng.standard_normal(picked.shape, np.float32) * np.float32(noise / math.sqrt(dim))
    )
    words[np.arange(longest)[None] >= lengths[:, None]] = 0
    arrays = {
        "words": words,
        "lengths": lengths.astype(np.int64),
        "caption_gram": words @ words.transpose(0, 2, 1),
        "global": unit(words.sum(axis=1) / lengths[:, None]),
    }
    return Queries(arrays)


def cropped(queries: Queries, rows: np.ndarray) -> Queries:
    """Queries `rows`, their words cut to the longest of them (as one encoder batch gives)."""
    part = queries.take(np.asarray(rows))
    t = int(part.arrays["lengths"].max())
    arrays = dict(part.arrays)
    arrays["words"] = np.ascontiguousarray(arrays["words"][:, :t])
    arrays["caption_gram"] = np.ascontiguousarray(arrays["caption_gram"][:, :t, :t])
    return Queries(arrays)


def text_batches(queries: Queries, batch: int) -> list[Queries]:
    """Longest first, `batch` per batch, each cut to its longest: as `search_text` batches."""
    order = np.argsort(-queries.arrays["lengths"], kind="stable")
    return [cropped(queries, order[s : s + batch]) for s in range(0, len(order), batch)]


def random_texts(bundle, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 2])
    words = [w for w in bundle.vocab.word2idx if not w.startswith("<")]
    return [" ".join(rng.choice(words, int(rng.integers(8, 21)))) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# Bundle and galleries


def build_bundle(path: Path, args) -> Path:
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(args.vocab))], threshold=1)
    config = ModelConfig(
        vocab_size=len(vocab), img_dim=args.img_dim, embed_size=args.dim, word_dim=args.word_dim
    )
    torch.manual_seed(args.seed)
    checkpoint = Checkpoint(SCAN(config).eval(), vocab, path.parent / "ckpt", {"epoch": 0})
    defaults = inspect.signature(cli.export_command).parameters  # `scan-deploy export`'s
    ranges = ShapeRanges.create(
        max_batch=defaults["max_batch"].default,
        regions=args.regions,
        max_words=defaults["max_words"].default,
    )
    export_bundle(checkpoint, path, 17, ranges)
    return path


def bytes_per_image(args, dtype: str) -> int:
    """Stored bytes per image (all arrays, ids/texts approximated)."""
    sizes = {"R": args.regions, "D": args.dim}
    axes = {"regions": "RD", "region_gram": "RR", "global": "D"}
    total = 40
    for name, dt in stored_arrays("images", dtype).items():
        shape = axes.get(name, "R")  # the int8 scales: one per row
        total += dt.itemsize * math.prod(sizes[a] for a in shape)
    return total


def write_gallery(
    path: str, bundle: str, args, count: int, dtype: str, budget: float, faiss_index: bool = False
) -> dict:
    """Write `count` images (fewer when `budget` seconds run out); runs in a child process."""
    images, bundle_ = SyntheticImages(args), load_bundle(bundle)
    generate = add = 0.0
    start = time.perf_counter()
    stages = {FirstStage.GLOBAL: "SQfp16"} if faiss_index else None
    with GalleryWriter(path, "images", bundle_, dtype, first_stages=stages) as writer:
        while writer.count < count and time.perf_counter() - start < budget:
            n = min(WRITE_BATCH, count - writer.count)
            t0 = time.perf_counter()
            batch = images.batch(writer.count, n)
            t1 = time.perf_counter()
            ids = [str(i) for i in range(writer.count, writer.count + n)]
            writer.add(batch, ids, [f"synthetic image {i}" for i in ids])
            generate, add = generate + t1 - t0, add + time.perf_counter() - t1
    seconds = time.perf_counter() - start
    written = writer.manifest["count"]
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {
        "count": written,
        "seconds": seconds,
        "generate_s": generate,
        "writer_add_s": add,
        "close_s": seconds - generate - add,
        "bytes": disk,
        "dtype": dtype,
        "faiss_index": faiss_index,
    }


def in_child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def affordable(args, dtype: str, where: Path) -> int:
    """--large capped to 80% of the free disk."""
    free = shutil.disk_usage(where).free
    return max(1, min(args.large, int(0.8 * free / bytes_per_image(args, dtype))))


# ----------------------------------------------------------------------------------------------
# Measuring


class TimedRunner:
    """A runner that adds up the time and calls spent in the wrapped runner."""

    def __init__(self, runner) -> None:
        self.runner, self.seconds, self.calls = runner, 0.0, 0

    def run(self, feeds):
        start = time.perf_counter()
        out = self.runner.run(feeds)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


class TimedShard:
    """A shard whose `block` reads add to its gallery's `seconds`."""

    def __init__(self, shard, owner: TimedGallery) -> None:
        self.shard, self.owner = shard, owner

    def __getattr__(self, name):
        return getattr(self.shard, name)

    def block(self, name, start, stop):
        begin = time.perf_counter()
        out = self.shard.block(name, start, stop)
        self.owner.seconds += time.perf_counter() - begin
        return out


class TimedGallery:
    """A gallery whose reads (`rows`, and `block` of its shards) add up in `seconds`: what
    `exhaustive` and `reranked` spend reading and dequantizing, inside the same calls."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery, self.seconds, self.shards_touched = gallery, 0.0, []
        self.shards = [TimedShard(shard, self) for shard in gallery.shards]

    def __getattr__(self, name):
        return getattr(self.gallery, name)

    def rows(self, name, indices):
        if name == "regions":
            which = np.searchsorted(self.gallery.offsets, indices, side="right")
            self.shards_touched.append(len(np.unique(which)))
        start = time.perf_counter()
        out = self.gallery.rows(name, indices)
        self.seconds += time.perf_counter() - start
        return out


def float_scorer(runner) -> GalleryScorer:
    """The bundle's (t2i) scorer on dequantized rows, through the timing runner."""
    return GalleryScorer(runner, "t2i")


def shortlisted(scorer, one: Queries, gallery, args, block: int) -> tuple[float, np.ndarray]:
    """(seconds of the global first stage, top-k indices) of one two-stage search."""
    start = time.perf_counter()
    candidates = global_shortlist(one, gallery, args.shortlist, SHORTLIST_ENGINE)
    seconds = time.perf_counter() - start
    _, top = reranked(float_scorer(scorer), one, gallery, args.k, candidates, block)
    return seconds, top


def stats(seconds) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def memory() -> dict[str, float]:
    """MiB: VmRSS, VmHWM (peak since the last reset), RssAnon, RssFile, and ru_maxrss."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM (and so ru_maxrss) to the current RSS (Linux `clear_refs` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def drop_cache(folder: Path) -> None:
    """Ask the kernel to drop the cached pages of every file under `folder`."""
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def gemm_alone(items: int, regions: int, dim: int, words: int, threads: int, block: int) -> float:
    """Seconds of the logits GEMM alone, as the scorer computes it (ONNX Runtime MatMul of the
    flattened regions and the transposed words), in blocks of `block` items as `exhaustive`
    feeds the scorer."""
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Transpose", ["words"], ["words_t"], perm=[1, 0]),
            onnx.helper.make_node("MatMul", ["regions", "words_t"], ["logits"]),
        ],
        "logits",
        [value("regions", FLOAT, ["n", dim]), value("words", FLOAT, ["t", dim])],
        [value("logits", FLOAT, ["n", "t"])],
    )
    session = ort_session(graph, threads)
    rng = np.random.default_rng(0)
    feeds = {
        "regions": rng.standard_normal((block * regions, dim), np.float32),
        "words": rng.standard_normal((words, dim), np.float32),
    }
    blocks = math.ceil(items / block)
    session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(blocks):
        session.run(None, feeds)
    return time.perf_counter() - start


def ort_session(graph, threads: int):
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def read_bandwidth(megabytes: int = 1024) -> dict[str, float]:
    """GB/s of a float32 sum (one thread) and of a GEMV (BLAS threads) over an in-RAM array."""
    array = np.ones((megabytes * MIB // 4096, 1024), np.float32)
    vector = np.ones(1024, np.float32)
    out = {}
    for name, fn in (("sum", array.sum), ("gemv", lambda: array @ vector)):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        out[name + "_gb_s"] = 3 * array.nbytes / (time.perf_counter() - start) / 1e9
    return out


def dequantize_rates(gallery: Gallery, block: int, repeats: int = 5) -> dict:
    """G elements/s of turning one stored `regions` block of `block` rows (read into memory
    first) into float32: the runtime's `to_float32`, as `Shard.block` calls it, vs numpy's plain
    `astype(float32)` (times the per-row scale for int8), the baseline it replaced; and whether
    both give the same bits."""
    shard = gallery.shards[0]
    stop = min(block, shard.count)
    raw = np.ascontiguousarray(shard.load("regions")[:stop])
    scale = None
    if "regions_scale" in shard.files:
        scale = np.ascontiguousarray(shard.load("regions_scale")[:stop])
    rates = {}
    for name, fn in (("runtime", to_float32), ("numpy_astype", astype_float32)):
        fn(raw, scale)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(raw, scale)
        rates[name + "_gelem_s"] = repeats * raw.size / (time.perf_counter() - start) / 1e9
    return {
        **rates,
        "ratio": rates["runtime_gelem_s"] / rates["numpy_astype_gelem_s"],
        "identical": bool(np.array_equal(to_float32(raw, scale), astype_float32(raw, scale))),
        "elements": raw.size,
    }


def astype_float32(raw: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """numpy's dequantization before `to_float32`: `astype` (less the uint8 codes' zero point),
    then the int8 scale in place."""
    values = raw.astype(np.float32)
    if raw.dtype == np.uint8:
        values -= INT8_ZERO_POINT
    if scale is not None:
        values *= scale[..., None]
    return values


def shortlist_engines(gallery: Gallery, queries: Queries, args) -> dict:
    """The shortlist stage alone, one query per call as `reranked` runs it, by each method this
    install has: numpy over the float32 globals (exact), `faiss.knn` over the same globals
    (exact), and the gallery's float16 FAISS index. p50 over the queries after the warm-up,
    speed-up over numpy, and how many of numpy's (exact) candidates each keeps (as a set, and at
    the same rank)."""
    methods = {"numpy": (gallery, "numpy")}
    if faiss_installed():
        methods["faiss knn"] = (replace(gallery, first_stages={}), "faiss")
        if FirstStage.GLOBAL in gallery.first_stages:
            methods["faiss fp16 index"] = (gallery, "faiss")
    timings, picked = {}, {}
    for method, (target, engine) in methods.items():
        seconds, rows = [], []
        for i in range(queries.count):
            one = queries.take(np.array([i]))
            start = time.perf_counter()
            rows.append(global_shortlist(one, target, args.shortlist, engine))
            seconds.append(time.perf_counter() - start)
        timings[method] = stats(seconds[args.warmup :])
        picked[method] = np.concatenate(rows[args.warmup :])
    exact = picked["numpy"]
    compared = {
        method: {
            "speedup": timings["numpy"]["p50_ms"] / timings[method]["p50_ms"],
            "same_candidates": float(
                np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, rows, strict=True)])
            ),
            "same_rank": float(np.mean(exact == rows)),
        }
        for method, rows in picked.items()
        if method != "numpy"
    }
    report: dict = {"queries": queries.count - args.warmup, "methods": timings}
    report["vs_numpy"] = compared
    if compared:
        report["faiss_threads"] = faiss_threads()
    return report


def faiss_threads() -> int:
    """The OpenMP threads FAISS searches run on here (the bench passes no thread count: FAISS's
    default, every core)."""
    import faiss

    return faiss.omp_get_max_threads()


def agreement(exact: np.ndarray, fast: np.ndarray) -> dict[str, float]:
    k = exact.shape[1]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(exact, fast, strict=True)]
    return {
        "queries": len(exact),
        "top_k": float(np.mean(overlap)),
        "top_1": float(np.mean(exact[:, 0] == fast[:, 0])),
    }


# ----------------------------------------------------------------------------------------------
# The benchmarks


def bench_single(
    scorer: TimedRunner, gallery: Gallery, queries: Queries, args, sizes: CallSizes
) -> dict:
    """One query per `exhaustive` call: latency, its split (scorer, reads, the rest), GFLOP/s."""
    timed, block = TimedGallery(gallery), sizes.block(gallery.kind)
    seconds, scorer_s, read_s, flops = [], [], [], []
    for i in range(args.warmup + args.iterations):
        one = cropped(queries, [i])
        scorer.reset()
        timed.seconds = 0.0
        start = time.perf_counter()
        exhaustive(float_scorer(scorer), one, timed, args.k, block)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            scorer_s.append(scorer.seconds)
            read_s.append(timed.seconds)
            flops.append(2 * gallery.count * args.regions * args.dim * one.arrays["words"].shape[1])
    words = int(np.median(queries.arrays["lengths"][args.warmup : len(seconds) + args.warmup]))
    gemm = gemm_alone(gallery.count, args.regions, args.dim, words, args.threads, block)
    by_words = {
        t: gemm_alone(gallery.count, args.regions, args.dim, t, args.threads, block)
        for t in (16, 17)
    }
    other = np.array(seconds) - np.array(scorer_s) - np.array(read_s)
    elements = gallery.count * args.regions * (args.dim + args.regions)
    return {
        **stats(seconds),
        "scorer_ms": 1e3 * float(np.median(scorer_s)),
        "read_dequant_ms": 1e3 * float(np.median(read_s)),
        "read_gelem_s": elements / float(np.median(read_s)) / 1e9,
        "other_ms": 1e3 * float(np.median(other)),
        "gemm_alone_ms": 1e3 * gemm,
        "gemm_alone_words": words,
        "gemm_alone_by_words_ms": {t: 1e3 * v for t, v in by_words.items()},
        "gflops_total": float(np.sum(flops) / np.sum(seconds) / 1e9),
        "gflops_scorer": float(np.sum(flops) / np.sum(scorer_s) / 1e9),
        "gflop_per_query": float(np.mean(flops) / 1e9),
        "scorer_calls": scorer.calls,
        "dequantize": dequantize_rates(gallery, block),
    }


def bench_end_to_end(retriever: Retriever, texts: list[str], args) -> dict:
    seconds = []
    for i, text in enumerate(texts):
        start = time.perf_counter()
        retriever.search_text([text], args.k)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    encode = []
    for text in texts[args.warmup :]:
        start = time.perf_counter()
        retriever.encode_text([text])
        encode.append(time.perf_counter() - start)
    return {**stats(seconds), "text_encode_ms": 1e3 * float(np.median(encode))}


def bench_batched(scorer: TimedRunner, gallery: Gallery, queries: Queries, args, sizes: CallSizes):
    """All queries, `text_batch` per `exhaustive` call; returns the report and the top-k."""
    batch_size, block = sizes.text_batch, sizes.block(gallery.kind)
    scorer.reset()
    timed = TimedGallery(gallery)
    top = np.empty((queries.count, args.k), np.int64)
    order = np.argsort(-queries.arrays["lengths"], kind="stable")
    flops = 0
    start = time.perf_counter()
    batches = text_batches(queries, batch_size)
    for s, batch in zip(range(0, queries.count, batch_size), batches, strict=True):
        _, top[order[s : s + batch_size]] = exhaustive(
            float_scorer(scorer), batch, timed, args.k, block
        )
        captions, words = batch.arrays["words"].shape[:2]  # padded: what the GEMM computes
        flops += 2 * gallery.count * args.regions * args.dim * captions * words
    seconds = time.perf_counter() - start
    report = {
        "queries": queries.count,
        "seconds": seconds,
        "pairs_per_s": queries.count * gallery.count / seconds,
        "scorer_s": scorer.seconds,
        "read_s": timed.seconds,
        "gflops_total": flops / seconds / 1e9,
        "gflops_scorer": flops / scorer.seconds / 1e9,
    }
    return report, top


def bench_reranked(
    scorer: TimedRunner, gallery: Gallery, queries: Queries, args, sizes: CallSizes, first: int
):
    """One query per `reranked` call: total, shortlist-stage and re-rank-stage latency, and the
    re-rank split (gallery reads vs scorer); returns the report and each query's top-k."""
    timed, block = TimedGallery(gallery), sizes.block(gallery.kind)
    shortlist_s, totals, reads, scoring = [], [], [], []
    top = np.empty((queries.count, args.k), np.int64)
    for i in range(queries.count):
        scorer.reset()
        timed.seconds = 0.0
        start = time.perf_counter()
        seconds, top[i : i + 1] = shortlisted(scorer, cropped(queries, [i]), timed, args, block)
        totals.append(time.perf_counter() - start)
        shortlist_s.append(seconds)
        reads.append(timed.seconds)
        scoring.append(scorer.seconds)
    keep = slice(first, None)
    shortlist_stage = np.array(shortlist_s[keep])
    rerank_stage = np.array(totals[keep]) - shortlist_stage
    report = {
        "engine": gallery_engine(SHORTLIST_ENGINE, FirstStage.GLOBAL in gallery.first_stages),
        "total": stats(totals[keep]),
        "shortlist_stage": stats(shortlist_stage),
        "rerank_stage": stats(rerank_stage),
        "rerank_rows_ms": 1e3 * float(np.median(reads[keep])),
        "rerank_scorer_ms": 1e3 * float(np.median(scoring[keep])),
        "shards_touched_per_block": float(np.mean(timed.shards_touched)),
    }
    return report, top


def bench_large(
    scorer: TimedRunner, gallery: Gallery, args, sizes: CallSizes, speedup: float
) -> dict:
    """Shortlisted search on the large gallery, its side-by-sides (shortlist engines,
    dequantization), agreement, cold cache; the resident set is sampled before and after each
    phase, its peak reset before each."""
    queries = make_queries(gallery, args.warmup + args.iterations, args.seed + 7)
    bandwidth = read_bandwidth()
    memory_report = {"before": memory()}
    with phase(memory_report, "shortlist_queries"):
        report, top = bench_reranked(scorer, gallery, queries, args, sizes, args.warmup)
    with phase(memory_report, "side_by_side"):
        report["engines"] = shortlist_engines(gallery, queries, args)
        report["dequantize"] = dequantize_rates(gallery, sizes.block(gallery.kind))
    has_index = FirstStage.GLOBAL in gallery.first_stages
    from_index = has_index and gallery_engine(SHORTLIST_ENGINE, has_index) == "faiss"
    report["shortlist_reads"] = "the float16 FAISS index" if from_index else "the float32 globals"
    report["shortlist_gb"] = gallery.count * args.dim * (2 if from_index else 4) / 1e9
    report["shortlist_gb_s"] = report["shortlist_gb"] / report["shortlist_stage"]["p50_ms"] * 1e3
    report["larger_than_memory"] = gallery.larger_than_memory()
    report["bandwidth_reference"] = bandwidth
    with phase(memory_report, "exhaustive_agreement"):
        report["agreement"] = large_agreement(scorer, gallery, queries, top, args, sizes, speedup)
    if not args.no_cold:
        with phase(memory_report, "cold_query"):
            report["cold"] = cold_query(scorer, gallery, queries, args, sizes)
    report["memory"] = memory_report
    return report


@contextmanager
def phase(report: dict, name: str):
    """Record `memory()` after the block, with the peak (VmHWM, ru_maxrss) reset before it."""
    reset = reset_peak_rss()
    yield
    report[name] = {**memory(), "peak_reset": reset}


def cold_query(scorer, gallery: Gallery, queries: Queries, args, sizes: CallSizes) -> dict:
    start = time.perf_counter()
    drop_cache(gallery.path)
    dropped = time.perf_counter() - start
    start = time.perf_counter()
    first, _ = shortlisted(scorer, cropped(queries, [0]), gallery, args, sizes.block(gallery.kind))
    total = time.perf_counter() - start
    return {"total_ms": 1e3 * total, "shortlist_ms": 1e3 * first, "drop_s": dropped}


def large_agreement(
    scorer, gallery: Gallery, queries: Queries, fast, args, sizes: CallSizes, speedup
) -> dict:
    """Exhaustive SCAN over the whole large gallery on as many of the timed queries as
    `--agreement-budget` affords, vs their shortlisted top-k. The count is estimated from one
    query's exhaustive time and the batched/single `speedup` measured on the small gallery."""
    first, batch, block = args.warmup, sizes.text_batch, sizes.block(gallery.kind)
    probe = cropped(queries, [first])
    start = time.perf_counter()
    _, exact0 = exhaustive(float_scorer(scorer), probe, gallery, args.k, block)
    one = time.perf_counter() - start
    affordable = (args.agreement_budget - one) / (one / speedup)
    extra = int(min(queries.count - first - 1, max(0.0, affordable)))
    exact = [exact0]
    if extra:
        rows = np.arange(first + 1, first + 1 + extra)
        order = rows[np.argsort(-queries.arrays["lengths"][rows], kind="stable")]
        start_all = time.perf_counter()
        parts = {}
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            _, indices = exhaustive(
                float_scorer(scorer), cropped(queries, chunk), gallery, args.k, block
            )
            parts.update(zip(chunk.tolist(), indices, strict=True))
        exact += [parts[int(r)][None] for r in rows]
        batched_s = time.perf_counter() - start_all
    else:
        batched_s = 0.0
    exact = np.concatenate(exact)
    report = agreement(exact, fast[first : first + len(exact)])
    sizes = [size for size in SHORTLIST_SIZES if size <= gallery.count] + [args.shortlist]
    subset = queries.take(np.arange(first, first + len(exact)))
    candidates = global_shortlist(subset, gallery, max(sizes), SHORTLIST_ENGINE)
    report["in_shortlist"] = {
        size: float(
            np.mean(
                [
                    len(set(e) & set(c[:size])) / args.k
                    for e, c in zip(exact, candidates, strict=True)
                ]
            )
        )
        for size in sorted(set(sizes))
    }
    report.update({"single_exhaustive_s": one, "batched_exhaustive_s": batched_s})
    return report


# ----------------------------------------------------------------------------------------------
# Output


def fmt_latency(s: dict) -> str:
    return f"p50 {s['p50_ms']:8.1f}  p95 {s['p95_ms']:8.1f}  p99 {s['p99_ms']:8.1f} ms"


def fmt_memory(m: dict) -> str:
    return (
        f"VmRSS {m['VmRSS']:7.0f}  VmHWM {m['VmHWM']:7.0f}  RssAnon {m['RssAnon']:7.0f}  "
        f"RssFile {m['RssFile']:6.0f}  ru_maxrss {m['ru_maxrss']:7.0f} MiB"
    )


def fmt_dequantize(d: dict, dtype: str) -> str:
    same = "same bits" if d["identical"] else "DIFFERENT values"
    return (
        f"  dequantize     one block of {dtype} regions to float32: to_float32 (Shard.block) "
        f"{d['runtime_gelem_s']:.2f} G elements/s vs numpy astype {d['numpy_astype_gelem_s']:.2f}"
        f" ({d['ratio']:.1f}x, {same})"
    )


def fmt_engines(e: dict) -> str:
    times = e["methods"]
    lines = [
        f"  engines        shortlist stage alone, p50 over the same {e['queries']} queries: "
        f"numpy {times['numpy']['p50_ms']:.1f} ms (exact)"
    ]
    if not e["vs_numpy"]:
        return f"{lines[0]}; not compared, {FAISS_HINT}"
    for method, c in e["vs_numpy"].items():
        lines.append(
            f"                 {method} {times[method]['p50_ms']:.1f} ms ({c['speedup']:.1f}x, "
            f"{e['faiss_threads']} OpenMP threads): numpy's candidates kept "
            f"{100 * c['same_candidates']:.2f}%, at the same rank {100 * c['same_rank']:.1f}%"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


def print_report(r: dict, args) -> None:
    peak, small, large = r["gemm_peak_gflops"], r["small_gallery"], r["large_gallery"]
    print(
        f"{args.threads} threads (ORT intra-op, torch); fp32 GEMM peak {peak:.1f} GFLOP/s "
        f"(4096x1024x4096, torch); R={args.regions} D={args.dim}, k={args.k}"
    )
    print(
        f"bundle: untrained seeded SCAN, t2i clipped_l2norm LogSumExp, img_dim {args.img_dim}, "
        f"word_dim {args.word_dim}; export {r['export_s']:.1f} s"
    )
    print(
        f"gallery A: {small['count']} images {small['dtype']}, {small['bytes'] / 1e9:.2f} GB on "
        f"disk, written in {small['seconds']:.1f} s"
    )
    cap = r["large_cap"]
    print(
        f"gallery B: --large {cap['requested']}, capped to {cap['disk_cap']} by 80% of the free "
        f"disk, then by --large-budget {cap['budget_s']:.0f} s of writing:"
    )
    print(
        f"gallery B: {large['count']} images {large['dtype']}, {large['bytes'] / 1e9:.2f} GB on "
        f"disk, written in {large['seconds']:.1f} s ({large['count'] / large['seconds']:.0f} "
        f"images/s: generate {large['generate_s']:.0f} s, GalleryWriter.add "
        f"{large['writer_add_s']:.0f} s, close {large['close_s']:.0f} s)"
    )
    s, e, b = r["single"], r["end_to_end"], r["batched"]
    print(f"\n[1] one query, exhaustive exact SCAN over {small['count']} images")
    target = TARGETS["single_p50_ms"]
    print(
        f"  search only    {fmt_latency(s)}  ({verdict(s['p50_ms'] < target)} p50 < {target:.0f})"
    )
    print(f"  end to end     {fmt_latency(e)}  (text encoding {e['text_encode_ms']:.1f} ms)")
    print(
        f"  split (p50s)   scorer {s['scorer_ms']:.1f} ms ({s['scorer_calls']} calls) + gallery "
        f"read/dequantize {s['read_dequant_ms']:.1f} ms ({s['read_gelem_s']:.2f} G elements/s) "
        f"+ top-k/Python {s['other_ms']:.1f} ms"
    )
    print(
        f"  logits GEMM    {s['gflop_per_query']:.2f} GFLOP/query: {s['gflops_total']:.1f} GFLOP/s "
        f"whole call, {s['gflops_scorer']:.1f} in the scorer, peak {peak:.1f}; the same GEMM "
        f"alone (ORT MatMul, T={s['gemm_alone_words']}) {s['gemm_alone_ms']:.1f} ms"
    )
    print(f"  floor          the GEMM at peak: {1e3 * s['gflop_per_query'] / peak:.1f} ms/query")
    steps = ", ".join(f"T={t}: {v:.1f} ms" for t, v in s["gemm_alone_by_words_ms"].items())
    print(f"  GEMM by words  the same GEMM alone at {steps}")
    print(fmt_dequantize(s["dequantize"], small["dtype"]))
    single_pairs = small["count"] / (s["mean_ms"] / 1e3)
    per_call = r["call_sizes"]["text_batch"]
    print(f"\n[2] batched: {b['queries']} queries x {small['count']} images, {per_call} per call")
    print(
        f"  {b['seconds']:.2f} s, {b['pairs_per_s']:,.0f} pairs/s vs single {single_pairs:,.0f} "
        f"({b['pairs_per_s'] / single_pairs:.1f}x); GEMM {b['gflops_total']:.1f} GFLOP/s whole, "
        f"{b['gflops_scorer']:.1f} in the scorer ({b['scorer_s']:.2f} s of scorer calls, "
        f"{b['read_s']:.2f} s of gallery reads)"
    )
    a = r["small_agreement"]
    print(
        f"  shortlist {args.shortlist} on {small['count']}: top-{args.k} agreement "
        f"{100 * a['top_k']:.1f}%, top-1 {100 * a['top_1']:.1f}% ({a['queries']} queries)"
    )
    print_large(r, args)


def print_large(r: dict, args) -> None:
    large, L = r["large_gallery"], r["large"]
    n = large["count"]
    print(
        f"\n[3] shortlist {args.shortlist} (engine {SHORTLIST_ENGINE}: {L['engine']}) + exact "
        f"re-rank over {n} images ({large['dtype']}"
        + (", larger than memory: candidate rows prefetched)" if L["larger_than_memory"] else ")")
    )
    print(f"  total          {fmt_latency(L['total'])}")
    print(f"  shortlist      {fmt_latency(L['shortlist_stage'])}")
    print(f"  re-rank        {fmt_latency(L['rerank_stage'])}")
    bw = L["bandwidth_reference"]
    print(
        f"  shortlist      {L['shortlist_gb_s']:.2f} GB/s of {L['shortlist_reads']} "
        f"({L['shortlist_gb']:.2f} GB/query, memory-mapped); reference: sum "
        f"{bw['sum_gb_s']:.1f} GB/s, "
        f"GEMV {bw['gemv_gb_s']:.1f} GB/s in RAM"
    )
    print(fmt_engines(L["engines"]))
    print(
        f"  re-rank split  Gallery.rows {L['rerank_rows_ms']:.1f} ms + scorer "
        f"{L['rerank_scorer_ms']:.1f} ms; {L['shards_touched_per_block']:.1f} shards touched per "
        f"{r['call_sizes']['image_block']}-candidate block"
    )
    print(fmt_dequantize(L["dequantize"], large["dtype"]))
    g = L["agreement"]
    target = TARGETS["agreement"]
    print(
        f"  agreement      top-{args.k} {100 * g['top_k']:.1f}% ({verdict(g['top_k'] >= target)} "
        f"≥ {100 * target:.0f}%), top-1 {100 * g['top_1']:.1f}%, on {g['queries']} queries "
        f"(exhaustive over all {n}: {g['single_exhaustive_s']:.1f} s for one query, "
        f"{g['batched_exhaustive_s']:.1f} s for the other {g['queries'] - 1} batched)"
    )
    inside = ", ".join(f"{size}: {100 * v:.1f}%" for size, v in g["in_shortlist"].items())
    print(f"  exact top-{args.k} inside the top-S by pooled embedding, S = {inside}")
    projected = L["shortlist_stage"]["p50_ms"] * args.large / n + L["rerank_stage"]["p50_ms"]
    target = TARGETS["shortlist_p50_ms"]
    if n < args.large:
        print(
            f"  EXTRAPOLATED to {args.large} images (shortlist stage linear in size, re-rank "
            f"as measured): p50 ≈ {projected:.0f} ms ({verdict(projected < target)} < "
            f"{target:.0f}); globals {args.large * args.dim * 4 / 1e9:.1f} GB/query"
        )
    else:
        print(f"  p50 {verdict(L['total']['p50_ms'] < target)} < {target:.0f} ms")
    m = L["memory"]
    print(f"\n[4] memory while querying gallery B ({large['bytes'] / 1e9:.2f} GB on disk)")
    print(f"  before         {fmt_memory(m['before'])}")
    labels = {
        "shortlist_queries": "shortlist q's",
        "side_by_side": "side by side",
        "exhaustive_agreement": "exhaustive",
        "cold_query": "cold query",
    }
    for key, label in labels.items():
        if key in m:
            print(
                f"  {label:<14} {fmt_memory(m[key])}  (peak reset before: {m[key]['peak_reset']})"
            )
    if "cold" in L:
        c = L["cold"]
        print(
            f"  cold cache     one query {c['total_ms']:.0f} ms (shortlist {c['shortlist_ms']:.0f}"
            f" ms) after dropping the gallery's page cache (fsync + fadvise, {c['drop_s']:.1f} s)"
        )
    print(f"\ntotal wall time {r['wall_s']:.0f} s")


# ----------------------------------------------------------------------------------------------


def run(args, work: Path) -> dict:
    wall = time.perf_counter()
    report: dict = {"args": vars(args)}
    report["gemm_peak_gflops"] = gemm_peak()
    log(f"GEMM peak {report['gemm_peak_gflops']:.1f} GFLOP/s; exporting the bundle")
    start = time.perf_counter()
    bundle_path = build_bundle(work / "bundle", args)
    report["export_s"] = time.perf_counter() - start
    small_path, large_path = work / "small" / "images", work / "large" / "images"
    log(f"writing {args.images} images ({args.dtype})")
    report["small_gallery"] = in_child(
        write_gallery, str(small_path), str(bundle_path), args, args.images, args.dtype, math.inf
    )
    bundle = load_bundle(bundle_path)
    backend = open_backend(bundle, "onnxruntime", "fp32", threads=args.threads, providers=["cpu"])
    sizes = CallSizes.of(backend)  # as the retriever sizes its calls on this bundle and backend
    report["call_sizes"] = asdict(sizes)
    scorer = TimedRunner(backend.runner("scorer"))
    small = open_gallery(small_path, verify=False)
    queries = make_queries(small, max(args.captions, args.warmup + args.iterations), args.seed)
    log("single queries")
    report["single"] = bench_single(scorer, small, queries, args, sizes)
    retriever = Retriever(bundle, {"images": small}, backend)
    texts = random_texts(bundle, args.warmup + args.iterations, args.seed)
    report["end_to_end"] = bench_end_to_end(retriever, texts, args)
    log("batched queries")
    batch = queries.take(np.arange(args.captions))
    report["batched"], exact = bench_batched(scorer, small, batch, args, sizes)
    _, fast = bench_reranked(scorer, small, batch, args, sizes, 0)
    report["small_agreement"] = agreement(exact, fast)
    count = affordable(args, args.large_dtype, work)
    report["large_cap"] = {
        "requested": args.large,
        "disk_cap": count,
        "budget_s": args.large_budget,
    }
    log(f"writing up to {count} images ({args.large_dtype}) for {args.large_budget:.0f} s")
    report["large_gallery"] = in_child(
        write_gallery,
        str(large_path),
        str(bundle_path),
        args,
        count,
        args.large_dtype,
        args.large_budget,
        faiss_installed(),
    )
    log(f"wrote {report['large_gallery']['count']} images; shortlist queries")
    large = open_gallery(large_path, verify=False)
    single_pairs = small.count / (report["single"]["mean_ms"] / 1e3)
    speedup = report["batched"]["pairs_per_s"] / single_pairs
    report["large"] = bench_large(scorer, large, args, sizes, speedup)
    report["wall_s"] = time.perf_counter() - wall
    return report


def main() -> None:
    keep_freed_memory()  # as the CLI does
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_query_", dir=args.workdir))
    try:
        report = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_report(report, args)


if __name__ == "__main__":
    main()
