"""A Triton Inference Server model repository from a bundle: one model per graph, with its
`config.pbtxt` and the ONNX model (platform `onnxruntime_onnx`) or the TensorRT engine
`build-engine` made (platform `tensorrt_plan`), and an ensemble of the two encoders.

    REPO/scan_image_encoder/config.pbtxt   1/model.onnx | 1/model.plan
    REPO/scan_text_encoder/...
    REPO/scan_scorer/...
    REPO/scan_encoders/config.pbtxt        1/   (ensemble: features, tokens, lengths -> both)

The encoders batch on their first dim (`max_batch_size` = the manifest's batch max, dynamic
batching on); dims come from the manifest (-1 for the symbolic ones); a `lengths` input of
shape (batch,) is declared `dims: [1]` with `reshape: { shape: [] }`, as Triton wants for a
per-item scalar. The scorer takes images and captions on two different first dims, which
Triton's batcher cannot concatenate: it is declared unbatched (`max_batch_size: 0`) with full
dims, and clients send a block as the runtime does. The text is written by hand (the format is
small); the tests parse it with tritonclient's own `ModelConfig` protobuf.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from scan_deploy.atomic import Marker, atomic_dir, check_output_dir, write_json
from scan_deploy.bundle import Bundle, DimSizes
from scan_deploy.choices import Backend, Graph, Precision

PLATFORMS = {Backend.ONNXRUNTIME: "onnxruntime_onnx", Backend.TENSORRT: "tensorrt_plan"}
MODEL_FILES = {Backend.ONNXRUNTIME: "model.onnx", Backend.TENSORRT: "model.plan"}
DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
}
PREFIX = "scan_"
ENSEMBLE = "scan_encoders"
# What marks a repository this wrote (inside a model folder: Triton reads only config.pbtxt and
# the version folders there), so --force never deletes another folder.
MARKER = Marker(f"{ENSEMBLE}/scan_deploy.json", ("format_version", "bundle"), "Triton repository")
BATCHED = (Graph.IMAGE_ENCODER, Graph.TEXT_ENCODER)
# The ensemble's outputs: both encoders output `global`, renamed apart.
ENSEMBLE_OUTPUTS = {
    Graph.IMAGE_ENCODER: {
        "regions": "regions",
        "region_gram": "region_gram",
        "global": "image_global",
    },
    Graph.TEXT_ENCODER: {"words": "words", "caption_gram": "caption_gram", "global": "text_global"},
}


def export_triton(
    bundle: Bundle,
    out: Path,
    backend: Backend = Backend.ONNXRUNTIME,
    precision: Precision = Precision.FP32,
    queue_delay_us: int = 100,
    force: bool = False,
) -> dict[str, str]:
    """Write the repository `out` (whole, or nothing); returns each model's config text."""
    sources = {graph: _model_file(bundle, graph, backend, precision) for graph in Graph}
    check_output_dir(out, force, MARKER, inputs=[bundle.path])
    max_batch = int(bundle.manifest["shape_ranges"]["batch"]["max"])
    configs = {}
    for graph in Graph:
        entry = bundle.graph(graph, precision)
        batched = graph in BATCHED
        configs[PREFIX + graph] = model_config(
            PREFIX + graph,
            PLATFORMS[backend],
            entry,
            bundle.dim_sizes(graph, precision),
            max_batch if batched else 0,
            queue_delay_us if batched else None,
        )
    configs[ENSEMBLE] = ensemble_config(bundle, precision, max_batch)
    with atomic_dir(out) as tmp:
        for name, text in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text, encoding="utf-8")
        for graph, source in sources.items():
            shutil.copyfile(source, tmp / (PREFIX + graph) / "1" / MODEL_FILES[backend])
        record = {"format_version": 1, "bundle": str(bundle.path), "backend": str(backend)}
        write_json(tmp / MARKER.file, {**record, "precision": str(precision)})
    return configs


def _model_file(bundle: Bundle, graph: Graph, backend: Backend, precision: Precision) -> Path:
    if backend == Backend.TENSORRT:  # the newest engine build-engine made (UserError if none)
        from scan_deploy.engines.load import engine_candidates

        return engine_candidates(bundle, graph, precision)[0]
    return bundle.graph_path(graph, precision)


def model_config(
    name: str,
    platform: str,
    entry: dict[str, Any],
    sizes: dict[str, DimSizes],
    max_batch: int,
    queue_delay_us: int | None,
) -> str:
    """config.pbtxt of one graph; with `max_batch` > 0 its first dim is Triton's batch dim.
    A symbolic dim is -1, or its size where the manifest fixes it (min = max: `regions`)."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    lines += _tensors("input", entry["inputs"], sizes, max_batch > 0)
    lines += _tensors("output", entry["outputs"], sizes, max_batch > 0)
    if queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    return "\n".join(lines) + "\n"


def ensemble_config(bundle: Bundle, precision: Precision, max_batch: int) -> str:
    """Both encoders as one model: features, tokens, lengths in; regions, region_gram,
    image_global, words, caption_gram, text_global out."""
    inputs, outputs, steps = [], [], []
    sizes: dict[str, DimSizes] = {}
    for graph in BATCHED:
        entry = bundle.graph(graph, precision)
        sizes |= bundle.dim_sizes(graph, precision)
        inputs += entry["inputs"]
        renamed = ENSEMBLE_OUTPUTS[graph]
        outputs += [{**value, "name": renamed[value["name"]]} for value in entry["outputs"]]
        input_map = " ".join(
            f'input_map {{ key: "{v["name"]}" value: "{v["name"]}" }}' for v in entry["inputs"]
        )
        output_map = " ".join(
            f'output_map {{ key: "{v["name"]}" value: "{renamed[v["name"]]}" }}'
            for v in entry["outputs"]
        )
        model = f'model_name: "{PREFIX + graph}" model_version: -1'
        steps.append(f"  step {{ {model} {input_map} {output_map} }}")
    lines = [f'name: "{ENSEMBLE}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}"]
    lines += _tensors("input", _unique(inputs), sizes, True)
    lines += _tensors("output", outputs, sizes, True)
    lines += ["ensemble_scheduling {", *steps, "}"]
    return "\n".join(lines) + "\n"


def _unique(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Inputs by name, once (only the text encoder takes `lengths`, but stay safe)."""
    return list({value["name"]: value for value in values}.values())


def _dim(dim: str | int, sizes: dict[str, DimSizes]) -> int:
    if not isinstance(dim, str):
        return int(dim)
    size = sizes.get(dim)
    return size.max if size is not None and size.min == size.max else -1


def _tensors(
    kind: str, values: list[dict[str, Any]], sizes: dict[str, DimSizes], batched: bool
) -> list[str]:
    return [_tensor(kind, value, sizes, batched) for value in values]


def _tensor(kind: str, value: dict[str, Any], sizes: dict[str, DimSizes], batched: bool) -> str:
    shape = value["shape"][1:] if batched else value["shape"]
    dims = [_dim(d, sizes) for d in shape]
    reshape = ""
    if not dims:  # a per-item scalar of a batched model: Triton wants one dim, reshaped away
        dims, reshape = [1], " reshape: { shape: [ ] }"
    listed = ", ".join(str(d) for d in dims)
    return (
        f'{kind} {{ name: "{value["name"]}" data_type: {DTYPES[value["dtype"]]} '
        f"dims: [ {listed} ]{reshape} }}"
    )
