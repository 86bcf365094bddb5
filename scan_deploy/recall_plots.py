"""Recall@K as pictures: `evaluate --plot` (R@1/5/10 per direction, one model) and
`calibrate --plot` (each pipeline's R@K against the FP32 reference, and ΔR@K against the
variant's target). matplotlib (the `plots` extra), written whole (a temp file renamed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scan_deploy.atomic import atomic_path

DIRECTIONS = (("i2t", "image→text"), ("t2i", "text→image"))
KS = (1, 5, 10)


def _pyplot():
    import matplotlib  # the `plots` extra (the command line names it when it is missing)

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    _pyplot().close(figure)


def write_recall_png(path: Path, results: dict, title: str) -> None:
    """Grouped bars: R@1, R@5, R@10 of each direction, the values written on the bars."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6, 3.6), dpi=100)
    width = 0.38
    for offset, (key, name) in zip((-width / 2, width / 2), DIRECTIONS, strict=True):
        values = [results[key][f"r{k}"] for k in KS]
        bars = axes.bar(np.arange(len(KS)) + offset, values, width, label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_xticks(range(len(KS)), [f"R@{k}" for k in KS])
    axes.set_ylim(0, 105)
    axes.set_ylabel("recall (%)")
    axes.set_title(f"{title}: rsum {results['rsum']:.1f}", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    _save(figure, path)


def write_gate_png(path: Path, rows: dict[str, dict], target: float, title: str) -> None:
    """ΔR@K of each pipeline in `rows` (name → its `delta_recall`: "i2t_r1" ... in points) as
    grouped bars, with the ±target band of the gate."""
    pyplot = _pyplot()
    keys = [f"{d}_r{k}" for d, _ in DIRECTIONS for k in KS]
    labels = [f"{d} R@{k}" for d, _ in DIRECTIONS for k in KS]
    figure, axes = pyplot.subplots(figsize=(7, 3.6), dpi=100)
    width = 0.8 / max(1, len(rows))
    for i, (name, deltas) in enumerate(rows.items()):
        values = [deltas[key] if deltas else np.nan for key in keys]
        axes.bar(
            np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width, values, width, label=name
        )
    axes.axhspan(-target, target, color="green", alpha=0.12, label=f"target ±{target}")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xticks(range(len(keys)), labels, fontsize=8)
    axes.set_ylabel("ΔR@K vs FP32 PyTorch (points)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    _save(figure, path)
