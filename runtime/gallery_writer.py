"""Writing a gallery (`scan-deploy index`, `index --append`, `delete`): `GalleryWriter` converts
batches to the storage dtype, writes shards as they fill, then the ids, texts, boxes,
tombstones, manifest and first-stage indexes, all into a temp folder renamed on success
(`runtime.gallery_format` is the format)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.runtime.first_stage import extend_stage_index, write_stage_index
from scan_deploy.runtime.gallery import Gallery, open_gallery
from scan_deploy.runtime.gallery_format import (
    BOX_FILES,
    DELETED,
    EMBEDDINGS,
    FORMAT_VERSION,
    FP16_MAX,
    GRAMS,
    IDS,
    ITEM_AXES,
    KINDS,
    MANIFEST,
    MARKER,
    QUANTIZATION,
    QUANTIZED,
    SCALE_SUFFIX,
    TEXTS,
    bundle_identity,
    link_or_copy,
    stored_arrays,
    stored_zero,
)
from scan_deploy.runtime.inner_product import require_faiss

from scan_deploy.atomic import atomic_dir, check_output_dir, write_json
from scan_deploy.bundle import Bundle, sha256_file
from scan_deploy.choices import FirstStage, GalleryDtype
from scan_deploy.errors import input_error, one_of
from scan_deploy.int8_rows import quantize_int8
from scan_deploy.precomp import open_npy


class _Aborted(Exception):
    """Thrown into the temp-folder context to discard a gallery that will not be finished."""


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
        compact: bool = False,
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
        the base's items to mark deleted (tombstones: searches skip them). `compact`: instead of
        linking the base's shards, write its live items again (deleted rows dropped, first
        stages rebuilt)."""
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
            version = base.manifest["format_version"]
            if version < 3:  # its int8 rows or index file name differ: not extended in place
                message = f"format {version}, written by an older scan-deploy: re-run index"
                raise input_error(base.path / MANIFEST, "format_version", message)
            dtype, shard_size = base.dtype, int(base.manifest["shard_size"])
            stages = {stage: record["factory"] for stage, record in base.first_stages.items()}
            folder = base.manifest.get("images_dir")
            images_dir = None if folder is None else Path(folder)
        self.base, self.compact = base, compact
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
        self._deleted: list[int] = []  # positions of the deleted items
        if base is not None and compact:
            self._copy_live(base)
        elif base is not None:
            self._start_from(base, delete)

    def _copy_live(self, base: Gallery) -> None:
        """The base's live items, added again in order (rows read back as float32 and stored
        again: fp16 and int8 rows round-trip to the same codes), its deleted ones dropped."""
        live = np.flatnonzero(~base.deleted_mask)
        if "boxes" in base.manifest:
            stored = (open_npy(base.path / BOX_FILES[key]) for key in BOX_FILES)
            self.boxes = tuple(np.asarray(array)[live] for array in stored)
        else:
            self.boxes = None
        for start in range(0, len(live), self.shard_size):
            rows = live[start : start + self.shard_size]
            arrays = {name: base.rows(name, rows) for name in ITEM_AXES[base.kind]}
            texts = None if base.texts is None else [base.texts[i] for i in rows]
            self.add(arrays, [base.ids[i] for i in rows], texts)

    def _start_from(self, base: Gallery, delete: Sequence[str]) -> None:
        """The base's items first: its shard files hard-linked (immutable, so shared), its ids,
        texts, boxes and tombstones, then `delete` marked."""
        for shard in base.manifest["shards"]:
            for record in shard["files"].values():
                link_or_copy(base.path / record["file"], self._tmp / record["file"])
        self._shards = json.loads(json.dumps(base.manifest["shards"]))
        live = ~base.deleted_mask
        self._ids, self._count = list(base.ids), base.count
        self._seen = {item for item, keep in zip(base.ids, live, strict=True) if keep}
        self._texts = None if base.texts is None else list(base.texts)
        if base.kind == "images":
            self._regions = base.shards[0].shape("regions")[1]
        if "boxes" in base.manifest:
            old = tuple(open_npy(base.path / BOX_FILES[key]) for key in BOX_FILES)
            new = self.boxes or tuple(np.zeros((0, *a.shape[1:]), a.dtype) for a in old)
            self.boxes = tuple(np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
        else:
            self.boxes = None
        self._deleted = [int(i) for i in base.deleted]
        live_at = {item: i for i, item in enumerate(base.ids) if live[i]}
        known = set(base.ids)
        for item in delete:
            if item not in live_at:
                state = "already deleted" if item in known else "not in the gallery"
                raise input_error(self.where, "delete", f"id {item!r}: {state}")
            self._deleted.append(live_at.pop(item))
            self._seen.discard(item)
        self._deleted.sort()

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
            self._record(ids, texts)
            while self._pending_count >= self.shard_size:
                self._write_shard(self.shard_size)
        except BaseException:
            self.abort()
            raise

    def adopt(self, part: Path) -> None:
        """Take the one shard of the finished gallery `part` (written by another process with
        this writer's bundle and dtype: `runtime.ray_index`) as the next shard: its shard folder
        is moved in, its ids and texts follow the items before. Not after `add` of a partial
        shard (the shards would not be filled in order)."""
        self._require_open()
        try:
            if self._pending_count:
                raise RuntimeError(f"{self.path}: adopt after a partial shard was added")
            gallery = open_gallery(part, verify=False)
            manifest = gallery.manifest
            same = (gallery.kind, gallery.dtype, manifest["bundle"]) == (
                self.kind,
                self.dtype,
                self.bundle_identity,
            )
            if not same or len(manifest["shards"]) != 1:
                raise RuntimeError(f"{part}: not one shard of this gallery's kind and bundle")
            texts = gallery.texts
            self._check_ids(gallery.ids)
            if self._count and (texts is None) != (self._texts is None):
                raise RuntimeError(f"{part}: texts where the items before had none, or the reverse")
            if self.kind == "images":
                regions = gallery.shards[0].shape("regions")[1]
                if self._regions is not None and regions != self._regions:
                    message = f"{part}: {regions} regions, the gallery has {self._regions}"
                    raise RuntimeError(message)
                self._regions = regions
            shard = manifest["shards"][0]
            folder = f"shard-{len(self._shards):05d}"
            os.replace(part / Path(next(iter(shard["files"].values()))["file"]).parent,
                       self._tmp / folder)  # fmt: skip
            files = {
                name: {**record, "file": f"{folder}/{Path(record['file']).name}"}
                for name, record in shard["files"].items()
            }
            self._shards.append({"count": gallery.count, "offset": self._count, "files": files})
            self._record(gallery.ids, texts)
        except BaseException:
            self.abort()
            raise

    def _record(self, ids: Sequence[str], texts: Sequence[str] | None) -> None:
        """The ids (and texts) of items added, in order."""
        self._ids.extend(ids)
        self._seen.update(ids)
        if texts is not None:
            self._texts = self._texts if self._texts is not None else []
            self._texts.extend(texts)
        self._count += len(ids)

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

    def _check_ids(self, ids: Sequence[str]) -> None:
        fresh: set[str] = set()
        for item_id in ids:
            if item_id in self._seen or item_id in fresh:
                message = f"duplicate id {item_id!r}, expected unique ids"
                raise input_error(self.path, "ids", message)
            fresh.add(item_id)

    def _validate(
        self, arrays: dict[str, np.ndarray], ids: list[str], texts: list[str] | None
    ) -> dict[str, np.ndarray]:
        where = self.path
        if not isinstance(ids, list | tuple) or not all(isinstance(i, str) and i for i in ids):
            raise input_error(where, "ids", "expected a list of non-empty strings")
        n = len(ids)
        self._check_ids(ids)
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
                if peak > FP16_MAX:
                    raise input_error(
                        self.path,
                        f"arrays.{name}",
                        f"has values up to {peak:.4g}, beyond the float16 range "
                        f"(±{FP16_MAX:.0f}); expected dtype fp32 or int8",
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
            if self.base is None or self.compact:
                record = write_stage_index(written, stage, factory, self.where)
            else:
                record = extend_stage_index(self.base, written, stage)
            if "sha256" not in record:  # a file shared with the base keeps its record's
                record = {**record, "sha256": sha256_file(self._tmp / record["file"])}
            records[str(stage)] = record
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


def _write_list(folder: Path, name: str, items: list) -> dict[str, Any]:
    (folder / name).write_text(json.dumps(items, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"file": name, "sha256": sha256_file(folder / name), "count": len(items)}
