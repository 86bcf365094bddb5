"""ONNX Runtime CPU time of `scorer.onnx` vs the PyTorch reference scorer, measured in one run.

    .venv/bin/python benchmarks/bench_export.py [--images N] [--captions M] [--dim D]

Same inputs and the same number of threads for both. Both score the same (images × captions)
blocks: captions sorted by length, 64 per block, cut to their longest caption, and `--block-images`
images per block (the ONNX scorer scores whatever block it is fed, so the caller blocks as the
PyTorch `similarity_matrix` does). GFLOP/s counts the logits GEMM (2·N·R·D·Σ lengths), next to a
measured fp32 GEMM peak.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch
from scan_deploy.export.compare import scorer_blocks
from scan_deploy.export.scorer import scorer_graph
from workload import embeddings, gemm_peak, workload_parser

from scan_deploy.allocator import keep_freed_memory
from scan_deploy.config import ModelConfig
from scan_deploy.scoring import CAPTION_CHUNK, caption_gram, region_gram, similarity_matrix


def ort_scores(session, config, images, words, lengths, block_images):
    """The ONNX scorer over length-sorted caption chunks × image blocks (Grams from torch)."""
    t2i = config.cross_attn == "t2i"
    order = np.argsort(-lengths, kind="stable")

    def caption_chunks():
        for start in range(0, len(order), CAPTION_CHUNK):
            idx = order[start : start + CAPTION_CHUNK]
            chunk = np.ascontiguousarray(words[idx, : lengths[idx].max()])
            gram = None if t2i else caption_gram(torch.from_numpy(chunk)).numpy()
            yield idx, chunk, lengths[idx], gram

    grams = region_gram(torch.from_numpy(images)).numpy() if t2i else None
    return scorer_blocks(
        session, t2i, images, grams, caption_chunks(), words.shape[0], block_images
    )


def main() -> None:
    keep_freed_memory()  # as the CLI does
    parser = workload_parser(__doc__.split("\n")[0])
    parser.add_argument("--block-images", type=int, default=32)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    images, words, lengths = embeddings(args)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    peak = gemm_peak()
    flops = 2 * args.images * args.regions * args.dim * int(lengths.sum())
    print(
        f"{args.images} images x {args.captions} captions, R={args.regions}, D={args.dim}, "
        f"{threads} threads (torch and ORT); fp32 GEMM peak {peak:.1f} GFLOP/s"
    )
    print(
        f"{'variant':<16}{'ORT s':>9}{'torch s':>9}{'ORT/torch':>11}{'max |diff|':>12}"
        f"{'ORT GFLOP/s':>13}{'% peak':>8}"
    )
    for direction in ("t2i", "i2t"):
        for agg in ("LogSumExp", "Mean"):
            config = ModelConfig(
                vocab_size=1, embed_size=args.dim, cross_attn=direction, agg_func=agg
            )
            session = ort.InferenceSession(
                scorer_graph(config).SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
            )
            start = time.perf_counter()
            got = ort_scores(
                session, config, images.numpy(), words.numpy(), lengths.numpy(), args.block_images
            )
            ort_s = time.perf_counter() - start
            start = time.perf_counter()
            ref = similarity_matrix(images, words, lengths, config).numpy()
            torch_s = time.perf_counter() - start
            gflops = flops / ort_s / 1e9
            print(
                f"{direction + ' ' + agg:<16}{ort_s:>9.2f}{torch_s:>9.2f}{ort_s / torch_s:>10.2f}x"
                f"{np.abs(got - ref).max():>12.2e}{gflops:>13.1f}{100 * gflops / peak:>7.0f}%"
            )


if __name__ == "__main__":
    main()
