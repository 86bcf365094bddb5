"""CPU latency and Recall@K of a bundle's FP32 / FP16 / INT8 graphs in ONNX Runtime, next to the
PyTorch reference in FP32 and BF16 (autocast), all measured in one run.

    .venv/bin/python benchmarks/bench_precision.py BUNDLE CHECKPOINT --data DIR \\
        [--split test] [--threads N] [--repeats N] [--images N] [--json]

1. Latency per graph, at realistic shapes: image_encoder on 32 images' features, text_encoder on
   the split's first 32 captions (padded to their longest), scorer on 32 images × the first 128
   captions (FP32 PyTorch encoder outputs, with the Gram the graph takes as input). Every
   precision the bundle holds runs in ONNX Runtime's CPU provider; PyTorch runs the same work in
   FP32 and under `torch.autocast("cpu", torch.bfloat16)`: `img_enc` + region Gram + pooled
   embedding, `txt_enc` + caption Gram + pooled embedding (the encoder graphs' three outputs),
   and `score_block`. Median and p90 of `--repeats` runs, taken in 3 passes over the table after
   warm-up runs (see `measure_latency`). The BF16 claim is checked, not assumed: the dtypes every
   GEMM saw (a dispatch mode) and the oneDNN kernels that ran them (oneDNN verbose). GFLOP/s
   counts the GEMMs executed (padding included) of the image encoder (features × W, the Gram) and
   the scorer (the logits, the Gram product). ONNX Runtime's own profiler splits each graph's
   node time into GEMM / GRU / Cast / Q-DQ / other, names the costliest op and the input types
   of the GEMM kernels: what a precision really runs after ONNX Runtime's graph rewrites.
2. Recall@K of each full pipeline on the split (`--images` cuts it): the PyTorch reference in FP32
   and BF16, and the deployed ONNX Runtime pipeline per precision, with ΔR@K against PyTorch FP32
   and each pipeline's end-to-end time (encoding both sides and scoring all pairs).
3. The fastest precision per graph, read off the medians.

Same threads for PyTorch and ONNX Runtime (`--threads`, default all of torch's). `--json` prints the
numbers as one JSON object on stdout instead of the tables.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnxruntime as ort
import torch
from scan_deploy.calibration.gates import recall_deltas
from scan_deploy.export.compare import check_same_model, ort_similarities
from scan_deploy.export.verify import session
from torch.utils._python_dispatch import TorchDispatchMode
from workload import bf16_gemm_peak, gemm_peak

from scan_deploy.allocator import keep_freed_memory
from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import Bundle, load_bundle
from scan_deploy.checkpoint import Checkpoint, load_checkpoint
from scan_deploy.choices import Graph
from scan_deploy.config import ModelConfig
from scan_deploy.evaluate import encode_captions, encode_images, split_similarities
from scan_deploy.metrics import KS, recall_metrics
from scan_deploy.precomp import PrecompSplit, load_split
from scan_deploy.scoring import caption_gram, pooled_embedding, region_gram, score_block

BATCH_IMAGES = 32
BATCH_CAPTIONS = 32
SCORER_CAPTIONS = 128
WARMUP = 5
PASSES = 3  # see measure_latency
TORCH_COLUMNS = ("torch fp32", "torch bf16")
GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm", "QLinearMatMul", "MatMulInteger"}
GEMM_OPS |= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
NODE_KINDS = {"GRU": "GRU", "Cast": "Cast", "QuantizeLinear": "Q/DQ", "DequantizeLinear": "Q/DQ"}
KIND_COLUMNS = ("GEMM", "GRU", "Cast", "Q/DQ", "other")


@dataclass(frozen=True)
class Inputs:
    """One realistic batch per graph (numpy, as ONNX Runtime takes them)."""

    features: np.ndarray  # (32, R, F)
    tokens: np.ndarray  # (32, T) the first captions, padded to their longest
    lengths: np.ndarray  # (32,)
    regions: np.ndarray  # (32, R, D) encoded images
    gram: np.ndarray  # region Gram (t2i) or caption Gram (i2t) of the scorer block
    words: np.ndarray  # (128, T', D) encoded captions, zero beyond each length
    word_lengths: np.ndarray  # (128,)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="precomp data folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per latency cell")
    parser.add_argument("--images", type=int, default=None, help="cut the split (Recall@K)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------- inputs


def cut_split(split: PrecompSplit, images: int | None) -> PrecompSplit:
    """The first `images` images of a split with their captions."""
    if images is None or images >= split.num_images:
        return split
    per_image = split.captions_per_image
    return PrecompSplit(
        split.images[:images], split.captions[: images * per_image], per_image, split.features_path
    )


@torch.no_grad()
def latency_inputs(checkpoint: Checkpoint, split: PrecompSplit) -> Inputs:
    """The first images and captions of the split, and their FP32 PyTorch encodings."""
    model, config = checkpoint.model.eval(), checkpoint.config
    features = np.array(split.images[:BATCH_IMAGES], dtype=np.float32)
    tokens, lengths = pad_tokens(
        [checkpoint.vocab.encode(c) for c in split.captions[:BATCH_CAPTIONS]]
    )
    scorer_tokens, word_lengths = pad_tokens(
        [checkpoint.vocab.encode(c) for c in split.captions[:SCORER_CAPTIONS]]
    )
    regions = model.img_enc(torch.from_numpy(features))
    words = model.txt_enc(torch.from_numpy(scorer_tokens), torch.from_numpy(word_lengths))
    gram = region_gram(regions) if config.cross_attn == "t2i" else caption_gram(words)
    return Inputs(
        features, tokens, lengths, regions.numpy(), gram.numpy(), words.numpy(), word_lengths
    )


def ort_feeds(config: ModelConfig, inputs: Inputs) -> dict[str, dict[str, np.ndarray]]:
    gram_name = "region_gram" if config.cross_attn == "t2i" else "caption_gram"
    return {
        "image_encoder": {"features": inputs.features},
        "text_encoder": {"tokens": inputs.tokens, "lengths": inputs.lengths},
        "scorer": {
            "regions": inputs.regions,
            gram_name: inputs.gram,
            "words": inputs.words,
            "lengths": inputs.word_lengths,
        },
    }


def torch_ops(checkpoint: Checkpoint, inputs: Inputs) -> dict[str, Callable[[], object]]:
    """The work of each graph in PyTorch, on the same inputs (the encoders' three outputs)."""
    model, config = checkpoint.model.eval(), checkpoint.config
    features = torch.from_numpy(inputs.features)
    tokens, lengths = torch.from_numpy(inputs.tokens), torch.from_numpy(inputs.lengths)
    regions, gram = torch.from_numpy(inputs.regions), torch.from_numpy(inputs.gram)
    words, word_lengths = torch.from_numpy(inputs.words), torch.from_numpy(inputs.word_lengths)

    def image_encoder():
        out = model.img_enc(features)
        return out, region_gram(out), pooled_embedding(out)

    def text_encoder():
        out = model.txt_enc(tokens, lengths)
        return out, caption_gram(out), pooled_embedding(out, lengths)

    return {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "scorer": lambda: score_block(regions, words, word_lengths, config, gram),
    }


@contextmanager
def torch_precision(column: str) -> Iterator[None]:
    """no_grad, plus BF16 autocast for the BF16 column."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=column == "torch bf16"):
        yield


def gemm_flops(config: ModelConfig, inputs: Inputs) -> dict[str, float]:
    """GEMM FLOPs executed per call (padded shapes): features × W and the Gram for the image
    encoder; the logits and the Gram product for the scorer."""
    b, r, f = inputs.features.shape
    d = config.embed_size
    n = inputs.regions.shape[0]
    m, t, _ = inputs.words.shape
    gram_product = r * r if config.cross_attn == "t2i" else r * t
    return {
        "image_encoder": 2.0 * b * r * d * (f + r),
        "scorer": 2.0 * n * m * t * (r * d + gram_product),
    }


# ------------------------------------------------------------------------------------- latency


def measure_latency(
    torch_fns: dict[str, Callable[[], object]],
    sessions: dict[str, dict[str, ort.InferenceSession]],
    feeds: dict[str, dict[str, np.ndarray]],
    repeats: int,
) -> dict[str, dict[str, Timing]]:
    """{graph: {column: Timing}}; columns: torch fp32, torch bf16, ORT <precision>...

    Every cell is timed in PASSES passes over the whole table (the cell order reversed on every
    other pass), each pass WARMUP untimed runs then its share of `repeats`: a slow spell of this
    shared 2-core machine then hits a fraction of each cell's runs, not a whole cell. (Timing the
    cells round-robin, a few runs at a time, was tried and made every cell noisy, p90 up to 5x
    the median: likely torch's OpenMP and ONNX Runtime's pool threads of the previous cell still
    spinning on the two cores.)
    """
    cells: dict[tuple[str, str], tuple[Callable[[], object], Callable]] = {}
    for graph in Graph:
        for column in TORCH_COLUMNS:
            cells[graph, column] = (torch_fns[graph], partial(torch_precision, column))
        for precision, graphs in sessions.items():
            run = partial(graphs[graph].run, None, feeds[graph])
            cells[graph, f"ORT {precision}"] = (run, nullcontext)
    times: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    order = list(cells)
    for index in range(PASSES):
        for key in order if index % 2 == 0 else order[::-1]:
            fn, context = cells[key]
            with context():
                for _ in range(WARMUP):
                    fn()
                for _ in range(-(-repeats // PASSES)):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
    table: dict[str, dict[str, Timing]] = defaultdict(dict)
    for (graph, column), seconds in times.items():
        ms = 1e3 * np.asarray(seconds)
        table[graph][column] = Timing(float(np.median(ms)), float(np.percentile(ms, 90)))
    return dict(table)


# ------------------------------------------------------------------------ what actually runs


class GemmDtypes(TorchDispatchMode):
    """Counts the (matmul op, input dtypes) the dispatcher sees, i.e. after autocast."""

    OPS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear")

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            dtypes = ",".join(
                str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)
            )
            self.seen[f"{name}[{dtypes}]"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def stdout_to(path: str) -> Iterator[None]:
    """Redirect file descriptor 1 (C stdio included) to `path`."""
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "wb") as target:
        os.dup2(target.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def onednn_kernels(fn: Callable[[], object]) -> Counter[str]:
    """oneDNN matmul implementations (e.g. brg_matmul:avx512_core_bf16) that one call ran."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "onednn.log")
        with stdout_to(log), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            fn()
        with open(log) as handle:
            lines = handle.read().splitlines()
    fields = [line.split(",") for line in lines if line.startswith("onednn_verbose")]
    return Counter(f[6] for f in fields if len(f) > 6 and f[2:4] == ["primitive", "exec"])


def bf16_check(torch_fns: dict[str, Callable[[], object]]) -> dict[str, dict[str, dict]]:
    """Per graph: GEMM input dtypes under autocast, and the oneDNN kernels that ran them."""
    report = {}
    for graph, fn in torch_fns.items():
        with torch_precision("torch bf16"), GemmDtypes() as mode:
            fn()
        with torch_precision("torch bf16"):
            kernels = onednn_kernels(fn)
        report[graph] = {"gemm_dtypes": dict(mode.seen), "onednn_kernels": dict(kernels)}
    return report


def ort_profile(
    path: str, feeds: dict[str, np.ndarray], threads: int, runs: int = 20
) -> dict[str, object]:
    """ONNX Runtime's profiler over `runs` calls: share of node time per kind, and the GEMM
    kernels with their input types (as run, after ONNX Runtime's graph optimizations)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        profiled = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP + runs):
            profiled.run(None, feeds)
        with open(profiled.end_profiling()) as handle:
            events = json.load(handle)
    kinds: defaultdict[str, float] = defaultdict(float)
    ops: defaultdict[str, float] = defaultdict(float)
    gemms: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        kind = "GEMM" if op in GEMM_OPS else NODE_KINDS.get(op, "other")
        kinds[kind] += event["dur"]
        ops[op] += event["dur"]
        if kind in ("GEMM", "GRU"):
            types = [next(iter(t)) for t in event["args"].get("input_type_shape", [])]
            gemms[f"{op}[{','.join(dict.fromkeys(types))}]"] += 1
    total = sum(kinds.values()) or 1.0
    calls = WARMUP + runs
    top = max(ops, key=ops.__getitem__)
    return {
        "share": {k: kinds[k] / total for k in KIND_COLUMNS},
        "top_op": {"op": top, "share": ops[top] / total},
        "gemm_kernels": {k: v // calls for k, v in gemms.items()},
    }


# -------------------------------------------------------------------------------------- recall


def bf16_similarities(checkpoint: Checkpoint, split: PrecompSplit) -> np.ndarray:
    """`split_similarities` under BF16 autocast (region embeddings back to FP32 so the score
    matrix, whose dtype follows them, stays FP32; numpy has no BF16)."""
    model = checkpoint.model.eval()
    token_lists = [checkpoint.vocab.encode(c) for c in split.captions]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        regions = encode_images(model, split.images).float()
        words, lengths = encode_captions(model, token_lists)
        return model.similarity(regions, words, lengths).float().numpy()


def measure_recall(
    bundle: Bundle,
    checkpoint: Checkpoint,
    sessions: dict[str, dict[str, ort.InferenceSession]],
    split: PrecompSplit,
) -> dict[str, dict]:
    """{pipeline: {metrics, delta_recall, delta_rsum, seconds}}, ΔR@K against PyTorch FP32."""
    pipelines: dict[str, Callable[[], np.ndarray]] = {
        "torch fp32": lambda: split_similarities(checkpoint, split),
        "torch bf16": lambda: bf16_similarities(checkpoint, split),
    }
    for precision, graphs in sessions.items():
        pipelines[f"ORT {precision}"] = lambda g=graphs: ort_similarities(bundle, g, split)
    results = {}
    for name, run in pipelines.items():
        start = time.perf_counter()
        sims = run()
        seconds = time.perf_counter() - start
        results[name] = {"metrics": recall_metrics(sims, split.captions_per_image)}
        results[name]["seconds"] = seconds
    reference = results["torch fp32"]["metrics"]
    for result in results.values():
        result["delta_recall"] = recall_deltas(reference, result["metrics"])
        result["delta_rsum"] = result["metrics"]["rsum"] - reference["rsum"]
    return results


# ------------------------------------------------------------------------------------- reports


def fastest(latency: dict[str, dict[str, Timing]]) -> dict[str, dict[str, object]]:
    """Per graph (by median): the fastest column, its lead over the runner-up in percent (a lead
    of a few percent is within this machine's noise), and the fastest ONNX Runtime precision."""
    best = {}
    for graph, row in latency.items():
        ranked = sorted(row, key=lambda c: row[c].median_ms)
        ort_ranked = [c for c in ranked if c.startswith("ORT ")]
        best[graph] = {
            "overall": ranked[0],
            "lead_pct": 100 * (row[ranked[1]].median_ms / row[ranked[0]].median_ms - 1),
            "runner_up": ranked[1],
            "onnxruntime": ort_ranked[0],
        }
    return best


def print_latency(
    latency: dict[str, dict[str, Timing]], flops: dict[str, float], peaks: dict[str, float]
) -> None:
    columns = list(next(iter(latency.values())))
    print("\nLatency, ms: median (p90)")
    print(f"{'graph':<15}" + "".join(f"{c:>17}" for c in columns))
    for graph, row in latency.items():
        cells = "".join(f"{f'{t.median_ms:.2f} ({t.p90_ms:.2f})':>17}" for t in row.values())
        print(f"{graph:<15}{cells}")
    print("\nSpeed vs ORT fp32 (ORT fp32 median / this median; >1 is faster)")
    print(f"{'graph':<15}" + "".join(f"{c:>17}" for c in columns))
    for graph, row in latency.items():
        base = row["ORT fp32"].median_ms
        print(f"{graph:<15}" + "".join(f"{base / t.median_ms:>16.2f}x" for t in row.values()))
    print(
        f"\nGEMM GFLOP/s (measured peaks, 4096x1024x4096: fp32 {peaks['fp32']:.0f}, "
        f"bf16 {peaks['bf16']:.0f})"
    )
    print(f"{'graph':<15}{'GFLOP/call':>11}" + "".join(f"{c:>17}" for c in columns))
    for graph, count in flops.items():
        rates = "".join(f"{count / t.median_ms / 1e6:>17.1f}" for t in latency[graph].values())
        print(f"{graph:<15}{count / 1e9:>11.3f}{rates}")


def print_bf16_check(check: dict[str, dict[str, dict]]) -> None:
    print("\nPyTorch bf16 autocast: GEMM input dtypes as dispatched; oneDNN kernels that ran")
    for graph, seen in check.items():
        dtypes = ", ".join(f"{k} x{v}" for k, v in seen["gemm_dtypes"].items()) or "none"
        kernels = ", ".join(f"{k} x{v}" for k, v in seen["onednn_kernels"].items()) or "none"
        fell_back = [k for k in seen["gemm_dtypes"] if "bfloat16" not in k]
        verdict = f"FELL BACK to fp32: {', '.join(fell_back)}" if fell_back else "all GEMMs bf16"
        print(f"  {graph:<14} {verdict}; {dtypes}; oneDNN: {kernels}")


def print_profiles(profiles: dict[str, dict[str, dict]]) -> None:
    print("\nORT node time by kind (profiler, % of kernel time) and GEMM/GRU kernels as run")
    kinds = "".join(f"{k:>7}" for k in KIND_COLUMNS)
    print(f"{'precision':<10}{'graph':<15}{kinds}  {'top op':<20}kernels")
    for precision, graphs in profiles.items():
        for graph, profile in graphs.items():
            shares = "".join(f"{100 * profile['share'][k]:>6.0f}%" for k in KIND_COLUMNS)
            top = f"{profile['top_op']['op']} {100 * profile['top_op']['share']:.0f}%"
            kernels = ", ".join(f"{k} x{v}" for k, v in profile["gemm_kernels"].items())
            print(f"{precision:<10}{graph:<15}{shares}  {top:<20}{kernels}")


def print_recall(recall: dict[str, dict], images: int) -> None:
    print(f"\nRecall@K on {images} images (Δ vs torch fp32, points)")
    heads = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS]
    print(f"{'pipeline':<12}" + "".join(f"{h:>10}" for h in heads) + f"{'rsum':>9}{'time s':>9}")
    for name, result in recall.items():
        metrics = result["metrics"]
        values = "".join(f"{metrics[d][f'r{k}']:>10.2f}" for d in ("i2t", "t2i") for k in KS)
        print(f"{name:<12}{values}{metrics['rsum']:>9.2f}{result['seconds']:>9.1f}")
        deltas = "".join(f"{v:>+10.2f}" for v in result["delta_recall"].values())
        print(f"{'  Δ':<12}{deltas}{result['delta_rsum']:>+9.2f}")


def to_json(**sections: object) -> str:
    def plain(value: object) -> object:
        if isinstance(value, Timing):
            return {"median_ms": value.median_ms, "p90_ms": value.p90_ms}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return json.dumps(plain(sections), indent=2)


def main() -> None:
    keep_freed_memory()  # as the CLI does
    args = parse_args()
    torch.set_num_threads(args.threads)
    bundle, checkpoint = load_bundle(args.bundle), load_checkpoint(args.checkpoint)
    check_same_model(bundle, checkpoint)
    split = load_split(args.data, args.split)
    inputs = latency_inputs(checkpoint, split)
    feeds = ort_feeds(bundle.config, inputs)
    torch_fns = torch_ops(checkpoint, inputs)
    paths = {p: {g: str(bundle.graph_path(g, p)) for g in Graph} for p in bundle.precisions()}
    sessions = {
        p: {g: session(path, args.threads) for g, path in gs.items()} for p, gs in paths.items()
    }

    peaks = {"fp32": gemm_peak(), "bf16": bf16_gemm_peak()}
    latency = measure_latency(torch_fns, sessions, feeds, args.repeats)
    flops = gemm_flops(bundle.config, inputs)
    check = bf16_check(torch_fns)
    profiles = {
        p: {g: ort_profile(path, feeds[g], args.threads) for g, path in gs.items()}
        for p, gs in paths.items()
    }
    eval_split = cut_split(split, args.images)
    recall = measure_recall(bundle, checkpoint, sessions, eval_split)
    best = fastest(latency)

    if args.json:
        print(
            to_json(
                threads=args.threads,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                gemm_peak_gflops=peaks,
                latency_ms=latency,
                gemm_gflop_per_call={g: f / 1e9 for g, f in flops.items()},
                bf16_check=check,
                ort_profiles=profiles,
                recall={"images": eval_split.num_images, "pipelines": recall},
                fastest=best,
            )
        )
        return
    print(
        f"{args.threads} threads (torch and ORT {ort.__version__}); torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; shapes: image_encoder "
        f"{inputs.features.shape}, text_encoder {inputs.tokens.shape}, scorer "
        f"{inputs.regions.shape[0]} images x {inputs.words.shape[:2]} words; "
        f"{WARMUP} warm-up + {args.repeats} runs per cell, in {PASSES} passes"
    )
    print_latency(latency, flops, peaks)
    print_bf16_check(check)
    print_profiles(profiles)
    print_recall(recall, eval_split.num_images)
    print(
        "\nFastest on this CPU: "
        + "; ".join(
            f"{g}: {b['overall']} ({b['lead_pct']:.0f}% ahead of {b['runner_up']}; "
            f"best ORT: {b['onnxruntime'].removeprefix('ORT ')})"
            for g, b in best.items()
        )
    )


if __name__ == "__main__":
    main()
