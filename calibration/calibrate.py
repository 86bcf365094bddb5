"""`scan-deploy calibrate`: make the FP16 or INT8 variant of a bundle's three graphs, gate it
against the FP32 PyTorch reference, and record it in the bundle.

1. a seeded sample of the calibration split (INT8 activation ranges are computed on it and cached
   under `BUNDLE/calibration/`, keyed by graph hash, data, sample and method);
2. the search of `search.py` on that sample decides which units stay in higher precision;
3. the gate of `gates.py` on the evaluation split (the test split by default);
4. only a variant that meets its target (or with `accept_loss`) is written: `{graph}.{precision}
   .onnx` files and a `variants.{precision}` manifest entry (hashes, kept nodes, calibration
   settings, the gate report).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from scan_deploy.calibration import fp16, int8
from scan_deploy.calibration.data import image_feeds, sample_split, scorer_feeds, text_feeds
from scan_deploy.calibration.gates import (
    TARGETS,
    pipeline_similarities,
    run_gate,
    worst_delta,
)
from scan_deploy.calibration.int8_scorer import gate_int8_scorers
from scan_deploy.calibration.search import (
    Measurement,
    Unit,
    choose_kept,
    fp16_units,
    int8_units,
)
from scan_deploy.export.compare import check_same_model
from scan_deploy.export.graph_builder import describe_value
from scan_deploy.export.verify import session

from scan_deploy.atomic import atomic_path, write_json
from scan_deploy.bundle import MANIFEST, Bundle, sha256_file
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.choices import Graph, Precision
from scan_deploy.errors import one_of
from scan_deploy.evaluate import split_similarities
from scan_deploy.jsonfile import json_safe, read_json_object
from scan_deploy.metrics import recall_metrics
from scan_deploy.precomp import PrecompSplit

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class CalibrationSettings:
    precision: Precision  # fp16 or int8 (a member or its value)
    method: str = "max"  # INT8 only
    samples: int = 256
    seed: int = 0
    split: str = "train"
    accept_loss: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        precision = Precision.parse(self.precision, "precision", among=TARGETS)
        object.__setattr__(self, "precision", precision)
        one_of(self.method, int8.METHODS, "method")


def calibrate_bundle(
    bundle: Bundle,
    checkpoint: Checkpoint,
    calibration_split: PrecompSplit,
    eval_split: PrecompSplit,
    settings: CalibrationSettings,
    progress: Progress | None = None,
) -> dict:
    """Search, gate and (if it passes or loss is accepted) write the variant; returns the report
    with `written` telling whether the bundle changed."""
    check_same_model(bundle, checkpoint)
    report_progress = progress or (lambda stage, done, total: None)
    fp32 = {name: _named_nodes(onnx.load(str(bundle.graph_path(name)))) for name in Graph}
    sample = sample_split(calibration_split, settings.samples, settings.seed)
    report_progress("reference on the calibration sample", 0, 1)
    sample_reference = split_similarities(checkpoint, sample)
    sample_metrics = recall_metrics(sample_reference, sample.captions_per_image)
    build, units = _builder(bundle, fp32, sample, calibration_split, settings)

    def measure(graphs) -> Measurement:
        sims = pipeline_similarities(bundle, graphs, sample, settings.threads)
        worst = worst_delta(sample_metrics, sims, sample.captions_per_image)
        error = float(np.abs(sims - sample_reference).max()) if np.isfinite(worst) else np.inf
        return Measurement(worst, error)

    report_progress("precision search", 0, 1)
    decision = choose_kept(units, build, measure, TARGETS[settings.precision])
    variant = build(decision.kept)
    report_progress("reference on the evaluation split", 0, 1)
    eval_reference = split_similarities(checkpoint, eval_split)
    gate = run_gate(
        bundle,
        checkpoint,
        variant,
        fp32,
        eval_split,
        eval_reference,
        settings.precision,
        settings.threads,
        lambda n: report_progress("gate", n, eval_split.num_captions),
    )
    gate["suspect_ops"] = _suspects(gate, decision)
    record = {
        "kept_higher_precision": decision.kept_report(),
        "search": decision.steps,
        "calibration": {
            "split": settings.split,
            "samples": sample.num_images,
            "seed": settings.seed,
            "method": settings.method if settings.precision == "int8" else None,
            "quantized_ops": list(int8.QUANTIZED_OPS) if settings.precision == "int8" else None,
        },
        "gate": gate,
        "accepted_loss": not gate["passed"] and settings.accept_loss,
        "refused": _refusal(gate, decision, units, settings),
    }
    record = json_safe(record)  # non-finite measurements are recorded as null
    written = record["refused"] is None
    if written:
        _write_variant(bundle, settings.precision, variant, record)
    report = {**record, "written": written}
    if settings.precision == Precision.INT8:
        scorers, records = gate_int8_scorers(
            bundle, eval_split, eval_reference, settings.threads, settings.accept_loss, progress
        )
        records = json_safe(records)
        write_int8_scorers(bundle, scorers, records)
        report["int8_scorers"] = {
            kind: {**record, "written": kind in scorers} for kind, record in records.items()
        }
    return report


def _builder(
    bundle: Bundle,
    fp32: dict[str, onnx.ModelProto],
    sample: PrecompSplit,
    calibration_split: PrecompSplit,
    settings: CalibrationSettings,
):
    """`build(kept units) -> graphs` for the precision, and the candidate units."""
    if settings.precision == "fp16":

        def build_fp16(kept: list[Unit]) -> dict[str, onnx.ModelProto]:
            return {
                name: fp16.to_fp16(model, {n for u in kept if u.graph == name for n in u.nodes})
                for name, model in fp32.items()
            }

        return build_fp16, fp16_units(fp32)
    key = _cache_key(bundle, calibration_split, settings)
    caches = {
        name: bundle.path / "calibration" / f"{name}.{settings.method}.{key}.json" for name in fp32
    }
    if not all(int8.usable_cache(caches[name], fp32[name], settings.method) for name in fp32):
        sessions = {name: session(model, settings.threads) for name, model in fp32.items()}
        feeds = {
            "image_encoder": image_feeds(sample),
            "text_encoder": text_feeds(sample, bundle.vocab),
            "scorer": scorer_feeds(
                sessions, sample, bundle.vocab, bundle.config.cross_attn == "t2i"
            ),
        }
    else:
        feeds = dict.fromkeys(Graph)

    def build_int8(kept: list[Unit]) -> dict[str, onnx.ModelProto]:
        return {
            name: int8.quantize(
                model,
                feeds[name],
                settings.method,
                caches[name],
                {n for u in kept if u.graph == name for n in u.nodes},
            )
            for name, model in fp32.items()
        }

    return build_int8, int8_units(fp32)


def _cache_key(bundle: Bundle, split: PrecompSplit, settings: CalibrationSettings) -> str:
    """The FP32 graphs (the scorer is calibrated on the encoders' outputs), the data file's
    identity, and the sample settings."""
    source = split.features_path
    stat = source.stat() if source is not None and source.exists() else None
    identity = {
        "graphs": {name: bundle.graph(name)["sha256"] for name in Graph},
        "features": str(source.resolve()) if source else None,
        "size": stat.st_size if stat else None,
        "mtime_ns": stat.st_mtime_ns if stat else None,
        "captions": split.num_captions,
        "samples": settings.samples,
        "seed": settings.seed,
        "method": settings.method,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bundles exported before nodes were named: give every node a unique name (its output)."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = node.output[0] if node.output else f"{node.op_type}_{index}"
    return model


def _refusal(gate: dict, decision, units: list[Unit], settings: CalibrationSettings) -> str | None:
    """Why the variant is not written, or None."""
    if units and len(decision.kept) == len(units):
        return (
            f"every candidate had to stay in higher precision to meet the target: the "
            f"{settings.precision} variant would be FP32"
        )
    if not gate["passed"] and not settings.accept_loss:
        return (
            f"worst |ΔR@K| {gate['worst_delta_recall']:.2f} misses the "
            f"{TARGETS[settings.precision]} target (pass accept_loss=True, on the command line "
            "--accept-loss, to write it anyway)"
        )
    return None


def _suspects(gate: dict, decision) -> list[dict]:
    """When the gate fails: the units left in low precision that hurt the sample most alone
    (measured only when the sample itself missed the target)."""
    if gate["passed"]:
        return []
    low = [u for u in decision.sensitivity if u not in decision.kept]
    ranked = sorted(low, key=decision.sensitivity.__getitem__, reverse=True)
    return [
        {"graph": u.graph, "op": u.label, **asdict(decision.sensitivity[u])} for u in ranked[:5]
    ]


def _write_variant(
    bundle: Bundle, precision: str, graphs: dict[str, onnx.ModelProto], record: dict
) -> None:
    """The manifest first forgets the old variant, then the graph files are replaced (each
    atomically), then the manifest names the new ones: a crash in between leaves a bundle that
    loads (without this variant), never one whose hashes do not match."""
    manifest = _manifest_on_disk(bundle)
    variants = {k: v for k, v in manifest.get("variants", {}).items() if k != precision}
    if precision in manifest.get("variants", {}):
        write_json(bundle.path / MANIFEST, {**manifest, "variants": variants})
    entries = {
        name: _graph_file(bundle.path / f"{name}.{precision}.onnx", model)
        for name, model in graphs.items()
    }
    variants[precision] = {"graphs": entries, **record}
    write_json(bundle.path / MANIFEST, {**manifest, "variants": variants})


def write_int8_scorers(
    bundle: Bundle, graphs: dict[str, onnx.ModelProto], records: dict[str, dict]
) -> None:
    """`int8_scorers.{kind}` (the graph's entry and its gate) for each scorer in `graphs`, in
    the order `_write_variant` writes a variant; scorers not in `graphs` are forgotten."""
    manifest = _manifest_on_disk(bundle)
    if "int8_scorers" in manifest:
        manifest.pop("int8_scorers")
        write_json(bundle.path / MANIFEST, manifest)
    if not graphs:
        return
    entries = {
        kind: {**_graph_file(bundle.path / f"int8_scorer.{kind}.onnx", model), **records[kind]}
        for kind, model in graphs.items()
    }
    write_json(bundle.path / MANIFEST, {**manifest, "int8_scorers": entries})


def _manifest_on_disk(bundle: Bundle) -> dict:
    """The manifest as it is now (a variant written earlier in this run is in it)."""
    return read_json_object(bundle.path / MANIFEST, "the manifest of an export bundle folder")


def _graph_file(target: Path, model: onnx.ModelProto) -> dict:
    """Write `model` to `target` atomically; its manifest entry (file, sha256, inputs,
    outputs)."""
    with atomic_path(target, suffix=".onnx") as tmp:
        onnx.save_model(model, str(tmp))
        digest = sha256_file(tmp)
    return {
        "file": target.name,
        "sha256": digest,
        "inputs": [describe_value(v) for v in model.graph.input],
        "outputs": [describe_value(v) for v in model.graph.output],
    }
