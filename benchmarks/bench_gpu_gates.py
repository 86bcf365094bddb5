"""The accuracy gates on a CUDA GPU through the PyTorch reference: the FP32 reference on CUDA, and
FP16 / BF16 autocast, against the FP32 reference on the CPU (max abs similarity error, ΔR@K with
the gates' targets), with the time of each full pass. Run by hand on a machine with a GPU:

    python benchmarks/bench_gpu_gates.py CHECKPOINT --data DIR [--split test] [--json OUT.json]

ONNX Runtime's CUDA and TensorRT providers are not exercised here (they need onnxruntime-gpu);
this is the torch-CUDA path of the gates. The CUDA device is described through
`scan_deploy.engines.cuda_device` (cuda-python or pycuda), as engine sidecars record it.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import numpy as np
import torch
from scan_deploy.calibration.gates import TARGETS, recall_deltas

from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.evaluate import split_similarities
from scan_deploy.metrics import recall_metrics
from scan_deploy.precomp import load_split

# (label, device, autocast dtype or None, the gate it is held to)
RUNS = [
    ("cuda fp32", "cuda", None, None),
    ("cuda fp16 autocast", "cuda", torch.float16, "fp16"),
    ("cuda bf16 autocast", "cuda", torch.bfloat16, None),
]


def timed_similarities(checkpoint, split, device: str, dtype) -> tuple[np.ndarray, float]:
    checkpoint.model.to(device)
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()
    with autocast:
        split_similarities(checkpoint, split, num_images=64)  # warm-up (cuDNN, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sims = split_similarities(checkpoint, split)
        if device == "cuda":
            torch.cuda.synchronize()
    return np.asarray(sims, dtype=np.float32), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from scan_deploy.engines.cuda_device import current_device

    device = current_device()
    print(f"device: {device}")
    print(
        f"torch {torch.__version__}, cuda {torch.version.cuda}, threads {torch.get_num_threads()}"
    )
    checkpoint = load_checkpoint(args.checkpoint)
    split = load_split(args.data, args.split)
    reference, cpu_seconds = timed_similarities(checkpoint, split, "cpu", None)
    reference_metrics = recall_metrics(reference, split.captions_per_image)
    rows = [{"run": "cpu fp32 (reference)", "seconds": cpu_seconds, **_summary(reference_metrics)}]
    for label, where, dtype, gate in RUNS:
        sims, seconds = timed_similarities(checkpoint, split, where, dtype)
        metrics = recall_metrics(sims, split.captions_per_image)
        deltas = recall_deltas(reference_metrics, metrics)
        worst = max(abs(v) for v in deltas.values())
        rows.append(
            {
                "run": label,
                "seconds": seconds,
                **_summary(metrics),
                "similarity_max_abs": float(np.abs(sims - reference).max()),
                "delta_recall": deltas,
                "worst_delta_recall": worst,
                "gate": None
                if gate is None
                else ("PASSED" if worst <= TARGETS[gate] else "FAILED"),
            }
        )
    pairs = split.num_images * split.num_captions
    print(
        f"{args.split}: {split.num_images} images × {split.num_captions} captions ({pairs:,} pairs)"
    )
    header = f"{'run':<22}{'s':>8}{'i2t R@1':>9}{'R@5':>7}{'R@10':>7}{'t2i R@1':>9}{'R@5':>7}"
    print(header + f"{'R@10':>7}{'rsum':>8}{'max|Δsim|':>11}{'worst|ΔR|':>11}  gate")
    for row in rows:
        print(
            f"{row['run']:<22}{row['seconds']:>8.2f}"
            + "".join(f"{row[k]:>{9 if k.endswith('r1') else 7}.2f}" for k in _KEYS)
            + f"{row['rsum']:>8.1f}"
            + (
                f"{row['similarity_max_abs']:>11.2e}{row['worst_delta_recall']:>11.2f}"
                f"  {row['gate'] or '-'}"
                if "delta_recall" in row
                else ""
            )
        )
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": str(device), "rows": rows}, handle, indent=2)


_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]


def _summary(metrics: dict) -> dict:
    flat = {f"{d}_r{k}": metrics[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)}
    return {**flat, "rsum": metrics["rsum"]}


if __name__ == "__main__":
    main()
