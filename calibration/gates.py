"""Accuracy gates: a precision variant against the FP32 PyTorch reference, element-wise per graph
output and on retrieval (ΔRecall@K, both directions, K = 1, 5, 10).

Targets (points of Recall@K): FP16 0.3, INT8 1.0. When a variant misses its target, each graph
is swapped in alone (the other two FP32) to say which one is to blame.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from scan_deploy.export.compare import graph_sample, ort_similarities
from scan_deploy.export.verify import compare_graphs, session

from scan_deploy.bundle import Bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.choices import Graph, Precision
from scan_deploy.metrics import KS, recall_metrics
from scan_deploy.precomp import PrecompSplit

TARGETS = {Precision.FP16: 0.3, Precision.INT8: 1.0}
Graphs = dict[str, onnx.ModelProto]


def pipeline_similarities(
    bundle: Bundle,
    graphs: Graphs,
    split: PrecompSplit,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The deployed ONNX Runtime pipeline with these graphs, on a split."""
    sessions = {name: session(graph, threads) for name, graph in graphs.items()}
    return ort_similarities(bundle, sessions, split, progress=progress)


def recall_deltas(reference: dict, metrics: dict) -> dict[str, float]:
    """Recall@K of `metrics` minus the reference's, in points, e.g. {"i2t_r1": -0.2, ...}."""
    return {
        f"{d}_r{k}": round(metrics[d][f"r{k}"] - reference[d][f"r{k}"], 6)
        for d in ("i2t", "t2i")
        for k in KS
    }


def worst_delta(reference: dict, sims: np.ndarray, captions_per_image: int) -> float:
    """The largest |ΔR@K|; infinite when a similarity is not finite."""
    if not np.isfinite(sims).all():
        return float("inf")
    deltas = recall_deltas(reference, recall_metrics(sims, captions_per_image))
    return max(abs(v) for v in deltas.values())


def run_gate(
    bundle: Bundle,
    checkpoint: Checkpoint,
    variant: Graphs,
    fp32: Graphs,
    split: PrecompSplit,
    reference_sims: np.ndarray,
    precision: str,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Element-wise errors per graph output and ΔR@K of the variant pipeline; blame on failure."""
    target = TARGETS[precision]
    reference = recall_metrics(reference_sims, split.captions_per_image)
    sims = pipeline_similarities(bundle, variant, split, threads, progress)
    metrics = recall_metrics(sims, split.captions_per_image)
    deltas = recall_deltas(reference, metrics)
    worst = worst_delta(reference, sims, split.captions_per_image)
    report = {
        "precision": precision,
        "target_delta_recall": target,
        "split_images": split.num_images,
        "reference": reference,
        "variant": metrics,
        "delta_recall": deltas,
        "worst_delta_recall": worst,
        "similarity_max_abs": float(np.abs(sims - reference_sims).max()),
        "graphs": _graph_errors(bundle, checkpoint, variant, split, threads),
        "passed": worst <= target,
        "blame": [],
    }
    if not report["passed"]:
        for name in Graph:
            alone = {**fp32, name: variant[name]}
            alone_sims = pipeline_similarities(bundle, alone, split, threads)
            report["blame"].append(
                {
                    "graph": name,
                    "worst_delta_recall": worst_delta(
                        reference, alone_sims, split.captions_per_image
                    ),
                }
            )
        report["blame"].sort(key=lambda b: b["worst_delta_recall"], reverse=True)
    return report


def _graph_errors(
    bundle: Bundle, checkpoint: Checkpoint, graphs: Graphs, split: PrecompSplit, threads: int
) -> list[dict]:
    sessions = {name: session(graph, threads) for name, graph in graphs.items()}
    errors = compare_graphs(sessions, checkpoint.model.eval(), *graph_sample(bundle, split))
    return [
        {k: getattr(e, k) for k in ("graph", "output", "max_abs", "max_rel", "cosine")}
        for e in errors
    ]
