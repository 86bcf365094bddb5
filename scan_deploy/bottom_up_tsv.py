"""Region features in the bottom-up-attention TSV format, read as a stream.

The format `generate_tsv.py` of peteanderson80/bottom-up-attention writes (and the features
published for COCO and Flickr30k): one line per image, no header, six tab-separated fields

    image_id  image_w  image_h  num_boxes  boxes  features

`boxes` and `features` are base64 of float32 arrays, `num_boxes × 4` (x1, y1, x2, y2 in pixels)
and `num_boxes × F` (F = 2048 for the ResNet-101 detector). Files are tens of GB, so they are read
one line at a time (never whole) with the standard library's line reader: a TSV writer put no
tabs or newlines inside a field, and base64 has none.

Each record is checked as it is read; a bad one is a one-line UserError naming the file, the line
and the field: a wrong field count, a non-integer or non-positive size, bad base64, arrays that
disagree with `num_boxes` or with the feature size of the first record, NaN/Inf, a box outside
the image (beyond a pixel of slack: detectors clip boxes to the image) or inverted, a duplicate
id, a last line the file ends in the middle of, a box whose features are all zero (it would read
as padding). `import_tsv` writes the records as a precomp split (`scan_deploy.precomp`) plus their
ids, boxes and image sizes, all or nothing. Adaptive features (10-100 boxes per image) are padded
to the most boxes of any image with all-zero rows, which every graph masks
(`scan_deploy.scoring.region_mask`).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scan_deploy.atomic import atomic_path
from scan_deploy.errors import UserError, input_error
from scan_deploy.precomp import FEATURE_DTYPE, split_paths

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
BOX_SLACK = 1.0  # pixels a box may pass the image's edge by


@dataclass(frozen=True)
class TsvRecord:
    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (num_boxes, 4) float32: x1, y1, x2, y2
    features: np.ndarray  # (num_boxes, F) float32


def survey(path: Path) -> tuple[int, int]:
    """(lines, the most boxes of a line) of the file: the first pass, so the features file can
    be written with its final shape (every image padded to the most boxes) in one second pass.
    A line whose `num_boxes` is not a number, or disagrees with its boxes field's length,
    counts no boxes here (the second pass names it)."""
    lines, most = 0, 0
    with open(path, "rb") as handle:
        for line in handle:
            lines += 1
            fields = line.split(b"\t", 5)
            if len(fields) < 6 or not fields[3].isdigit():
                continue
            boxes = int(fields[3])
            if len(fields[4]) == 4 * math.ceil(16 * boxes / 3):  # base64 of boxes × 4 float32
                most = max(most, boxes)  # a corrupt num_boxes cannot size the padding
    return lines, most


def read_tsv(path: Path) -> Iterator[TsvRecord]:
    """The records of one TSV file, checked, in file order (ids unique within the file; the
    caller checks across files)."""
    features_dim = None
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            complete = line.endswith(b"\n")
            try:
                record = _parse(line.rstrip(b"\r\n"))
                if not complete:  # writers end every record with a newline: this one was cut
                    raise _FieldError("features", "the file ends inside this line")
            except _FieldError as exc:
                ending = "" if complete else " (the file ends inside this line: truncated?)"
                if exc.message.startswith("the file ends"):
                    ending = ", without its newline: truncated?"
                field = f"line {number}: {exc.field}"
                raise input_error(path, field, exc.message + ending) from None
            if features_dim is None:
                features_dim = record.features.shape[1]
            elif record.features.shape[1] != features_dim:
                raise input_error(
                    path,
                    f"line {number}: features",
                    f"has {record.features.shape[1]} values per box, the first line {features_dim}",
                )
            yield record


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def _parse(line: bytes) -> TsvRecord:
    fields = line.split(b"\t")
    if len(fields) != len(FIELDS):
        raise _FieldError(
            "fields", f"got {len(fields)} tab-separated fields, expected 6 ({', '.join(FIELDS)})"
        )
    image_id = fields[0].decode("utf-8", errors="replace").strip()
    if not image_id:
        raise _FieldError("image_id", "empty, expected an image id")
    width, height, num_boxes = (_positive(FIELDS[i], fields[i]) for i in (1, 2, 3))
    boxes = _floats("boxes", fields[4], num_boxes, 4)
    features = _floats("features", fields[5], num_boxes, None)
    x1, y1, x2, y2 = boxes.T
    outside = (
        (x1 < -BOX_SLACK) | (y1 < -BOX_SLACK) | (x2 > width + BOX_SLACK) | (y2 > height + BOX_SLACK)
    )
    inverted = (x2 < x1) | (y2 < y1)
    for bad, why in (
        (outside, f"lies outside the {width}×{height} image"),
        (inverted, "is inverted"),
    ):
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            shown = ", ".join(f"{v:g}" for v in boxes[k])
            raise _FieldError("boxes", f"box {k} ({shown}) {why}")
    return TsvRecord(image_id, width, height, boxes, features)


def _positive(field: str, raw: bytes) -> int:
    try:
        value = int(raw)
    except ValueError:
        shown = raw[:20].decode("utf-8", errors="replace")
        raise _FieldError(field, f"got {shown!r}, expected a positive integer") from None
    if value < 1:
        raise _FieldError(field, f"got {value}, expected a positive integer")
    return value


def _floats(field: str, raw: bytes, rows: int, columns: int | None) -> np.ndarray:
    """The base64 float32 array of a field as (rows, columns); columns None: whatever divides."""
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _FieldError(field, "not valid base64") from None
    if len(data) % 4:
        raise _FieldError(field, f"holds {len(data)} bytes, not a whole number of float32")
    values = np.frombuffer(data, dtype="<f4")
    expected = rows * columns if columns is not None else None
    if (expected is not None and values.size != expected) or values.size % rows or not values.size:
        shape = f"num_boxes {rows} × {columns}" if columns else f"num_boxes {rows} × F"
        raise _FieldError(field, f"holds {values.size} float32 values, {shape} expected")
    array = values.reshape(rows, -1)
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise _FieldError(field, f"NaN or Inf at box {row}")
    if field == "features" and not array.any(axis=1).all():
        row = int(np.flatnonzero(~array.any(axis=1))[0])
        message = f"box {row} has all-zero features (an all-zero row is how padding is stored)"
        raise _FieldError(field, message)
    return array


@dataclass(frozen=True)
class ImportSummary:
    images: int
    regions: int  # per image as stored: the most boxes of any image
    features: int
    fewest_regions: int  # the fewest boxes of an image (below `regions`: padded)
    files: list[str]


def import_tsv(
    tsv_paths: Sequence[Path],
    data_dir: Path,
    split: str,
    captions: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ImportSummary:
    """Write the records of `tsv_paths` (in order) as the precomp split `split` of `data_dir`:
    `{split}_ims.npy` (N, R, F) float32, `{split}_ids.txt`, `{split}_boxes.npy` (N, R, 4)
    float32, `{split}_image_sizes.npy` (N, 2) int64 (width, height) and, when `captions` are
    given (1 or 5 per image, in the records' order), `{split}_caps.txt`. R is the most boxes of
    any image; images of fewer have all-zero rows (features and boxes) after theirs. Every file
    appears together or none does. `progress(stage, done, total)` is told of each record
    read."""
    paths = [Path(p) for p in tsv_paths]
    surveyed = [survey(p) for p in paths]
    total, most = sum(lines for lines, _ in surveyed), max(boxes for _, boxes in surveyed)
    if total < 1:
        raise input_error(paths[0], None, "no records, expected one line per image")
    if captions is not None and len(captions) not in (total, 5 * total):
        raise UserError(
            f"captions: {len(captions)} lines for {total} images, expected 1 or 5 per image"
        )
    ims_path, caps_path = split_paths(data_dir, split)
    targets = {
        "ims": ims_path,
        "ids": data_dir / f"{split}_ids.txt",
        "boxes": data_dir / f"{split}_boxes.npy",
        "sizes": data_dir / f"{split}_image_sizes.npy",
    }
    if captions is not None:
        targets["caps"] = caps_path
    stale = [caps_path] if captions is None and caps_path.exists() else []
    with ExitStack() as stack:
        tmp = {
            name: stack.enter_context(atomic_path(path, suffix=path.suffix))
            for name, path in targets.items()
        }
        shape = _write_records(paths, tmp, (total, most), progress)
        if captions is not None:
            tmp["caps"].write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    for path in stale:  # an earlier import's captions would be paired with the new features
        path.unlink()
    return ImportSummary(*shape, [str(p) for p in targets.values()])


def _write_records(
    paths: list[Path],
    tmp: dict[str, Path],
    size: tuple[int, int],
    progress: Callable[[str, int, int], None] | None,
) -> tuple[int, int, int, int]:
    """Stream every record into the temp files, each padded to `size` = (images, most boxes);
    returns the features' shape and the fewest boxes of an image."""
    total, most = size
    seen: dict[str, tuple[Path, int]] = {}
    sizes = np.empty((total, 2), np.int64)
    done, dim, fewest = 0, None, most
    with (
        open(tmp["ims"], "wb") as ims,
        open(tmp["boxes"], "wb") as boxes,
        open(tmp["ids"], "w", encoding="utf-8") as ids,
    ):
        for path in paths:
            for line, record in enumerate(read_tsv(path), start=1):
                if dim is None:
                    dim = record.features.shape[1]
                    _npy_header(ims, FEATURE_DTYPE, (total, most, dim))
                    _npy_header(boxes, FEATURE_DTYPE, (total, most, 4))
                elif record.features.shape[1] != dim:
                    message = (
                        f"has {record.features.shape[1]} values per box, the first record {dim}"
                    )
                    raise input_error(path, f"line {line}: features", message)
                if record.image_id in seen:
                    first, first_line = seen[record.image_id]
                    raise input_error(
                        path,
                        f"line {line}: image_id",
                        f"{record.image_id!r} again (first at {first} line {first_line})",
                    )
                seen[record.image_id] = (path, line)
                count = len(record.features)
                ims.write(_padded(record.features, most).tobytes())
                boxes.write(_padded(record.boxes, most).tobytes())
                ids.write(record.image_id + "\n")
                sizes[done] = (record.width, record.height)
                done, fewest = done + 1, min(fewest, count)
                if progress is not None:
                    progress("records", 1, total)
    with open(tmp["sizes"], "wb") as handle:
        np.save(handle, sizes, allow_pickle=False)
    assert dim is not None and done == total  # the survey counted these lines
    return total, most, dim, fewest


def _padded(rows: np.ndarray, count: int) -> np.ndarray:
    """float32 (count, columns): `rows` then all-zero rows."""
    out = np.zeros((count, rows.shape[1]), FEATURE_DTYPE)
    out[: len(rows)] = rows
    return out


def _npy_header(handle, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": dtype.str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)
