"""Vectorized Gram-identity scorer vs the original SCAN per-caption loop, measured in one run.

    .venv/bin/python benchmarks/bench_scorer.py [--images N] [--captions M] [--loop-captions K]

Both run on the same inputs with the same torch threads. The original loop (a line-by-line port of
`xattn_score_t2i` / `xattn_score_i2t`: one caption at a time, repeated against all images, with the
explicit attended context and the original's copies) is timed on the first `--loop-captions`
captions and extrapolated linearly to all captions (its cost is exactly linear in the number of
captions); the max abs difference is taken on that subset. GFLOP/s counts the logits GEMM
(2·N·R·D·Σ lengths), next to a measured fp32 GEMM peak; with `--bf16`, the vectorized scorer is
also timed under `torch.autocast("cpu", torch.bfloat16)` against the measured BF16 GEMM peak.
"""

from __future__ import annotations

import time

import torch
from workload import bf16_gemm_peak, embeddings, gemm_peak, workload_parser

from scan_deploy.allocator import keep_freed_memory
from scan_deploy.config import ModelConfig
from scan_deploy.scoring import l2norm, similarity_matrix


def original_func_attention(query, context, cfg):
    """The original `func_attention`, line for line (transposes and `.contiguous()` copies too)."""
    batch_size, source_len = context.size(0), context.size(1)
    query_len = query.size(1)
    attn = torch.bmm(context, torch.transpose(query, 1, 2))  # (n, sourceL, queryL)
    kind = cfg.raw_feature_norm
    if kind == "softmax":
        attn = torch.softmax(attn.view(batch_size * source_len, query_len), dim=1)
        attn = attn.view(batch_size, source_len, query_len)
    elif kind == "clipped_l2norm":
        attn = l2norm(torch.nn.functional.leaky_relu(attn, 0.1), 2)
    elif kind == "l2norm":
        attn = l2norm(attn, 2)
    attn = torch.transpose(attn, 1, 2).contiguous().view(batch_size * query_len, source_len)
    attn = torch.softmax(attn * cfg.lambda_softmax, dim=1).view(batch_size, query_len, source_len)
    attn_t = torch.transpose(attn, 1, 2).contiguous()
    weighted = torch.bmm(torch.transpose(context, 1, 2), attn_t)
    return torch.transpose(weighted, 1, 2)


def original_cosine(x1, x2):
    """The original `cosine_similarity(x1, x2, dim=2)`."""
    w12 = torch.sum(x1 * x2, 2)
    w1 = torch.norm(x1, 2, 2)
    w2 = torch.norm(x2, 2, 2)
    return w12 / (w1 * w2).clamp(min=1e-8)


@torch.no_grad()
def original_scores(images, words, lengths, cfg):
    """The original `xattn_score_t2i` / `xattn_score_i2t` loop over captions."""
    columns = []
    for j in range(words.shape[0]):
        cap = words[j, : int(lengths[j])].unsqueeze(0).contiguous().repeat(images.shape[0], 1, 1)
        if cfg.cross_attn == "t2i":
            context = original_func_attention(cap, images, cfg).contiguous()
            row = original_cosine(cap, context)
        else:
            context = original_func_attention(images, cap, cfg).contiguous()
            row = original_cosine(images, context)
        if cfg.agg_func == "LogSumExp":
            row = torch.log(torch.exp(row * cfg.lambda_lse).sum(1)) / cfg.lambda_lse
        else:
            row = row.mean(1)
        columns.append(row)
    return torch.stack(columns, 1)


def main() -> None:
    keep_freed_memory()  # as the CLI does
    parser = workload_parser(__doc__.split("\n")[0])
    parser.add_argument("--loop-captions", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="also time it under bf16 autocast")
    args = parser.parse_args()
    images, words, lengths = embeddings(args)
    print(
        f"{args.images} images x {args.captions} captions, R={args.regions}, D={args.dim}, "
        f"mean length {lengths.float().mean():.1f}, torch threads {torch.get_num_threads()}"
    )
    peak = gemm_peak()
    print(f"fp32 GEMM peak (4096x1024x4096): {peak:.1f} GFLOP/s")
    print(
        f"{'variant':<22}{'vectorized s':>14}{'loop s (extrap.)':>18}{'speed-up':>10}"
        f"{'max |diff|':>12}{'GFLOP/s':>10}{'% peak':>8}"
    )
    for direction in ("t2i", "i2t"):
        for agg in ("LogSumExp", "Mean"):
            cfg = ModelConfig(vocab_size=1, cross_attn=direction, agg_func=agg)
            start = time.perf_counter()
            fast = similarity_matrix(images, words, lengths, cfg)
            fast_s = time.perf_counter() - start
            subset = slice(0, args.loop_captions)
            start = time.perf_counter()
            loop = original_scores(images, words[subset], lengths[subset], cfg)
            loop_s = (time.perf_counter() - start) * args.captions / args.loop_captions
            diff = (fast[:, subset] - loop).abs().max().item()
            gflops = 2 * args.images * args.regions * args.dim * int(lengths.sum()) / fast_s / 1e9
            print(
                f"{direction + ' ' + agg:<22}{fast_s:>14.2f}{loop_s:>18.2f}"
                f"{loop_s / fast_s:>9.1f}x"
                f"{diff:>12.2e}{gflops:>10.1f}{100 * gflops / peak:>7.0f}%"
            )
    if args.bf16:
        bf16_peak = bf16_gemm_peak()
        print(f"bf16 GEMM peak (4096x1024x4096, autocast): {bf16_peak:.1f} GFLOP/s")
        for direction in ("t2i", "i2t"):
            for agg in ("LogSumExp", "Mean"):
                cfg = ModelConfig(vocab_size=1, cross_attn=direction, agg_func=agg)
                with torch.autocast("cpu", torch.bfloat16):
                    start = time.perf_counter()
                    similarity_matrix(images, words, lengths, cfg)
                    seconds = time.perf_counter() - start
                flops = 2 * args.images * args.regions * args.dim * int(lengths.sum())
                gflops = flops / seconds / 1e9
                print(
                    f"{direction + ' ' + agg + ' bf16':<22}{seconds:>14.2f}{'':>18}{'':>10}"
                    f"{'':>12}{gflops:>10.1f}{100 * gflops / bf16_peak:>7.0f}%"
                )


if __name__ == "__main__":
    main()
