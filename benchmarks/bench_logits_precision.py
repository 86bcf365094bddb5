"""The exhaustive scorer's logits GEMM (every region of a gallery block × every word of a query
batch) on ONNX Runtime's CPU kernels, per precision, against the measured GEMM peak of that
precision — the measurement a reduced-precision exhaustive path is designed from. All numbers side
by side in one run.

    .venv/bin/python benchmarks/bench_logits_precision.py [--images 10000] [--regions 36]
        [--dim 1024] [--words 15] [--batch 1 32] [--threads 2] [--json]

Paths (each one ONNX graph, `--images` × `--regions` gallery rows, `--batch` queries of
`--words` words):
- `fp32`: float32 rows (what the scorer reads today after dequantizing) `MatMul` words;
- `fp16 rows + cast`: float16 rows cast to float32 in the graph, then `MatMul` (an fp16 gallery
  fed as stored: the cast is the dequantization);
- `int8 rows (s8s8)`: int8 rows as an int8 gallery stores them, words quantized in the graph
  (symmetric per word, as the gallery's rows), `MatMulInteger` (int32), scaled back by both
  scales: no dequantization of the gallery at all;
- `int8 words (u8s8)`: the same with the words as the uint8 side (+128 zero point) and the rows
  as the int8 side: VNNI's `vpdpbusd` takes uint8 × int8 natively;
- `uint8 rows (u8s8)`: the rows stored offset by 128 as uint8 (zero point 128), the words as the
  int8 side: the same kernel with the rows as the GEMM's A operand.
Peaks: fp32 `MatMul` and u8s8 `MatMulInteger` of 4096 × 1024 × 4096 in the same session
settings. Reported: ms per call (median of `--repeats`), effective GOP/s, the fraction of the
precision's peak, the gallery bytes each path reads per call and the bandwidth that implies, and
the largest logit error of the int8 paths against float32 (unit-norm rows and words).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--words", type=int, default=15)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def session(
    nodes, inputs, output: str, threads: int, dtype: int = TensorProto.FLOAT
) -> onnxruntime.InferenceSession:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(output, dtype, None)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def tensor(name: str, dtype: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, None)


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.FLOAT, [], [float(value)]))  # fmt: skip


def float_session(cast: bool, threads: int):
    """logits (rows, words) = rows (float32, or float16 cast in the graph) @ wordsᵀ."""
    nodes = [helper.make_node("Transpose", ["words"], ["wt"], perm=[1, 0])]
    rows = "rows"
    if cast:
        nodes.append(helper.make_node("Cast", ["rows"], ["rows32"], to=TensorProto.FLOAT))
        rows = "rows32"
    nodes.append(helper.make_node("MatMul", [rows, "wt"], ["logits"]))
    dtype = TensorProto.FLOAT16 if cast else TensorProto.FLOAT
    return session(
        nodes, [tensor("rows", dtype), tensor("words", TensorProto.FLOAT)], "logits", threads
    )


def int8_session(layout: str, threads: int):
    """logits = (q_rows @ q_wordsᵀ) · row_scale · word_scale, words quantized per word in the
    graph (symmetric: scale = max|w| / 127), MatMulInteger in int32."""
    nodes = [
        const("c127", 127.0),
        helper.make_node("Abs", ["words"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["amax"], axes=[1], keepdims=1),
        helper.make_node("Div", ["amax", "c127"], ["wscale"]),
        helper.make_node("Div", ["words", "wscale"], ["wdiv"]),
        helper.make_node("Round", ["wdiv"], ["wround"]),
    ]
    if layout == "u8 words":  # words as A (uint8, zero point 128), rows as B: logitsᵀ
        nodes += [
            const("c128", 128.0),
            helper.make_node("Add", ["wround", "c128"], ["wshift"]),
            helper.make_node("Cast", ["wshift"], ["wq"], to=TensorProto.UINT8),
            helper.make_node("Transpose", ["rows"], ["rt"], perm=[1, 0]),
            helper.make_node(
                "Constant", [], ["zp"], value=helper.make_tensor("zp", TensorProto.UINT8, [], [128])
            ),
            helper.make_node("MatMulInteger", ["wq", "rt", "zp"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "wscale"], ["ws"]),
            helper.make_node("Unsqueeze", ["row_scale", "axis0"], ["rs"]),
            helper.make_node("Mul", ["ws", "rs"], ["logits"]),
        ]
        nodes.insert(
            0,
            helper.make_node(
                "Constant",
                [],
                ["axis0"],
                value=helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
            ),
        )
    else:  # rows as A (int8, or uint8 with zero point 128), words as B (int8): logits
        zero = []
        if layout == "u8 rows":
            nodes.append(helper.make_node("Constant", [], ["rzp"], value=helper.make_tensor(
                "rzp", TensorProto.UINT8, [], [128])))  # fmt: skip
            zero = ["rzp"]
        nodes += [
            helper.make_node("Cast", ["wround"], ["wq"], to=TensorProto.INT8),
            helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]),
            helper.make_node("MatMulInteger", ["rows", "wqt", *zero], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["wscale"], ["wst"], perm=[1, 0]),
            helper.make_node("Mul", ["accf", "wst"], ["ws"]),
            helper.make_node("Unsqueeze", ["row_scale", "axis1"], ["rs"]),
            helper.make_node("Mul", ["ws", "rs"], ["logits"]),
        ]
        nodes.insert(
            0,
            helper.make_node(
                "Constant",
                [],
                ["axis1"],
                value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
            ),
        )
    inputs = [
        tensor("rows", TensorProto.UINT8 if layout == "u8 rows" else TensorProto.INT8),
        tensor("row_scale", TensorProto.FLOAT),
        tensor("words", TensorProto.FLOAT),
    ]
    return session(nodes, inputs, "logits", threads)


def timed(sess, feeds: dict, repeats: int) -> tuple[float, np.ndarray]:
    out = sess.run(None, feeds)[0]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), out


def peaks(threads: int, repeats: int) -> dict[str, float]:
    """GOP/s of a 4096 × 1024 × 4096 fp32 MatMul and u8s8 MatMulInteger."""
    rng = np.random.default_rng(1)
    m = k = 4096
    kk = 1024
    fp32 = session(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [tensor("a", TensorProto.FLOAT), tensor("b", TensorProto.FLOAT)], "y", threads,
    )  # fmt: skip
    a, b = rng.standard_normal((m, kk), np.float32), rng.standard_normal((kk, k), np.float32)
    s_fp32, _ = timed(fp32, {"a": a, "b": b}, repeats)
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["y"])]
    int8 = session(nodes, [tensor("a", TensorProto.UINT8), tensor("b", TensorProto.INT8)], "y",
                   threads, TensorProto.INT32)  # fmt: skip
    feeds = {
        "a": rng.integers(0, 255, (m, kk), dtype=np.uint8),
        "b": rng.integers(-127, 127, (kk, k), dtype=np.int8),
    }
    s_int8, _ = timed(int8, feeds, repeats)
    ops = 2 * m * kk * k
    return {"fp32": ops / s_fp32 / 1e9, "int8": ops / s_int8 / 1e9}


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    n = args.images * args.regions
    rows = rng.standard_normal((n, args.dim), np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    scale = np.abs(rows).max(axis=1) / 127
    q_rows = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    peak = peaks(args.threads, args.repeats)
    sessions = {
        "fp32": (float_session(False, args.threads), "fp32"),
        "fp16 rows + cast": (float_session(True, args.threads), "fp32"),
        "int8 rows (s8s8)": (int8_session("s8", args.threads), "int8"),
        "int8 words (u8s8)": (int8_session("u8 words", args.threads), "int8"),
        "uint8 rows (u8s8)": (int8_session("u8 rows", args.threads), "int8"),
    }
    inputs = {
        "fp32": {"rows": rows},
        "fp16 rows + cast": {"rows": rows.astype(np.float16)},
        "int8 rows (s8s8)": {"rows": q_rows, "row_scale": scale.astype(np.float32)},
        "int8 words (u8s8)": {"rows": q_rows, "row_scale": scale.astype(np.float32)},
        "uint8 rows (u8s8)": {
            "rows": (q_rows.astype(np.int16) + 128).astype(np.uint8),
            "row_scale": scale.astype(np.float32),
        },
    }
    report = {"peak_gops": peak, "args": vars(args), "rows": []}
    for batch in args.batch:
        words = rng.standard_normal((batch * args.words, args.dim), np.float32)
        words /= np.linalg.norm(words, axis=1, keepdims=True)
        exact = None
        for name, (sess, precision) in sessions.items():
            seconds, out = timed(sess, {**inputs[name], "words": words}, args.repeats)
            out = out.T if name == "int8 words (u8s8)" else out
            exact = out if name == "fp32" else exact
            ops = 2 * n * args.dim * len(words)
            read = next(iter(inputs[name].values())).nbytes
            report["rows"].append({
                "batch": batch, "path": name, "ms": 1e3 * seconds, "gops": ops / seconds / 1e9,
                "of_peak": ops / seconds / 1e9 / peak[precision], "peak": precision,
                "gallery_mb": read / 1e6, "gb_s": read / seconds / 1e9,
                "max_error": float(np.abs(out - exact).max()),
            })  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{args.images} images × {args.regions} regions × D {args.dim}, {args.words} words per "
        f"query, {args.threads} threads; peaks: fp32 {peak['fp32']:.0f} GFLOP/s, int8 u8s8 "
        f"{peak['int8']:.0f} GOP/s ({peak['int8'] / peak['fp32']:.1f}×)"
    )
    print(f"{'batch':>5} {'path':18} {'ms':>8} {'GOP/s':>7} {'of peak':>8} {'MB read':>8} "
          f"{'GB/s':>6} {'max err':>8}")  # fmt: skip
    for r in report["rows"]:
        print(
            f"{r['batch']:>5} {r['path']:18} {r['ms']:8.1f} {r['gops']:7.0f} "
            f"{100 * r['of_peak']:7.0f}% {r['gallery_mb']:8.0f} {r['gb_s']:6.1f} "
            f"{r['max_error']:8.1e}"
        )


if __name__ == "__main__":
    main()
