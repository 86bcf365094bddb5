"""`scan-deploy export`: build the three graphs, check them (ONNX checker, then ONNX Runtime against
PyTorch on generated inputs, as timm does), and write the bundle atomically. The manifest records
a digest of the checkpoint's weights (`weights.sha256`: `scan_deploy.weights.weights_digest`) so
that the torch backend can refuse a checkpoint with other weights."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from scan_deploy.export.encoders import image_encoder_graph, text_encoder_graph
from scan_deploy.export.graph_builder import describe_value
from scan_deploy.export.scorer import scorer_graph
from scan_deploy.export.verify import OutputError, compare_graphs, generated_inputs, session

from scan_deploy import __version__
from scan_deploy.atomic import atomic_dir, check_output_dir, write_json
from scan_deploy.bundle import FORMAT_VERSION, MANIFEST, PADDED_REGIONS, VOCAB, sha256_file
from scan_deploy.bundle import MARKER as BUNDLE_MARKER
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.errors import UserError
from scan_deploy.weights import weights_digest


class ParityError(UserError):
    """The exported graphs do not reproduce the PyTorch reference: nothing is written."""

    exit_code = 1


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(f"shape range: expected 1 <= min <= opt <= max, got {asdict(self)}")


@dataclass(frozen=True)
class ShapeRanges:
    """The shapes engines are built for (TensorRT optimization profiles come from these)."""

    batch: DimRange
    regions: DimRange
    words: DimRange

    @classmethod
    def create(
        cls,
        max_batch: int,
        regions: int,
        max_words: int,
        min_regions: int | None = None,
        max_regions: int | None = None,
    ) -> ShapeRanges:
        """`regions` is the region count engines are tuned for; `min_regions`/`max_regions`
        (default: `regions`) the range they accept (adaptive features)."""
        low, high = min_regions or regions, max_regions or regions
        if not low <= regions <= high:
            raise UserError(
                f"--min-regions/--regions/--max-regions: got {low}, {regions}, {high}, "
                "expected min <= regions <= max"
            )
        if max_words < 3:  # the word limit counts <start> and <end>
            raise UserError(
                f"max_words: got {max_words}, expected at least 3 (<start>, a word and <end>)"
            )
        return cls(
            DimRange(1, min(32, max_batch), max_batch),
            DimRange(low, regions, high),
            DimRange(1, min(16, max_words), max_words),
        )


EXPLAIN = "explain"  # written as explain.onnx, recorded as the manifest's `explain`


def build_graphs(model, opset: int) -> dict[str, onnx.ModelProto]:
    """The three graphs, and `explain` (the scorer with its attention)."""
    return {
        "image_encoder": image_encoder_graph(model, opset),
        "text_encoder": text_encoder_graph(model, opset),
        "scorer": scorer_graph(model.config, opset),
        EXPLAIN: scorer_graph(model.config, opset, attention=True),
    }


def check_parity(model, graphs: dict[str, onnx.ModelProto], ranges: ShapeRanges) -> list[dict]:
    """ONNX checker, then ORT vs PyTorch at batch 1 and the optimal batch; raises ParityError."""
    for name, graph in graphs.items():
        try:
            onnx.checker.check_model(graph, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ParityError(f"{name}: ONNX checker: {str(exc).splitlines()[0]}") from None
    sessions = {name: session(graph) for name, graph in graphs.items()}
    report: list[OutputError] = []
    config, words = model.config, ranges.words.max
    for batch in sorted({1, ranges.batch.opt}):
        inputs = generated_inputs(
            config.vocab_size, config.img_dim, batch, ranges.regions.opt, words, seed=batch
        )
        report += compare_graphs(sessions, model, *inputs)
    padded = generated_inputs(  # images of fewer regions, zero-padded (adaptive features)
        config.vocab_size,
        config.img_dim,
        max(2, ranges.batch.opt),
        ranges.regions.max,
        words,
        seed=0,
        min_regions=max(1, min(ranges.regions.min, ranges.regions.max // 4)),
    )
    report += compare_graphs(sessions, model, *padded)
    failures = [e for e in report if not e.ok]
    if failures:
        worst = max(failures, key=lambda e: e.max_abs / e.tolerance)
        raise ParityError(
            f"{worst.graph}: {worst.output}: ONNX Runtime differs from PyTorch by "
            f"{worst.max_abs:.2e} (tolerance {worst.tolerance:.0e}); bundle not written"
        )
    return [asdict(e) for e in report]


def export_bundle(
    checkpoint: Checkpoint, out: Path, opset: int, ranges: ShapeRanges, force: bool = False
) -> dict[str, Any]:
    """Write the bundle folder `out`; returns the manifest."""
    out = Path(out)
    check_output_dir(out, force, BUNDLE_MARKER, inputs=[checkpoint.path])
    model = checkpoint.model.eval()
    graphs = build_graphs(model, opset)
    parity = check_parity(model, graphs, ranges)
    with atomic_dir(out) as tmp:
        entries = {}
        for name, graph in graphs.items():
            onnx.save_model(graph, str(tmp / f"{name}.onnx"))
            entries[name] = {
                "file": f"{name}.onnx",
                "sha256": sha256_file(tmp / f"{name}.onnx"),
                "inputs": [describe_value(v) for v in graph.graph.input],
                "outputs": [describe_value(v) for v in graph.graph.output],
            }
        explain_entry = entries.pop(EXPLAIN)
        checkpoint.vocab.save(tmp / VOCAB)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "vocab": {
                "file": VOCAB,
                "sha256": sha256_file(tmp / VOCAB),
                "words_sha256": checkpoint.vocab.sha256(),
                "size": len(checkpoint.vocab),
            },
            "opset": opset,
            "shape_ranges": asdict(ranges),
            "padded_regions": PADDED_REGIONS,  # what the graphs do with all-zero region rows
            "graphs": entries,
            "explain": explain_entry,  # the scorer with its attention (`scan-deploy explain`)
            "export_parity": parity,
            "source": {"checkpoint": str(checkpoint.path), **checkpoint.meta},
            "weights": {"sha256": weights_digest(model.state_dict())},  # the torch backend's check
            "tools": {
                "scan_deploy": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
