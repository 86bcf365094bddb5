"""Reading a gallery: the scorer's precomputed per-item tensors, sharded `.npy` files,
memory-mapped (`runtime.gallery_format` is the format, `runtime.gallery_writer` writes it).

`scan-deploy query` opens a gallery with `open_gallery`, shortlists with the pooled global
embeddings and re-ranks the shortlist with the exact scorer, reading only the rows it needs.

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
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.runtime.dequantize import to_float32
from scan_deploy.runtime.first_stage import INDEX_FILES
from scan_deploy.runtime.gallery_format import (
    BOX_FILES,
    DELETED,
    EMBEDDINGS,
    IDS,
    ITEM_AXES,
    KINDS,
    MANIFEST,
    READABLE_VERSIONS,
    REINDEX,
    SCALE_SUFFIX,
    V1_INDEX,
    bundle_identity,
    stored_arrays,
    stored_zero,
)
from scan_deploy.runtime.inner_product import apply_search_params, open_faiss_index

from scan_deploy.bundle import Bundle, check_sha256, sha256_file
from scan_deploy.choices import FirstStage, GalleryDtype, Graph
from scan_deploy.errors import input_error, one_of
from scan_deploy.jsonfile import read_json_object, typed
from scan_deploy.precomp import image_file, open_npy, read_npy_header

MAPS_KEPT = 256


@functools.lru_cache(maxsize=MAPS_KEPT)
def _mapped(path: str, inode: int, mtime_ns: int, size: int) -> np.ndarray:
    """The memory map of a shard file, kept across calls: a new map per block faulted the
    file's pages in again on every query (32 of the int8 scorer's 152 ms per query over 10K
    images, benchmarks/bench_int8_scorer.py). At most MAPS_KEPT are kept, since each holds a
    file descriptor (about 1M images in shards of 4096 would pass a 1024 descriptor limit);
    keyed by the file's identity, so a gallery written again at the same path is mapped
    afresh."""
    return open_npy(Path(path), f": {REINDEX}")


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
            return open_npy(path, f": {REINDEX}")  # its one-line error
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
            header = read_npy_header(self.path(name), f": {REINDEX}")
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
    lease: Any = field(default=None, repr=False)  # `generations.Lease`: kept from `prune`

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
                f"bundle at {bundle.path} has {actual['embed_size']}): {REINDEX}",
            )
        for name in Graph:
            mine, theirs = recorded["graphs"].get(name), actual["graphs"][name]
            if mine != theirs:
                raise input_error(
                    where,
                    f"bundle.graphs.{name}",
                    f"gallery built with another bundle ({name} sha256 {str(mine)[:12]}…, the "
                    f"bundle at {bundle.path} has {theirs[:12]}…): {REINDEX}",
                )
        mine = recorded["vocab"].get("words_sha256")
        theirs = actual["vocab"]["words_sha256"]
        if mine != theirs:
            raise input_error(
                where,
                "bundle.vocab.words_sha256",
                f"gallery built with another bundle (vocabulary {str(mine)[:12]}…, the bundle at "
                f"{bundle.path} has {theirs[:12]}…): {REINDEX}",
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

    def close(self) -> None:
        """Drop the first-stage indexes opened (FAISS frees each with its last reference) and
        the kept shard maps, so that a pruned generation's disk space is freed, and release the
        reader's lease on the generation (`runtime.generations.Lease`), if any."""
        with self._lock:
            self._indexes.clear()
        _mapped.cache_clear()  # its shards' maps (others are mapped again when next read)
        if self.lease is not None:
            self.lease.close()

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


class Checked:
    """The files whose sha256 was checked, by device, inode, size, modification time and
    recorded digest: a later generation's hard links to them (`runtime.generations`: the same
    immutable files) are not read again. `serve` keeps one across the generations it opens."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()

    def check(self, file: Path, expected: str | None) -> None:
        status = file.stat()
        key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, expected)
        with self._lock:
            if key in self._seen:
                return
        check_sha256(file, sha256_file(file), expected, REINDEX)
        with self._lock:
            self._seen.add(key)


Verify = bool | Checked  # check every file's sha256 (True, or the files a Checked has not)


def _verify(file: Path, expected: str | None, verify: Verify) -> None:
    if isinstance(verify, Checked):
        verify.check(file, expected)
    elif verify:
        check_sha256(file, sha256_file(file), expected, REINDEX)


def open_gallery(path: str | Path, verify: Verify = True) -> Gallery:
    """Open and validate a gallery folder (with `verify`, also every file's sha256: a `Checked`
    skips those it has checked already)."""
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
    deleted = _deleted_indices(path, manifest, ids, where)
    live = np.ones(count, bool)
    live[deleted] = False
    live_ids = [item for item, keep in zip(ids, live, strict=True) if keep]
    unique = live_ids if manifest["format_version"] >= 4 else ids  # from 4: a deleted id again
    if len(set(unique)) != len(unique):
        raise input_error(path / IDS, None, "has duplicate ids, expected unique ids")
    _check_boxes(path, manifest, count, where, verify)
    if "images_dir" in manifest:
        typed(manifest["images_dir"], str, "images_dir", where)
    gallery = Gallery(path, kind, dtype, count, manifest, shards, ids, texts)
    gallery.deleted = deleted
    for stage, record in _first_stage_records(manifest, where).items():
        gallery.first_stages[stage] = _check_stage_record(gallery, stage, record, verify)
    return gallery


def _first_stage_records(manifest: dict[str, Any], where: Path) -> dict[FirstStage, Any]:
    if manifest["format_version"] == 1:  # its one index: float16 over the globals
        old = manifest.get("faiss_index")
        if old is None:
            return {}
        typed(old, dict, "faiss_index", where)
        record = {"file": V1_INDEX, "factory": "SQfp16", "vectors": old.get("count")}
        record.update(type="IndexScalarQuantizer", search_params="", trained_on=0)
        return {FirstStage.GLOBAL: {**old, **record}}
    records = typed(manifest.get("first_stages"), dict, "first_stages", where)
    return {FirstStage.parse(stage, "first_stages", where): r for stage, r in records.items()}


def _check_stage_record(
    gallery: Gallery, stage: FirstStage, record: Any, verify: Verify
) -> dict[str, Any]:
    """The record of a stage's index, checked against the gallery and the file (size, and with
    `verify` its sha256); what the index holds is checked when it is opened."""
    where, label = gallery.path / MANIFEST, f"first_stages.{stage}"
    typed(record, dict, label, where)
    file_name = typed(record.get("file"), str, f"{label}.file", where)
    expected_file = INDEX_FILES[stage] if gallery.manifest["format_version"] > 1 else V1_INDEX
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
            raise input_error(where, f"{label}.{key}", f"{message}: {REINDEX}")
    file = gallery.path / file_name
    if not file.is_file():
        raise input_error(file, None, f"missing (named by {MANIFEST} {label})")
    if file.stat().st_size != record["bytes"]:
        message = (
            f"is {file.stat().st_size} bytes, the manifest records {record['bytes']}: {REINDEX}"
        )
        raise input_error(file, "size", message)
    _verify(file, record["sha256"], verify)
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


def _check_npy(file: Path, record: dict[str, Any], field_name: str, verify: Verify) -> None:
    if not file.is_file():
        raise input_error(file, None, f"missing (named by {MANIFEST} {field_name})")
    expected = f"{tuple(record['shape'])} {np.dtype(record['dtype']).name}"
    header = read_npy_header(file, f": {REINDEX}")
    shape, dtype, fortran = header.shape, header.dtype, header.fortran_order
    if list(shape) != record["shape"] or dtype != np.dtype(record["dtype"]) or fortran:
        raise input_error(
            file,
            "shape",
            f"is {shape} {dtype.name}{' (Fortran order)' if fortran else ''}, "
            f"the manifest expects {expected}: {REINDEX}",
        )
    _verify(file, record["sha256"], verify)


def _check_boxes(path: Path, manifest: dict, count: int, where: Path, verify: Verify) -> None:
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
            raise input_error(file, None, f"missing (named by {MANIFEST} {key}): {REINDEX}")
        if list(read_npy_header(file, f": {REINDEX}").shape) != shape:
            raise input_error(file, None, f"does not hold the recorded shape {shape}: {REINDEX}")
        _verify(file, record.get("sha256"), verify)


def _deleted_indices(path: Path, manifest: dict, ids: list[str], where: Path) -> np.ndarray:
    """The sorted indices of the deleted items (none without `deleted.json`): from format 4 on,
    the file holds their positions (an id deleted, then added again, is in the gallery twice);
    before, their ids."""
    record = manifest.get("deleted")
    if record is None:
        return np.zeros(0, np.int64)
    count = typed(typed(record, dict, "deleted", where).get("count"), int, "deleted.count", where)
    if manifest["format_version"] >= 4:
        positions = _read_list(path, manifest, "deleted", count, where, True, int)
        bad = [i for i in positions if isinstance(i, bool) or not 0 <= i < len(ids)]
        if bad:
            message = f"names position {bad[0]!r}, expected 0..{len(ids) - 1}"
            raise input_error(path / DELETED, None, message)
        indices = np.unique(np.array(positions, np.int64))
        if len(indices) != count:
            raise input_error(path / DELETED, None, "names a position twice")
        return indices
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
    root: Path,
    manifest: dict,
    key: str,
    count: int,
    where: Path,
    required: bool,
    item_type: type = str,
) -> list | None:
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
    check_sha256(file, hashlib.sha256(raw).hexdigest(), entry.get("sha256"), REINDEX)
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise input_error(file, None, f"invalid JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(i, item_type) for i in items):
        what = "strings" if item_type is str else "integers"
        raise input_error(file, None, f"expected a JSON list of {what}")
    if len(items) != count:
        raise input_error(file, None, f"has {len(items)} entries, the manifest count is {count}")
    return items
