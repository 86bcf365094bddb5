"""The gallery: the scorer's precomputed per-item tensors, sharded `.npy` files, memory-mapped.

`scan-deploy index` encodes every image (or caption) once and writes a gallery with
`GalleryWriter`; `scan-deploy query` opens it with `open_gallery`, shortlists with the pooled
global embeddings and re-ranks the shortlist with the exact scorer, reading only the rows it needs.

On-disk layout (one folder, written to a hidden temp folder beside it and renamed on success)::

    GALLERY/
      manifest.json   format_version, kind, dtype, count, shard_size, quantization,
                      bundle identity (path, sha256 of the three FP32 graphs, the vocabulary's
                      words_sha256, embed_size, cross_attn), ids/texts files with sha256,
                      shards: [{count, offset, files: {array: {file, sha256, shape, dtype}}}],
                      first_stages: {stage: {file, sha256, bytes, factory, type,
                      vectors, dim, trained_on, search_params, build_seconds}} for the
                      stages indexed (`index --first-stage`; format 1 had faiss_index)
      ids.json        JSON list of the item ids (strings, unique), in gallery order
      texts.json      JSON list of the item texts (only when texts were given)
      global.faiss    with `first_stages={"global": FACTORY}`: a FAISS inner-product index of
                      every item's `global`, in gallery order
      maxsim.faiss    with `first_stages={"maxsim": FACTORY}`: one of every token (each
                      image's regions, each caption's valid words), in gallery order
                      (`runtime/first_stage.py` builds them, `inner_product.py` reads them)
      shard-00000/
        regions.npy   one .npy file per stored array; the first axis is the shard's items

Arrays per kind (n = items in the shard, D = embed_size, R = regions, T = the shard's longest
caption; every caption of a shard is zero-padded to T, so T varies from shard to shard):

    kind "images"   regions (n, R, D)   region_gram (n, R, R)   global (n, D)
    kind "captions" words (n, T, D)     caption_gram (n, T, T)  global (n, D)   lengths (n,) int64

Words and Gram entries beyond a caption's length are stored as zeros. Storage dtype (`dtype`):
`regions`, `words` and the Grams are stored as float32 (`fp32`), float16 (`fp16`) or int8
(`int8`: symmetric per-row quantization, `x ≈ q * scale[..., None]` with `q` in [-127, 127]
stored as the uint8 code `q + 128` — the operand ONNX Runtime's u8s8 integer GEMM reads without
a conversion pass (`runtime/dequantize.py`; formats 1 and 2 stored `q` as int8) — and
`scale = max|row| / 127` stored as float32 in `{name}_scale.npy` of shape (n, R) or (n, T);
an all-zero row has scale 0). `global` stays float32 in every dtype, so the shortlist is as exact
as the encoders (it costs D floats per item, ~1/R of the regions); `lengths` is int64.

Worst-case round-trip error per element (tests/runtime/test_gallery.py measures it): fp32 exact;
fp16 ≤ 2⁻¹¹ ≈ 4.9e-4 of |x| (normal range; larger values than 65504 are refused);
int8 ≤ max|row| / 254 (half a quantization step).

Reading memory-maps every file (`precomp.open_npy`); `Shard.block`/`Gallery.rows` copy and
dequantize (`runtime/dequantize.py`) only the requested rows. `open_gallery` checks the manifest
against the files (every file present, the .npy header's shape and dtype as recorded, the file
size the header implies, and with `verify=True` each file's sha256) and fails with a one-line
UserError naming the file.

numpy and the standard library (onnxruntime, when installed, speeds up dequantization; faiss
only for `first_stages`): the runtime imports this module on devices without torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.runtime.dequantize import to_float32
from scan_deploy.runtime.first_stage import INDEX_FILES, extend_stage_index, write_stage_index
from scan_deploy.runtime.inner_product import apply_search_params, open_faiss_index, require_faiss

from scan_deploy.atomic import Marker, atomic_dir, check_output_dir, write_json
from scan_deploy.bundle import Bundle, check_sha256, sha256_file
from scan_deploy.choices import FirstStage, GalleryDtype, Graph
from scan_deploy.errors import input_error, one_of
from scan_deploy.int8_rows import INT8_ZERO_POINT, quantize_int8
from scan_deploy.jsonfile import read_json_object, typed
from scan_deploy.precomp import image_file, open_npy, read_npy_header

FORMAT_VERSION = 3
# 1: one optional float16 index of the globals (`faiss_index`); 1 and 2: int8 values as int8
READABLE_VERSIONS = (1, 2, 3)
_V1_INDEX = "shortlist.faiss"
KINDS = ("images", "captions")
MANIFEST = "manifest.json"
MARKER = Marker(MANIFEST, ("format_version", "kind", "shards", "bundle"), "gallery")
IDS = "ids.json"
BOX_FILES = {"boxes": "boxes.npy", "image_sizes": "image_sizes.npy"}  # optional, images only
TEXTS = "texts.json"
DELETED = "deleted.json"  # the ids of deleted items (tombstones), when there are any
SCALE_SUFFIX = "_scale"
QUANTIZATION = "symmetric-per-row"

# The axes of one item of each array (after the leading item axis).
ITEM_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "images": {"regions": ("R", "D"), "region_gram": ("R", "R"), "global": ("D",)},
    "captions": {
        "words": ("T", "D"),
        "lengths": (),
        "caption_gram": ("T", "T"),
        "global": ("D",),
    },
}
GRAMS = {"images": "region_gram", "captions": "caption_gram"}
EMBEDDINGS = {"images": "regions", "captions": "words"}
# Arrays stored in the gallery dtype; `global` is always float32 and `lengths` int64.
QUANTIZED = ("regions", "region_gram", "words", "caption_gram")
_STORAGE = {
    GalleryDtype.FP32: np.dtype(np.float32),
    GalleryDtype.FP16: np.dtype(np.float16),
    GalleryDtype.INT8: np.dtype(np.uint8),  # codes q + 128
}
_FIXED = {"global": np.dtype(np.float32), "lengths": np.dtype(np.int64)}
_FP16_MAX = float(np.finfo(np.float16).max)
_FIX = "re-run scan-deploy index"


class _Aborted(Exception):
    """Thrown into the temp-folder context to discard a gallery that will not be finished."""


def stored_arrays(
    kind: str, dtype: GalleryDtype, version: int = FORMAT_VERSION
) -> dict[str, np.dtype]:
    """The files of one shard of a `kind`/`dtype` gallery of format `version`: stored array
    name → numpy dtype."""
    stored = {}
    for name in ITEM_AXES[kind]:
        if name in QUANTIZED:
            old_int8 = dtype == GalleryDtype.INT8 and version < 3
            stored[name] = np.dtype(np.int8) if old_int8 else _STORAGE[dtype]
            if dtype == GalleryDtype.INT8:
                stored[name + SCALE_SUFFIX] = np.dtype(np.float32)
        else:
            stored[name] = _FIXED[name]
    return stored


# ----------------------------------------------------------------------------------------------
# Writing


class GalleryWriter:
    """Write a gallery batch by batch; nothing appears at `path` until `close()` succeeds.

    Batches are converted to the storage dtype as they arrive and buffered until a shard of
    `shard_size` items is complete, so memory holds at most one shard (stored form) plus a batch
    (and, with `first_stages`, each FAISS index while `close()` builds it, with its training
    sample).
    An error inside `add` or `close`, or leaving a `with` block by an exception, discards the
    temp folder; leaving the `with` block normally closes the writer.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        bundle: Bundle | None,
        dtype: GalleryDtype | str = GalleryDtype.FP16,
        shard_size: int = 4096,
        force: bool = False,
        first_stages: dict[FirstStage | str, str | None] | None = None,
        where: Path | None = None,
        boxes: tuple[np.ndarray, np.ndarray] | None = None,
        images_dir: Path | None = None,
        base: Gallery | None = None,
        delete: Sequence[str] = (),
    ) -> None:
        """`first_stages`: the FAISS index to build for each first stage, by index-factory
        string (None: `first_stage.default_factory`). `where`: the path errors name (default
        `path`; the indexer writes into a temporary folder renamed later). `boxes`: an images
        gallery's region boxes (items, R, 4) and image sizes (items, 2), in the order the items
        will be added (`precomp.image_boxes`), kept for `explain`. `images_dir`: the folder of
        the items' image files, named by id (recorded as an absolute path; hits name their
        file). `base`: a gallery this one extends (`runtime.generations`: its shards are hard
        links, its dtype, shard size, image folder and first stages are kept, the items added
        follow its own, and its first-stage indexes are extended with theirs). `delete`: ids of
        the base's items to mark deleted (tombstones: searches skip them)."""
        self.path = Path(path)
        self.where = Path(where) if where is not None else self.path
        one_of(kind, KINDS, "kind")
        stages = {FirstStage.parse(k, "first_stages"): v for k, v in (first_stages or {}).items()}
        if stages:
            require_faiss()
        dtype = GalleryDtype.parse(dtype, "dtype")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise input_error(None, "shard_size", f"got {shard_size!r}, expected an integer ≥ 1")
        check_output_dir(self.path, force, MARKER)
        if base is not None:
            if base.kind != kind:
                raise RuntimeError(f"{base.path}: a gallery of {base.kind}, not {kind}")
            dtype, shard_size = base.dtype, int(base.manifest["shard_size"])
            stages = {stage: record["factory"] for stage, record in base.first_stages.items()}
            folder = base.manifest.get("images_dir")
            images_dir = None if folder is None else Path(folder)
        self.base = base
        self.kind = kind
        self.dtype = dtype
        self.shard_size = shard_size
        self.first_stages = stages
        self.boxes = boxes
        self.images_dir = None if images_dir is None else str(Path(images_dir).resolve())
        if bundle is None and base is None:
            raise RuntimeError("a gallery writer needs a bundle or a base gallery")
        self.embed_size = int(bundle.config.embed_size) if base is None else base.embed_size
        self.bundle_identity = bundle_identity(bundle) if base is None else base.manifest["bundle"]
        self.manifest: dict[str, Any] | None = None
        self._count = 0
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._texts: list[str] | None = None
        self._regions: int | None = None  # R, fixed by the first images batch
        self._pending: list[dict[str, np.ndarray]] = []  # stored-form batches not yet in a shard
        self._pending_count = 0
        self._shards: list[dict[str, Any]] = []
        self._state = "open"
        self._context = atomic_dir(self.path)
        self._tmp = self._context.__enter__()
        self._deleted: list[str] = []
        if base is not None:
            self._start_from(base, delete)

    def _start_from(self, base: Gallery, delete: Sequence[str]) -> None:
        """The base's items first: its shard files hard-linked (immutable, so shared), its ids,
        texts, boxes and tombstones, then `delete` marked."""
        for shard in base.manifest["shards"]:
            for record in shard["files"].values():
                target = self._tmp / record["file"]
                target.parent.mkdir(exist_ok=True)
                try:
                    os.link(base.path / record["file"], target)
                except OSError:  # another file system: a copy
                    shutil.copyfile(base.path / record["file"], target)
        self._shards = json.loads(json.dumps(base.manifest["shards"]))
        self._ids, self._seen, self._count = list(base.ids), set(base.ids), base.count
        self._texts = None if base.texts is None else list(base.texts)
        if base.kind == "images":
            self._regions = base.shards[0].shape("regions")[1]
        if "boxes" in base.manifest:
            old = tuple(open_npy(base.path / BOX_FILES[key]) for key in BOX_FILES)
            new = self.boxes or tuple(np.zeros((0, *a.shape[1:]), a.dtype) for a in old)
            self.boxes = tuple(np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
        else:
            self.boxes = None
        self._deleted = [base.ids[i] for i in base.deleted]
        gone = set(self._deleted)
        for item in delete:
            if item not in self._seen or item in gone:
                state = "already deleted" if item in gone else "not in the gallery"
                raise input_error(self.where, "delete", f"id {item!r}: {state}")
            gone.add(item)
            self._deleted.append(item)

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    @property
    def count(self) -> int:
        """Items added so far."""
        return self._count

    def add(
        self, arrays: dict[str, np.ndarray], ids: list[str], texts: list[str] | None = None
    ) -> None:
        """Add a batch: `arrays` keyed as in ITEM_AXES[kind] (float32; `lengths` integer; the Gram
        is computed from the embeddings when left out), one id per item, optionally one text."""
        self._require_open()
        try:
            batch = self._validate(arrays, ids, texts)
            if not ids:
                return
            self._pending.append(self._to_storage(batch))
            self._pending_count += len(ids)
            self._ids.extend(ids)
            self._seen.update(ids)
            if texts is not None:
                self._texts = self._texts if self._texts is not None else []
                self._texts.extend(texts)
            self._count += len(ids)
            while self._pending_count >= self.shard_size:
                self._write_shard(self.shard_size)
        except BaseException:
            self.abort()
            raise

    def _write_boxes(self) -> dict[str, Any]:
        """`boxes.npy` and `image_sizes.npy` and their manifest records, when given."""
        if self.boxes is None:
            return {}
        records = {}
        for key, array in zip(BOX_FILES, self.boxes, strict=True):
            if len(array) != self._count:
                message = f"has {len(array)} rows for the {self._count} items added"
                raise input_error(self.where, key, message)
            file = self._tmp / BOX_FILES[key]
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
            records[key] = {
                "file": file.name,
                "sha256": sha256_file(file),
                "shape": list(array.shape),
            }
        return records

    def close(self) -> dict[str, Any]:
        """Write the last shard, the ids/texts and manifest.json, and rename the folder into place;
        returns the manifest."""
        self._require_open()
        try:
            if self._count == 0:
                raise input_error(self.path, "count", "no items were added, expected at least one")
            if self._pending_count:
                self._write_shard(self._pending_count)
            manifest = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "dtype": self.dtype,
                "count": self._count,
                "shard_size": self.shard_size,
                "quantization": QUANTIZATION if self.dtype == GalleryDtype.INT8 else None,
                "bundle": self.bundle_identity,
                "ids": _write_list(self._tmp, IDS, self._ids),
                "texts": None
                if self._texts is None
                else _write_list(self._tmp, TEXTS, self._texts),
                "shards": self._shards,
                "first_stages": {},
                **(
                    {"deleted": _write_list(self._tmp, DELETED, self._deleted)}
                    if self._deleted
                    else {}
                ),
                **self._write_boxes(),
                **({"images_dir": self.images_dir} if self.images_dir else {}),
            }
            write_json(self._tmp / MANIFEST, manifest)
            if self.first_stages:
                manifest["first_stages"] = self._write_first_stages()
                write_json(self._tmp / MANIFEST, manifest)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._context.__exit__(None, None, None)  # rename into place (cleans up if that fails)
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._pending = []
        aborted = _Aborted()
        self._context.__exit__(_Aborted, aborted, None)

    # -- internals --

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.path}: the gallery writer is {self._state}")

    def _validate(
        self, arrays: dict[str, np.ndarray], ids: list[str], texts: list[str] | None
    ) -> dict[str, np.ndarray]:
        where = self.path
        if not isinstance(ids, list | tuple) or not all(isinstance(i, str) and i for i in ids):
            raise input_error(where, "ids", "expected a list of non-empty strings")
        n = len(ids)
        fresh: set[str] = set()
        for item_id in ids:
            if item_id in self._seen or item_id in fresh:
                raise input_error(where, "ids", f"duplicate id {item_id!r}, expected unique ids")
            fresh.add(item_id)
        if texts is not None:
            if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
                raise input_error(where, "texts", "expected a list of strings or None")
            if len(texts) != n:
                raise input_error(where, "texts", f"got {len(texts)} texts for {n} ids")
        if self._count and (texts is None) != (self._texts is None):
            state = "had texts" if self._texts is not None else "had no texts"
            raise input_error(where, "texts", f"earlier batches {state}, expected the same")
        if not isinstance(arrays, dict):
            raise input_error(where, "arrays", "expected a dict of arrays")
        axes = ITEM_AXES[self.kind]
        gram = GRAMS[self.kind]
        unknown = sorted(set(arrays) - set(axes))
        missing = [name for name in axes if name not in arrays and name != gram]
        if unknown or missing:
            bad = unknown[0] if unknown else missing[0]
            problem = "unknown" if unknown else "missing"
            raise input_error(
                where,
                f"arrays.{bad}",
                f"{problem} array, a gallery of {self.kind} expects {', '.join(axes)} "
                f"({gram} is computed when left out)",
            )
        batch = {name: np.asarray(value) for name, value in arrays.items()}
        sizes = {"D": self.embed_size}
        if self.kind == "images":
            regions = batch["regions"]
            if regions.ndim == 3:
                sizes["R"] = self._regions if self._regions is not None else regions.shape[1]
        else:
            words = batch["words"]
            if words.ndim == 3:
                sizes["T"] = words.shape[1]
        for name, value in batch.items():
            expected = (n, *(sizes.get(a, a) for a in axes[name]))
            ok = value.ndim == len(expected) and all(
                isinstance(e, str) or e == s for e, s in zip(expected, value.shape, strict=True)
            )
            if not ok:
                shown = ", ".join(
                    f"{a}={e}" if isinstance(e, int) else str(e)
                    for a, e in zip(("n", *axes[name]), expected, strict=True)
                )
                raise input_error(
                    where, f"arrays.{name}", f"got shape {value.shape}, expected ({shown})"
                )
            if name == "lengths":
                if not np.issubdtype(value.dtype, np.integer):
                    raise input_error(
                        where, "arrays.lengths", f"got dtype {value.dtype}, expected integers"
                    )
            elif not np.issubdtype(value.dtype, np.floating):
                raise input_error(
                    where, f"arrays.{name}", f"got dtype {value.dtype}, expected float32"
                )
        if self.kind == "images" and n and sizes["R"] < 1:
            raise input_error(where, "arrays.regions", "expected at least one region")
        if self.kind == "captions" and n:
            lengths = batch["lengths"].astype(np.int64)
            bad = np.flatnonzero((lengths < 1) | (lengths > sizes["T"]))
            if bad.size:
                j = int(bad[0])
                raise input_error(
                    where,
                    "arrays.lengths",
                    f"item {j} (id {ids[j]!r}) has length {int(lengths[j])}, "
                    f"expected 1..{sizes['T']} (the words' padded length)",
                )
        out = {}
        for name, value in batch.items():
            out[name] = value.astype(np.int64 if name == "lengths" else np.float32, copy=False)
        if self.kind == "captions" and n:
            out = _mask_captions(out)
        for name, value in out.items():
            if name == "lengths" or not n:
                continue
            finite = np.isfinite(value.reshape(n, -1)).all(axis=1)
            if not finite.all():
                j = int(np.argmin(finite))
                raise input_error(
                    where, f"arrays.{name}", f"item {j} (id {ids[j]!r}) has NaN or Inf values"
                )
        if self.kind == "images" and n:
            self._regions = sizes["R"]
        return out

    def _to_storage(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeddings = batch[EMBEDDINGS[self.kind]]
        gram = GRAMS[self.kind]
        if gram not in batch:
            batch[gram] = np.matmul(embeddings, np.swapaxes(embeddings, 1, 2))
        stored = {}
        for name, value in batch.items():
            if name not in QUANTIZED or self.dtype == GalleryDtype.FP32:
                stored[name] = value
            elif self.dtype == GalleryDtype.FP16:
                peak = float(np.abs(value).max()) if value.size else 0.0
                if peak > _FP16_MAX:
                    raise input_error(
                        self.path,
                        f"arrays.{name}",
                        f"has values up to {peak:.4g}, beyond the float16 range "
                        f"(±{_FP16_MAX:.0f}); expected dtype fp32 or int8",
                    )
                stored[name] = value.astype(np.float16)
            else:
                stored[name], stored[name + SCALE_SUFFIX] = quantize_int8(value)
        return stored

    def _write_first_stages(self) -> dict[str, Any]:
        """Each first stage's index, built from the finished shards (read back as a gallery),
        or, on a base, the base's index extended with the items added (its training kept)."""
        written = open_gallery(self._tmp, verify=False)
        records = {}
        for stage, factory in self.first_stages.items():
            if self.base is None:
                record = write_stage_index(written, stage, factory, self.where)
            else:
                record = extend_stage_index(self.base, written, stage)
            records[str(stage)] = {**record, "sha256": sha256_file(self._tmp / record["file"])}
        return records

    def _write_shard(self, size: int) -> None:
        """Write the first `size` pending items as the next shard."""
        parts: list[dict[str, np.ndarray]] = []
        taken = 0
        while taken < size:
            part = self._pending[0]
            n = len(next(iter(part.values())))
            need = size - taken
            if n <= need:
                parts.append(self._pending.pop(0))
                taken += n
            else:
                parts.append({k: v[:need] for k, v in part.items()})
                self._pending[0] = {k: v[need:] for k, v in part.items()}
                taken += need
        self._pending_count -= size
        if self.kind == "captions":
            longest = max(int(p["lengths"].max()) for p in parts)
            parts = [_fit_captions(p, longest) for p in parts]
        index = len(self._shards)
        folder = f"shard-{index:05d}"
        (self._tmp / folder).mkdir()
        files = {}
        for name, expected in stored_arrays(self.kind, self.dtype).items():
            array = np.concatenate([p[name] for p in parts])
            if array.dtype != expected:  # an internal invariant, not a user error
                raise RuntimeError(f"{name}: stored {array.dtype}, expected {expected}")
            rel = f"{folder}/{name}.npy"
            np.save(self._tmp / rel, np.ascontiguousarray(array), allow_pickle=False)
            files[name] = {
                "file": rel,
                "sha256": sha256_file(self._tmp / rel),
                "shape": list(array.shape),
                "dtype": array.dtype.name,
            }
        offset = sum(s["count"] for s in self._shards)
        self._shards.append({"count": size, "offset": offset, "files": files})


def bundle_identity(bundle: Bundle) -> dict[str, Any]:
    """What a gallery records about the bundle it was encoded with."""
    return {
        "path": str(Path(bundle.path).absolute()),
        "graphs": {name: bundle.manifest["graphs"][name]["sha256"] for name in Graph},
        "vocab": {"words_sha256": bundle.manifest["vocab"]["words_sha256"]},
        "embed_size": int(bundle.config.embed_size),
        "cross_attn": bundle.config.cross_attn,
    }


def _mask_captions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero the words (and Gram rows/columns) beyond each caption's length."""
    lengths = batch["lengths"]
    t = batch["words"].shape[1]
    valid = np.arange(t)[None, :] < lengths[:, None]  # (n, T)
    out = dict(batch)
    out["words"] = np.where(valid[:, :, None], batch["words"], np.float32(0))
    if "caption_gram" in batch:
        both = valid[:, :, None] & valid[:, None, :]
        out["caption_gram"] = np.where(both, batch["caption_gram"], np.float32(0))
    return out


MAPS_KEPT = 256


@functools.lru_cache(maxsize=MAPS_KEPT)
def _mapped(path: str, inode: int, mtime_ns: int, size: int) -> np.ndarray:
    """The memory map of a shard file, kept across calls: a new map per block faulted the
    file's pages in again on every query (32 of the int8 scorer's 152 ms per query over 10K
    images, benchmarks/bench_int8_scorer.py). At most MAPS_KEPT are kept, since each holds a
    file descriptor (about 1M images in shards of 4096 would pass a 1024 descriptor limit);
    keyed by the file's identity, so a gallery written again at the same path is mapped
    afresh."""
    return open_npy(Path(path), f": {_FIX}")


def _fit_captions(part: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """Crop or pad with zeros (as stored: `stored_zero`) the word axes of a stored captions
    batch to `t` words."""
    word_axes = {"words": (1,), "caption_gram": (1, 2)}
    out = {}
    for name, value in part.items():
        base = name.removesuffix(SCALE_SUFFIX)
        axes = word_axes.get(base, ())[:1] if name != base else word_axes.get(base, ())
        for axis in axes:
            value = _fit_axis(value, axis, t)
        out[name] = value
    return out


def _fit_axis(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    have = value.shape[axis]
    if have >= size:
        return value[(slice(None),) * axis + (slice(0, size),)]
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, size - have)
    return np.pad(value, pad, constant_values=stored_zero(value.dtype))


def stored_zero(dtype: np.dtype) -> int:
    """What a stored 0 is: the code 128 in uint8 (int8 values as codes), else 0."""
    return INT8_ZERO_POINT if dtype == np.uint8 else 0


def _write_list(folder: Path, name: str, items: list[str]) -> dict[str, Any]:
    (folder / name).write_text(json.dumps(items, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"file": name, "sha256": sha256_file(folder / name), "count": len(items)}


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Shard:
    """One shard: `count` items starting at global item `offset`; its arrays stay on disk."""

    index: int
    count: int
    offset: int = 0
    root: Path = field(default=Path("."), repr=False)
    files: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    dtype: GalleryDtype = GalleryDtype.FP32
    headers: dict[str, tuple] = field(default_factory=dict, repr=False, compare=False)

    def path(self, name: str) -> Path:
        return self.root / self._entry(name)["file"]

    def shape(self, name: str) -> tuple[int, ...]:
        """The recorded shape of a stored array (e.g. `words` → (count, T, D))."""
        return tuple(self._entry(name)["shape"])

    def stored_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._entry(name)["dtype"])

    def load(self, name: str) -> np.ndarray:
        """The raw stored array (uint8 codes / float16 / float32 / int64), memory-mapped
        read-only; the last MAPS_KEPT maps are kept (`_mapped`)."""
        path = self.path(name)
        try:
            stat = path.stat()
        except OSError:
            return open_npy(path, f": {_FIX}")  # its one-line error
        return _mapped(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (local to the shard) as a new float32 array, dequantized; `lengths`
        as int64. Only those rows are read."""
        self._check_rows(start, stop)
        return self._read(name, slice(start, stop))

    def stored_block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (local to the shard) as stored, a read-only view of the memory map:
        the int8 scorer reads an int8 gallery's codes without a copy."""
        self._check_rows(start, stop)
        return self.load(name)[start:stop]

    def _check_rows(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.count:
            raise IndexError(
                f"rows {start}:{stop} out of range for shard {self.index} of {self.count} items"
            )

    def take_stored(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows at local `indices` (any order) as stored (uint8 / float16 / float32 / int64), by
        positioned reads: a re-rank's scattered rows, dequantized by the caller in one pass."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"row indices out of range for shard {self.index} of {self.count}")
        return self._pread(name, indices)

    def _read(self, name: str, rows: slice) -> np.ndarray:
        raw = self.load(name)[rows]
        if name == "lengths":
            return np.array(raw, dtype=np.int64)
        scale_name = name + SCALE_SUFFIX
        scale = self.load(scale_name)[rows] if scale_name in self.files else None
        return to_float32(raw, scale)

    def _pread(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Scattered rows by positioned reads, runs of consecutive rows in one call. A re-rank
        touches ~100 shards per block: `np.load` per array and shard (header parsing, path
        resolution, a new memory map) was 75% of `Gallery.rows`; the header is read once."""
        _, shape, dtype = self._layout(name)
        out = np.empty((len(rows), *shape[1:]), dtype)
        flat = out.reshape(len(rows), math.prod(shape[1:])).view(np.uint8)
        descriptor = os.open(self.path(name), os.O_RDONLY)
        try:
            for first, stop, offset, size in self._runs(name, rows):
                if os.preadv(descriptor, [flat[first:stop]], offset) != size:
                    raise input_error(self.path(name), None, "truncated (re-run scan-deploy index)")
        finally:
            os.close(descriptor)
        return out

    def prefetch(self, name: str, rows: np.ndarray) -> None:
        """Tell the kernel the sorted local `rows` of `name` will be read (WILLNEED), so that the
        reads of a gallery larger than the page cache are queued together rather than one by
        one (no-op where posix_fadvise is missing)."""
        if not hasattr(os, "posix_fadvise"):
            return
        descriptor = os.open(self.path(name), os.O_RDONLY)
        try:
            for _, _, offset, size in self._runs(name, rows):
                os.posix_fadvise(descriptor, offset, size, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)

    def _runs(self, name: str, rows: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """(first, stop, file offset, bytes) of each run of consecutive rows in sorted `rows`."""
        header, shape, dtype = self._layout(name)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        starts = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
        for first, stop in zip(starts[:-1], starts[1:], strict=True):
            if first == stop:
                return
            yield first, stop, header + int(rows[first]) * row_bytes, (stop - first) * row_bytes

    def _layout(self, name: str) -> tuple[int, tuple[int, ...], np.dtype]:
        """(data offset, shape, dtype) of a C-ordered .npy file, read once per shard and array."""
        if name not in self.headers:
            header = read_npy_header(self.path(name), f": {_FIX}")
            if header.fortran_order:
                raise input_error(self.path(name), None, "Fortran-ordered .npy: not ours")
            self.headers[name] = (header.offset, header.shape, header.dtype)
        return self.headers[name]

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self.files:
            raise KeyError(
                f"shard {self.index} has no array {name!r} (has {', '.join(self.files)})"
            )
        return self.files[name]


@dataclass(eq=False)
class Gallery:
    """An opened, validated gallery."""

    path: Path
    kind: str
    dtype: GalleryDtype
    count: int
    manifest: dict[str, Any]
    shards: list[Shard]
    ids: list[str]
    texts: list[str] | None
    first_stages: dict[FirstStage, dict[str, Any]] = field(default_factory=dict)
    deleted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted indices
    _indexes: dict[FirstStage, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def embed_size(self) -> int:
        return int(self.manifest["bundle"]["embed_size"])

    def restricted(self, first: int, stop: int) -> Gallery:
        """The same gallery seen through its shards first:stop only (a Ray shard actor's part:
        `runtime.ray_shards`); ids, texts and indices stay the whole gallery's."""
        return Gallery(
            self.path, self.kind, self.dtype, self.count, self.manifest,
            self.shards[first:stop], self.ids, self.texts, deleted=self.deleted,
        )  # fmt: skip

    def live_in_shards(self) -> int:
        """Items of its shards that are not deleted."""
        items = sum(shard.count for shard in self.shards)
        if not len(self.deleted):
            return items
        return items - sum(
            int(self.deleted_mask[s.offset : s.offset + s.count].sum()) for s in self.shards
        )

    @property
    def live_count(self) -> int:
        """Items not deleted: what a search can return."""
        return self.count - len(self.deleted)

    @functools.cached_property
    def deleted_mask(self) -> np.ndarray:
        """(count,) bool: True at deleted items."""
        mask = np.zeros(self.count, bool)
        mask[self.deleted] = True
        return mask

    def image_file(self, image_id: str) -> str | None:
        """The image file of an image id in the folder `index` recorded (`images_dir`), when
        the file is there."""
        folder = self.manifest.get("images_dir")
        found = image_file(Path(folder), image_id) if isinstance(folder, str) else None
        return None if found is None else str(found)

    def boxes_of(self, index: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """An image item's region boxes (R, 4) and its image size (W, H), when the gallery was
        indexed from a split that has them; else None."""
        if "boxes" not in self.manifest:
            return None
        boxes, sizes = (open_npy(self.path / BOX_FILES[key]) for key in BOX_FILES)
        width, height = (int(v) for v in sizes[index])
        return np.array(boxes[index], np.float32), (width, height)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of array data in the shards (what reading every item would read); summed once,
        since every re-rank asks `larger_than_memory`."""
        return sum(
            math.prod(record["shape"]) * np.dtype(record["dtype"]).itemsize
            for shard in self.shards
            for record in shard.files.values()
        )

    def larger_than_memory(self) -> bool:
        """Whether the arrays exceed the machine's physical memory, so that the page cache
        cannot hold them (False where the OS does not say)."""
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return False
        return self.nbytes > memory

    @property
    def offsets(self) -> np.ndarray:
        return np.array([s.offset for s in self.shards], dtype=np.int64)

    def check_bundle(self, bundle: Bundle) -> None:
        """Refuse (one-line UserError) a bundle other than the one the gallery was encoded with."""
        where = self.path / MANIFEST
        recorded = self.manifest["bundle"]
        actual = bundle_identity(bundle)
        if recorded["embed_size"] != actual["embed_size"]:
            raise input_error(
                where,
                "bundle.embed_size",
                f"gallery built with another bundle (embed_size {recorded['embed_size']}, the "
                f"bundle at {bundle.path} has {actual['embed_size']}): {_FIX}",
            )
        for name in Graph:
            mine, theirs = recorded["graphs"].get(name), actual["graphs"][name]
            if mine != theirs:
                raise input_error(
                    where,
                    f"bundle.graphs.{name}",
                    f"gallery built with another bundle ({name} sha256 {str(mine)[:12]}…, the "
                    f"bundle at {bundle.path} has {theirs[:12]}…): {_FIX}",
                )
        mine = recorded["vocab"].get("words_sha256")
        theirs = actual["vocab"]["words_sha256"]
        if mine != theirs:
            raise input_error(
                where,
                "bundle.vocab.words_sha256",
                f"gallery built with another bundle (vocabulary {str(mine)[:12]}…, the bundle at "
                f"{bundle.path} has {theirs[:12]}…): {_FIX}",
            )

    def stage_index(self, stage: FirstStage, search_params: str | None = None) -> Any:
        """The FAISS index of a first stage (`first_stages[stage]`), opened once, with its
        recorded search parameters; `search_params` (e.g. "nprobe=64") replaces them. None
        when the gallery was indexed without that stage."""
        record = self.first_stages.get(stage)
        if record is None:
            return None
        with self._lock:
            if stage not in self._indexes:
                index = open_faiss_index(self.path / record["file"], record)
                apply_search_params(index, record["search_params"], self.path / MANIFEST)
                self._indexes[stage] = index
            if search_params is not None:
                apply_search_params(self._indexes[stage], search_params, self.path / MANIFEST)
        return self._indexes[stage]

    @functools.cached_property
    def token_starts(self) -> np.ndarray:
        """(count + 1,) int64: the position of each item's first token in the gallery's token
        order (the `maxsim` index's ids): R per image, each caption's length."""
        if self.kind == "images":
            regions = self.shards[0].shape("regions")[1]
            return np.arange(self.count + 1, dtype=np.int64) * regions
        lengths = np.concatenate([shard.load("lengths") for shard in self.shards])
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    @property
    def token_count(self) -> int:
        return int(self.token_starts[-1])

    def token_owner(self, tokens: np.ndarray) -> np.ndarray:
        """The item owning each token position (images: R tokens each, a division; 432K
        tokens in 1 ms where the binary search over 100K items took 47)."""
        if self.kind == "images":
            return np.asarray(tokens) // self.token_starts[1]
        return np.searchsorted(self.token_starts, tokens, side="right") - 1

    def token_blocks(self, items: int = 1024, first_shard: int = 0) -> Iterator[np.ndarray]:
        """Every token vector (of the shards from `first_shard` on), float32 (tokens, D), in
        token order, `items` items at a time."""
        name = EMBEDDINGS[self.kind]
        for shard in self.shards[first_shard:]:
            for start in range(0, shard.count, items):
                stop = min(start + items, shard.count)
                rows = shard.block(name, start, stop)
                if self.kind == "captions":
                    lengths = shard.block("lengths", start, stop)
                    yield rows[np.arange(rows.shape[1]) < lengths[:, None]]
                else:
                    yield rows.reshape(-1, rows.shape[-1])

    def token_vectors(self, tokens: np.ndarray) -> np.ndarray:
        """float32 (len(tokens), D): the vectors at sorted token positions."""
        owners = self.token_owner(tokens)
        items, inverse = np.unique(owners, return_inverse=True)
        rows = self.rows(EMBEDDINGS[self.kind], items)
        return rows[inverse, tokens - self.token_starts[owners]]

    def global_embeddings(self) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, float32 (n, D)) per shard, in gallery order: the read-only memory maps
        themselves (`global` is float32 in every dtype), so a shortlist's inner products read
        the file pages without a copy (bench_query: 427 -> 110 ms over 484K images)."""
        for shard in self.shards:
            yield shard.offset, shard.load("global")

    def prefetch(self, indices: np.ndarray) -> None:
        """Advise the kernel that every stored array but `global` of the items at `indices` will
        be read, so that a gallery larger than the page cache is read with many requests in
        flight. Measured on 1000 int8 candidates over 150K images (R=36, D=1024): cold cache
        480 -> 155 ms, but warm 57 -> 100 ms (one posix_fadvise per row and array), so the
        re-rank calls it only for galleries larger than the physical memory."""
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(which):
            shard = self.shards[int(s)]
            local = idx[which == s] - shard.offset
            for name in shard.files:
                if name != "global":
                    shard.prefetch(name, local)

    def rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows of `name` at global item `indices` (any order, repeats allowed, across shards), as
        float32 (dequantized; `lengths` int64). Caption arrays are zero-padded to the longest
        padded length T among the shards the indices touch. The stored rows are gathered first
        and dequantized in one pass: scattering int8 rather than float32 rows, into one array
        rather than one per shard, took 256 rows of int8 regions (R=36, D=1024, 5 shards) from
        20 to 14 ms, and ONNX Runtime's DequantizeLinear for that pass to 8.6 ms."""
        if name not in ITEM_AXES[self.kind]:
            names = ", ".join(ITEM_AXES[self.kind])
            raise KeyError(f"a gallery of {self.kind} has no array {name!r} (has {names})")
        idx = self._item_indices(indices)
        stored = self._gather(name, idx)
        if name == "lengths":
            return stored.astype(np.int64, copy=False)
        scale_name = name + SCALE_SUFFIX
        scale = self._gather(scale_name, idx) if scale_name in self.shards[0].files else None
        return to_float32(stored, scale)

    def stored_rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows of the stored array `name` (`regions_scale` included) at global item `indices`,
        as stored (an int8 gallery's uint8 codes, not dequantized), captions padded as in
        `rows` (with the stored zero, `stored_zero`)."""
        if name not in self.shards[0].files:
            names = ", ".join(self.shards[0].files)
            raise KeyError(f"a gallery of {self.kind} stores no {name!r} (stores {names})")
        return self._gather(name, self._item_indices(indices))

    def _item_indices(self, indices: np.ndarray) -> np.ndarray:
        """`indices` as int64 global item indices, checked: 1-D, integer, in range."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"item indices out of range 0..{self.count - 1}")
        return idx

    def _gather(self, name: str, idx: np.ndarray) -> np.ndarray:
        """The stored rows of `name` at global `idx`, zero-padded to the largest shard shape."""
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        touched = np.unique(which) if idx.size else np.arange(len(self.shards))
        shapes = [self.shards[int(s)].shape(name)[1:] for s in touched]
        item_shape = tuple(max(dims) for dims in zip(*shapes, strict=True)) if shapes[0] else ()
        stored_dtype = self.shards[int(touched[0])].stored_dtype(name)
        out = np.full((idx.size, *item_shape), stored_zero(stored_dtype), dtype=stored_dtype)
        for s in touched if idx.size else ():
            shard = self.shards[int(s)]
            sel = np.flatnonzero(which == s)
            local = idx[sel] - shard.offset
            order = np.argsort(local, kind="stable")  # read the file front to back
            values = shard.take_stored(name, local[order])
            region = tuple(slice(0, k) for k in values.shape[1:])
            out[(sel[order], *region)] = values
        return out


def open_gallery(path: str | Path, verify: bool = True) -> Gallery:
    """Open and validate a gallery folder (with `verify`, also every file's sha256)."""
    path = Path(path)
    where = path / MANIFEST
    what = "the manifest of a gallery folder (scan-deploy index)"
    manifest = read_json_object(where, what)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        message = f"got {version!r}, expected one of {', '.join(map(str, READABLE_VERSIONS))}"
        raise input_error(where, "format_version", message)
    kind = one_of(manifest.get("kind"), KINDS, "kind", where)
    dtype = GalleryDtype.parse(manifest.get("dtype"), "dtype", where)
    count = typed(manifest.get("count"), int, "count", where)
    bundle = typed(manifest.get("bundle"), dict, "bundle", where)
    embed_size = typed(bundle.get("embed_size"), int, "bundle.embed_size", where)
    typed(bundle.get("graphs"), dict, "bundle.graphs", where)
    typed(bundle.get("vocab"), dict, "bundle.vocab", where)
    typed(bundle.get("path"), str, "bundle.path", where)  # query's bundle without --bundle
    entries = typed(manifest.get("shards"), list, "shards", where)
    if count < 1:
        raise input_error(where, "count", f"got {count}, expected at least one item")
    expected_files = stored_arrays(kind, dtype, version)
    shards = []
    offset = 0
    sizes: dict[str, int] = {"D": embed_size}
    for i, entry in enumerate(entries):
        label = f"shards[{i}]"
        typed(entry, dict, label, where)
        n = typed(entry.get("count"), int, f"{label}.count", where)
        if n < 1:
            raise input_error(where, f"{label}.count", f"got {n}, expected at least one item")
        if entry.get("offset", offset) != offset:
            raise input_error(
                where, f"{label}.offset", f"got {entry.get('offset')!r}, expected {offset}"
            )
        files = typed(entry.get("files"), dict, f"{label}.files", where)
        if set(files) != set(expected_files):
            raise input_error(
                where,
                f"{label}.files",
                f"has {', '.join(sorted(files))}, a gallery of {kind} ({dtype}) expects "
                f"{', '.join(sorted(expected_files))}",
            )
        if kind == "captions":
            sizes.pop("T", None)
        for name, want_dtype in expected_files.items():
            record = files[name]
            field_name = f"{label}.files.{name}"
            shape = _check_record(record, where, field_name)
            expected = _expected_shape(kind, name, n, shape, sizes)
            if shape != expected or np.dtype(record["dtype"]) != want_dtype:
                shown = ", ".join(map(str, expected))
                raise input_error(
                    where,
                    field_name,
                    f"records shape {tuple(shape)} {record['dtype']}, expected ({shown}) "
                    f"{want_dtype.name}",
                )
            _check_npy(path / record["file"], record, field_name, verify)
        shards.append(Shard(i, n, offset, path, files, dtype))
        offset += n
    if offset != count:
        raise input_error(where, "shards", f"hold {offset} items, the manifest count is {count}")
    ids = _read_list(path, manifest, "ids", count, where, required=True)
    texts = _read_list(path, manifest, "texts", count, where, required=False)
    if len(set(ids)) != len(ids):
        raise input_error(path / IDS, None, "has duplicate ids, expected unique ids")
    _check_boxes(path, manifest, count, where, verify)
    if "images_dir" in manifest:
        typed(manifest["images_dir"], str, "images_dir", where)
    gallery = Gallery(path, kind, dtype, count, manifest, shards, ids, texts)
    gallery.deleted = _deleted_indices(path, manifest, ids, where)
    for stage, record in _first_stage_records(manifest, where).items():
        gallery.first_stages[stage] = _check_stage_record(gallery, stage, record, verify)
    return gallery


def _first_stage_records(manifest: dict[str, Any], where: Path) -> dict[FirstStage, Any]:
    if manifest["format_version"] == 1:  # its one index: float16 over the globals
        old = manifest.get("faiss_index")
        if old is None:
            return {}
        typed(old, dict, "faiss_index", where)
        record = {"file": _V1_INDEX, "factory": "SQfp16", "vectors": old.get("count")}
        record.update(type="IndexScalarQuantizer", search_params="", trained_on=0)
        return {FirstStage.GLOBAL: {**old, **record}}
    records = typed(manifest.get("first_stages"), dict, "first_stages", where)
    return {FirstStage.parse(stage, "first_stages", where): r for stage, r in records.items()}


def _check_stage_record(
    gallery: Gallery, stage: FirstStage, record: Any, verify: bool
) -> dict[str, Any]:
    """The record of a stage's index, checked against the gallery and the file (size, and with
    `verify` its sha256); what the index holds is checked when it is opened."""
    where, label = gallery.path / MANIFEST, f"first_stages.{stage}"
    typed(record, dict, label, where)
    file_name = typed(record.get("file"), str, f"{label}.file", where)
    expected_file = INDEX_FILES[stage] if gallery.manifest["format_version"] > 1 else _V1_INDEX
    if file_name != expected_file:
        raise input_error(where, f"{label}.file", f"got {file_name!r}, expected {expected_file!r}")
    for key in ("sha256", "factory", "type", "search_params"):
        typed(record.get(key), str, f"{label}.{key}", where)
    for key in ("bytes", "vectors", "dim", "trained_on"):
        typed(record.get(key), int, f"{label}.{key}", where)
    vectors = gallery.count if stage == FirstStage.GLOBAL else gallery.token_count
    for key, expected in (("vectors", vectors), ("dim", gallery.embed_size)):
        if record[key] != expected:
            message = f"got {record[key]}, expected {expected} (an index of another gallery?)"
            raise input_error(where, f"{label}.{key}", f"{message}: {_FIX}")
    file = gallery.path / file_name
    if not file.is_file():
        raise input_error(file, None, f"missing (named by {MANIFEST} {label})")
    if file.stat().st_size != record["bytes"]:
        message = f"is {file.stat().st_size} bytes, the manifest records {record['bytes']}: {_FIX}"
        raise input_error(file, "size", message)
    if verify:
        check_sha256(file, sha256_file(file), record["sha256"], _FIX)
    return record


def _check_record(record: Any, where: Path, field_name: str) -> list[int]:
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("file"), str)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("dtype"), str)
        and isinstance(record.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in record["shape"])
    )
    if ok:
        try:
            np.dtype(record["dtype"])
        except TypeError:
            ok = False
    if not ok:
        raise input_error(where, field_name, "expected {file, sha256, shape, dtype}")
    return list(record["shape"])


def _expected_shape(
    kind: str, name: str, n: int, shape: list[int], sizes: dict[str, int]
) -> list[int]:
    """The shape `name` must have; R (images, whole gallery) and T (captions, per shard) are
    taken from the first array that has them."""
    base = name.removesuffix(SCALE_SUFFIX)
    axes = ITEM_AXES[kind][base]
    if name != base:
        axes = axes[:1]
    for axis, size in zip(axes, shape[1:], strict=False):
        sizes.setdefault(axis, size)
    return [n, *(sizes.get(a, a) for a in axes)]


def _check_npy(file: Path, record: dict[str, Any], field_name: str, verify: bool) -> None:
    if not file.is_file():
        raise input_error(file, None, f"missing (named by {MANIFEST} {field_name})")
    expected = f"{tuple(record['shape'])} {np.dtype(record['dtype']).name}"
    header = read_npy_header(file, f": {_FIX}")
    shape, dtype, fortran = header.shape, header.dtype, header.fortran_order
    if list(shape) != record["shape"] or dtype != np.dtype(record["dtype"]) or fortran:
        raise input_error(
            file,
            "shape",
            f"is {shape} {dtype.name}{' (Fortran order)' if fortran else ''}, "
            f"the manifest expects {expected}: {_FIX}",
        )
    if verify:
        check_sha256(file, sha256_file(file), record["sha256"], _FIX)


def _check_boxes(path: Path, manifest: dict, count: int, where: Path, verify: bool) -> None:
    """The optional `boxes` and `image_sizes` records: both or neither, files as recorded."""
    present = [key for key in BOX_FILES if key in manifest]
    if not present:
        return
    if len(present) != len(BOX_FILES):
        missing = next(key for key in BOX_FILES if key not in manifest)
        raise input_error(where, missing, f"missing, expected with {present[0]}")
    for key, rows in (("boxes", 3), ("image_sizes", 2)):
        record = typed(manifest[key], dict, key, where)
        shape = typed(record.get("shape"), list, f"{key}.shape", where)
        file = path / BOX_FILES[key]
        if len(shape) != rows or shape[0] != count or shape[-1] != (4 if rows == 3 else 2):
            expected = f"({count}, R, 4)" if rows == 3 else f"({count}, 2)"
            raise input_error(where, f"{key}.shape", f"got {shape}, expected {expected}")
        if not file.is_file():
            raise input_error(file, None, f"missing (named by {MANIFEST} {key}): {_FIX}")
        if list(read_npy_header(file, f": {_FIX}").shape) != shape:
            raise input_error(file, None, f"does not hold the recorded shape {shape}: {_FIX}")
        if verify:
            check_sha256(file, sha256_file(file), record.get("sha256"), _FIX)


def _deleted_indices(path: Path, manifest: dict, ids: list[str], where: Path) -> np.ndarray:
    """The sorted indices of the items `deleted.json` names (none without it)."""
    record = manifest.get("deleted")
    if record is None:
        return np.zeros(0, np.int64)
    count = typed(typed(record, dict, "deleted", where).get("count"), int, "deleted.count", where)
    position = {item: i for i, item in enumerate(ids)}
    names = _read_list(path, manifest, "deleted", count, where, required=True)
    unknown = [item for item in names if item not in position]
    if unknown:
        raise input_error(path / DELETED, None, f"names {unknown[0]!r}, not an id of the gallery")
    indices = np.unique(np.array([position[item] for item in names], np.int64))
    if len(indices) != count:
        raise input_error(path / DELETED, None, "names an id twice")
    return indices


def _read_list(
    root: Path, manifest: dict, key: str, count: int, where: Path, required: bool
) -> list[str] | None:
    entry = manifest.get(key)
    if entry is None and not required:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise input_error(where, key, "expected {file, sha256, count}")
    file = root / entry["file"]
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise input_error(file, None, f"missing (named by {MANIFEST} {key})") from None
    check_sha256(file, hashlib.sha256(raw).hexdigest(), entry.get("sha256"), _FIX)
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise input_error(file, None, f"invalid JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise input_error(file, None, "expected a JSON list of strings")
    if len(items) != count:
        raise input_error(file, None, f"has {len(items)} entries, the manifest count is {count}")
    return items


__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "Gallery",
    "GalleryWriter",
    "Shard",
    "open_gallery",
]
