"""The export bundle: `manifest.json` + the three ONNX graphs + `vocab.json` (docs/formats.md).

Reading and validating a bundle needs neither torch nor onnx (the runtime uses this module): the
manifest names every file with its sha256, the model config, the vocabulary hash, each graph's
inputs/outputs (names, dtypes, symbolic dims) and the shape ranges engines are built for.

Shape ranges: the graphs' symbolic dims (`batch`, `images`, `captions`, `regions`, `words`) take
the sizes of the manifest's `shape_ranges` (min/opt/max of batch, regions, words; `export
--max-batch/--max-words/--regions`), which engines are built for (`DIM_RANGES`, `dim_sizes`).

The word limit: a caption is at most `max_tokens` tokens (`<start>`, the words, `<end>`), the
engine's limit (`runtime.backends.base.CallSizes`: the manifest's `words.max` for ONNX Runtime,
the optimization profile for TensorRT). `Bundle.encode_captions` is how the runtime tokenizes
captions (`index`) and text queries (`query`): a caption longer than the limit keeps its first
`max_tokens - 1` tokens and its `<end>`, i.e. it is read as its first `max_tokens - 2` words,
with one logged warning saying how many captions were cut. Without the limit one long caption
would pad every caption Gram of its gallery shard to its length (quadratic in it), and would
fall outside the engine's profile.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from scan_deploy.atomic import Marker
from scan_deploy.choices import Graph, Precision
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError, input_error
from scan_deploy.jsonfile import read_json_object, typed
from scan_deploy.vocab import Vocabulary

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
MARKER = Marker(MANIFEST, ("format_version", "graphs", "opset", "shape_ranges"), "bundle")
LOG = logging.getLogger(__name__)
# The manifest's `padded_regions`: the graphs mask all-zero region rows (images of fewer regions
# than R, zero-padded: `scan_deploy.scoring.region_mask`). Bundles exported before have none.
PADDED_REGIONS = "masked"
INT8_SCORER_KINDS = ("images", "captions")  # gallery kinds (`runtime.gallery_format.KINDS`)
# The graphs' symbolic dims, by the manifest shape range they take their sizes from.
DIM_RANGES = {
    "batch": "batch",
    "images": "batch",
    "captions": "batch",
    "regions": "regions",
    "words": "words",
}


class DimSizes(NamedTuple):
    """The sizes a symbolic dim takes: calls run at `opt` where they can, never beyond `max`."""

    min: int
    opt: int
    max: int


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, actual: str, expected: Any, fix: str) -> None:
    """The one-line UserError for a file whose sha256 `actual` is not the manifest's."""
    if actual != expected:
        raise input_error(
            path,
            "sha256",
            f"is {actual[:12]}…, the manifest expects {str(expected)[:12]}… "
            f"(file changed or corrupted: {fix})",
        )


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    vocab: Vocabulary

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        return self.path / self.graph(name, precision)["file"]

    def graph(self, name: str, precision: str = "fp32") -> dict[str, Any]:
        """The manifest entry of one graph: the exported FP32 graph, or a precision variant
        written by `scan-deploy calibrate` (recorded under `variants`)."""
        if precision == "fp32":
            return self.manifest["graphs"][name]
        if precision not in self.precisions():
            raise UserError(
                f"{self.path}: the bundle has no {precision} graphs "
                f"(run: scan-deploy calibrate {self.path} --data DIR --precision {precision})"
            )
        return self.manifest["variants"][precision]["graphs"][name]

    def int8_scorer(self, kind: str) -> dict[str, Any] | None:
        """The manifest entry of the int8-gallery scorer for a gallery of `kind` (images or
        captions), written by `scan-deploy calibrate --precision int8` when it passed its gate,
        or None."""
        return self.manifest.get("int8_scorers", {}).get(kind)

    def explain_graph(self) -> dict[str, Any]:
        """The manifest entry of the explain graph (the scorer with its attention, written by
        `export`); a UserError for a bundle exported before it existed."""
        entry = self.manifest.get("explain")
        if entry is None:
            raise UserError(
                f"{self.path}: the bundle has no explain graph (exported before `explain` "
                "existed): re-export it with scan-deploy export"
            )
        return entry

    def check_regions(self, regions: int, padded: bool, source: Path | None, field: str) -> None:
        """Features of `regions` rows per image, some of them zero-padded when `padded`, fit the
        bundle: R within its `regions` shape range, padding only for graphs that mask it; else
        a one-line UserError naming `source` and `field`."""
        low, _, high = self.dim_sizes("image_encoder")["regions"]
        if not low <= regions <= high:
            span = str(low) if low == high else f"{low} to {high}"
            message = (
                f"has {regions} regions per image, the bundle takes {span} "
                "(re-export with --regions/--min-regions/--max-regions to change it)"
            )
            raise input_error(source, field, message)
        if padded and self.manifest.get("padded_regions") != PADDED_REGIONS:
            message = (
                "has images of fewer regions (zero-padded rows), which this bundle's graphs "
                "(exported before padding was masked) would score as regions: re-export it"
            )
            raise input_error(source, field, message)

    def precisions(self) -> list[str]:
        return ["fp32", *self.manifest.get("variants", {})]

    def dim_sizes(self, graph: str, precision: str = "fp32") -> dict[str, DimSizes]:
        """The manifest's sizes of every symbolic dim of a graph's inputs (`DIM_RANGES`)."""
        ranges = self.manifest["shape_ranges"]
        return {
            dim: DimSizes(*(int(ranges[DIM_RANGES[dim]][b]) for b in ("min", "opt", "max")))
            for value in self.graph(graph, precision)["inputs"]
            for dim in value["shape"]
            if isinstance(dim, str) and dim in DIM_RANGES
        }

    def encode_captions(
        self, captions: Sequence[str], max_tokens: int
    ) -> tuple[list[list[int]], int]:
        """Token ids of `captions` (`<start>` ... `<end>`), each cut to `max_tokens` (the
        engine's word limit): a longer one keeps its first `max_tokens - 1` tokens and `<end>`.
        Also how many were cut."""
        encoded = [self.vocab.encode(caption) for caption in captions]
        kept = [
            ids if len(ids) <= max_tokens else [*ids[: max_tokens - 1], ids[-1]] for ids in encoded
        ]
        return kept, sum(len(ids) > max_tokens for ids in encoded)

    @staticmethod
    def warn_cut(cut: int, total: int, what: str, max_tokens: int) -> None:
        """The one warning for the `cut` of `total` captions (or queries) `encode_captions` cut."""
        if cut:
            LOG.warning(
                "%d of %d %s longer than the engine's limit of %d tokens: each read as its "
                "first %d words",
                *(cut, total, what, max_tokens, max(max_tokens - 2, 0)),
            )


def load_bundle(path: str | Path) -> Bundle:
    """Read `manifest.json` and check every file it names against its sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    what = "the manifest of an export bundle folder"
    manifest = read_json_object(manifest_path, what, FORMAT_VERSION)
    for key in ("model", "vocab", "graphs", "shape_ranges", "opset"):
        if key not in manifest:
            raise input_error(manifest_path, key, "missing from the manifest")
    _check_shape_ranges(manifest["shape_ranges"], manifest_path)
    config = ModelConfig.from_dict(manifest["model"], source=manifest_path)
    _check_file(path, manifest["vocab"], manifest_path, "vocab")
    typed(manifest["vocab"].get("words_sha256"), str, "vocab.words_sha256", manifest_path)
    vocab = Vocabulary.load(path / manifest["vocab"]["file"])
    if len(vocab) != config.vocab_size:
        raise input_error(
            manifest_path, "vocab", f"has {len(vocab)} words, the model expects {config.vocab_size}"
        )
    typed(manifest["graphs"], dict, "graphs", manifest_path)
    for name in Graph:
        if name not in manifest["graphs"]:
            raise input_error(manifest_path, f"graphs.{name}", "missing from the manifest")
        _check_file(path, manifest["graphs"][name], manifest_path, f"graphs.{name}")
    variants = typed(manifest.get("variants", {}), dict, "variants", manifest_path)
    for precision, variant in variants.items():
        Precision.parse(
            precision,
            f"variants.{precision}",
            manifest_path,
            among=(Precision.FP16, Precision.INT8),
        )
        typed(variant, dict, f"variants.{precision}", manifest_path)
        graphs = typed(
            variant.get("graphs", {}), dict, f"variants.{precision}.graphs", manifest_path
        )
        for name in Graph:
            field = f"variants.{precision}.graphs.{name}"
            if name not in graphs:
                raise input_error(manifest_path, field, "missing from the manifest")
            _check_file(path, variant["graphs"][name], manifest_path, field)
    if "explain" in manifest:
        _check_file(path, manifest["explain"], manifest_path, "explain")
    scorers = typed(manifest.get("int8_scorers", {}), dict, "int8_scorers", manifest_path)
    for kind, entry in scorers.items():
        if kind not in INT8_SCORER_KINDS:
            message = f"has {kind!r}, expected {' or '.join(INT8_SCORER_KINDS)}"
            raise input_error(manifest_path, "int8_scorers", message)
        _check_file(path, entry, manifest_path, f"int8_scorers.{kind}")
    return Bundle(path, manifest, config, vocab)


def _check_shape_ranges(ranges: Any, manifest_path: Path) -> None:
    """Each dim's min/opt/max are integers with 1 <= min <= opt <= max, and `words.max` leaves
    room for a word between `<start>` and `<end>`."""
    typed(ranges, dict, "shape_ranges", manifest_path)
    for dim in dict.fromkeys([*DIM_RANGES.values(), *ranges]):  # batch, regions, words, others
        field = f"shape_ranges.{dim}"
        bounds = typed(ranges.get(dim), dict, field, manifest_path)
        low, opt, high = (
            typed(bounds.get(b), int, f"{field}.{b}", manifest_path) for b in DimSizes._fields
        )
        if not 1 <= low <= opt <= high:
            message = f"got min {low}, opt {opt}, max {high}, expected 1 <= min <= opt <= max"
            raise input_error(manifest_path, field, message)
    if ranges["words"]["max"] < 3:
        message = f"got {ranges['words']['max']}, expected at least 3 (<start>, a word and <end>)"
        raise input_error(manifest_path, "shape_ranges.words.max", message)


def _check_file(root: Path, entry: Any, manifest_path: Path, field: str) -> None:
    typed(entry, dict, field, manifest_path)
    file_path = root / typed(entry.get("file"), str, f"{field}.file", manifest_path)
    expected = typed(entry.get("sha256"), str, f"{field}.sha256", manifest_path)
    if not file_path.is_file():
        raise input_error(file_path, None, f"missing (named by {manifest_path.name} {field})")
    check_sha256(file_path, sha256_file(file_path), expected, "re-export the bundle")
