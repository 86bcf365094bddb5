"""The gallery's on-disk format, shared by its writer (`runtime.gallery_writer`) and its
reader (`runtime.gallery`): file names, the arrays of each kind, their storage dtypes.

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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from scan_deploy.atomic import Marker
from scan_deploy.bundle import Bundle
from scan_deploy.choices import GalleryDtype, Graph
from scan_deploy.int8_rows import INT8_ZERO_POINT

FORMAT_VERSION = 4
# 1: one optional float16 index of the globals (`faiss_index`); 1 and 2: int8 values as int8;
# up to 3: `deleted.json` names the deleted items by id (from 4 on: by position)
READABLE_VERSIONS = (1, 2, 3, 4)
V1_INDEX = "shortlist.faiss"
KINDS = ("images", "captions")
MANIFEST = "manifest.json"
MARKER = Marker(MANIFEST, ("format_version", "kind", "shards", "bundle"), "gallery")
IDS = "ids.json"
BOX_FILES = {"boxes": "boxes.npy", "image_sizes": "image_sizes.npy"}  # optional, images only
TEXTS = "texts.json"
DELETED = "deleted.json"  # the deleted items' positions (format 3: ids), when there are any
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
STORAGE = {
    GalleryDtype.FP32: np.dtype(np.float32),
    GalleryDtype.FP16: np.dtype(np.float16),
    GalleryDtype.INT8: np.dtype(np.uint8),  # codes q + 128
}
FIXED_DTYPES = {"global": np.dtype(np.float32), "lengths": np.dtype(np.int64)}
FP16_MAX = float(np.finfo(np.float16).max)
REINDEX = "re-run scan-deploy index"


def stored_arrays(
    kind: str, dtype: GalleryDtype, version: int = FORMAT_VERSION
) -> dict[str, np.dtype]:
    """The files of one shard of a `kind`/`dtype` gallery of format `version`: stored array
    name → numpy dtype."""
    stored = {}
    for name in ITEM_AXES[kind]:
        if name in QUANTIZED:
            old_int8 = dtype == GalleryDtype.INT8 and version < 3
            stored[name] = np.dtype(np.int8) if old_int8 else STORAGE[dtype]
            if dtype == GalleryDtype.INT8:
                stored[name + SCALE_SUFFIX] = np.dtype(np.float32)
        else:
            stored[name] = FIXED_DTYPES[name]
    return stored


def bundle_identity(bundle: Bundle) -> dict[str, Any]:
    """What a gallery records about the bundle it was encoded with."""
    return {
        "path": str(Path(bundle.path).absolute()),
        "graphs": {name: bundle.manifest["graphs"][name]["sha256"] for name in Graph},
        "vocab": {"words_sha256": bundle.manifest["vocab"]["words_sha256"]},
        "embed_size": int(bundle.config.embed_size),
        "cross_attn": bundle.config.cross_attn,
    }


def stored_zero(dtype: np.dtype) -> int:
    """What a stored 0 is: the code 128 in uint8 (int8 values as codes), else 0."""
    return INT8_ZERO_POINT if dtype == np.uint8 else 0


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a gallery's files never change once written, so a
    later generation shares them), or a copy on another file system."""
    target.parent.mkdir(exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
