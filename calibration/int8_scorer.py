"""The int8-gallery scorers (`export/scorer.int8_gallery_scorer_graph`), one per gallery kind,
gated like every variant and recorded in the bundle under `int8_scorers` when they pass.

What is gated is what `query` runs on an int8 gallery with them: the FP32 encoders (ONNX
Runtime), the gallery side quantized exactly as `index --dtype int8` stores it
(`scan_deploy.int8_rows`), the query side in float32, into the integer scorer; against
the FP32 PyTorch reference on the evaluation split, |ΔRecall@K| (K = 1, 5, 10, both directions)
within the INT8 target (`gates.TARGETS`). The `images` scorer serves text queries, the
`captions` scorer image queries; each is written only when it passes (or with `accept_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from scan_deploy.calibration.gates import TARGETS, recall_deltas, worst_delta
from scan_deploy.export.compare import caption_chunks, encode_split_images
from scan_deploy.export.scorer import int8_gallery_scorer_graph
from scan_deploy.export.verify import session
from scan_deploy.runtime.gallery_format import KINDS, SCALE_SUFFIX

from scan_deploy.bundle import Bundle
from scan_deploy.choices import Graph, Precision
from scan_deploy.int8_rows import quantize_int8
from scan_deploy.metrics import recall_metrics
from scan_deploy.precomp import PrecompSplit

BLOCK = 64  # gallery items (and queries) per scorer call


def gate_int8_scorers(
    bundle: Bundle,
    split: PrecompSplit,
    reference_sims: np.ndarray,
    threads: int = 0,
    accept_loss: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, onnx.ModelProto], dict[str, dict]]:
    """Build and gate the scorer of each gallery kind on `split` (`reference_sims`: the FP32
    PyTorch similarities). Returns the graphs to write (those that pass, or all with
    `accept_loss`) and the gate record of each kind."""
    encoders = {
        graph: session(str(bundle.graph_path(graph)), threads)
        for graph in (Graph.IMAGE_ENCODER, Graph.TEXT_ENCODER)
    }
    per_image = split.captions_per_image
    reference = recall_metrics(reference_sims, per_image)
    target = TARGETS[Precision.INT8]
    report = progress or (lambda stage, done, total: None)
    graphs, records = {}, {}
    for kind in KINDS:
        graph = int8_gallery_scorer_graph(bundle.config, kind, bundle.manifest["opset"])
        stage = f"int8 scorer gate ({kind} gallery)"
        sims = int8_scorer_similarities(
            bundle,
            encoders,
            session(graph, threads),
            kind,
            split,
            lambda done, stage=stage: report(stage, done, split.num_captions),
        )
        worst = worst_delta(reference, sims, per_image)
        finite = bool(np.isfinite(sims).all())
        metrics = recall_metrics(sims, per_image) if finite else None
        passed = worst <= target
        records[kind] = {
            "gate": {
                "target_delta_recall": target,
                "split_images": split.num_images,
                "reference": reference,
                "variant": metrics,
                "delta_recall": recall_deltas(reference, metrics) if finite else None,
                "worst_delta_recall": worst,
                "max_abs_error": float(np.abs(sims - reference_sims).max()) if finite else None,
                "passed": passed,
            },
            "accepted_loss": not passed and accept_loss,
        }
        if passed or accept_loss:
            graphs[kind] = graph
    return graphs, records


def int8_scorer_similarities(
    bundle: Bundle,
    encoders: dict,
    scorer,
    kind: str,
    split: PrecompSplit,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(images, captions) similarities of the split through the int8 scorer of a `kind`
    gallery: that side's arrays stored as an int8 gallery stores them, the other in float32."""
    regions, region_gram = encode_split_images(encoders[Graph.IMAGE_ENCODER], split, BLOCK)
    images = {"regions": regions, "region_gram": region_gram}
    if kind == "images":
        images = _as_stored(images)
    wanted = {value.name for value in scorer.get_inputs()}
    sims = np.empty((split.num_images, split.num_captions), np.float32)
    chunks = caption_chunks(bundle, encoders[Graph.TEXT_ENCODER], split, BLOCK)
    for idx, words, lengths, caption_gram in chunks:
        captions = {"words": words, "caption_gram": caption_gram}
        if kind == "captions":
            captions = _as_stored(captions)
        for first in range(0, split.num_images, BLOCK):
            block = {name: value[first : first + BLOCK] for name, value in images.items()}
            feeds = {**block, **captions, "lengths": lengths}
            sims[first : first + BLOCK, idx] = scorer.run(None, {n: feeds[n] for n in wanted})[0]
        if progress is not None:
            progress(len(idx))
    return sims


def _as_stored(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Codes and per-row scales, as an int8 gallery stores each array."""
    stored = {}
    for name, value in arrays.items():
        stored[name], stored[name + SCALE_SUFFIX] = quantize_int8(value)
    return stored
