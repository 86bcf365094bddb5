"""What the benchmarks share: the command-line workload, its seeded embeddings, the GEMM peak."""

from __future__ import annotations

import argparse
import time

import torch

from scan_deploy.scoring import l2norm


def workload_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def embeddings(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised region and word embeddings; caption lengths 10-22 tokens (8-20 words plus
    <start>/<end>), words zero beyond each length."""
    gen = torch.Generator().manual_seed(args.seed)
    images = l2norm(torch.randn(args.images, args.regions, args.dim, generator=gen), -1)
    lengths = torch.randint(10, 23, (args.captions,), generator=gen)
    words = l2norm(torch.randn(args.captions, int(lengths.max()), args.dim, generator=gen), -1)
    words[torch.arange(words.shape[1])[None] >= lengths[:, None]] = 0
    return images, words, lengths


def gemm_peak(repeats: int = 5) -> float:
    """Measured fp32 GEMM GFLOP/s (4096×1024×4096) with the current torch threads."""
    a, b = torch.randn(4096, 1024), torch.randn(1024, 4096)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 4096 * 1024 * 4096 * repeats / (time.perf_counter() - start) / 1e9


def bf16_gemm_peak(repeats: int = 5) -> float:
    """Measured BF16 GEMM GFLOP/s (4096×1024×4096, autocast) with the current torch threads."""
    a, b = torch.randn(4096, 1024), torch.randn(1024, 4096)
    with torch.autocast("cpu", torch.bfloat16):
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
    return 2 * 4096 * 1024 * 4096 * repeats / (time.perf_counter() - start) / 1e9
