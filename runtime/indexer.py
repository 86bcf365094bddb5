"""`scan-deploy index`: encode region features (and optionally captions) once into a gallery
folder: `images/` for text→image search and `captions/` for image→text search (docs/formats.md).

Image ids are those of `{split}_ids.txt` beside `{split}_ims.npy` when there is one (`data
import-tsv` writes it: the detector's image ids), else the row numbers of the features file;
caption ids are `image:k` (the k-th caption of that image, 5 or 1 per image as in the precomp
format), so a hit names its ground truth. The
whole folder is written beside the target and renamed when both galleries are complete.

Images and captions are encoded in batches of the engine's optimal size, and captions longer
than the engine's word limit are read as their first words (one warning: the rule is
`scan_deploy.bundle`'s), so a long caption cannot blow up its shard's padded Grams nor fall
outside the scorer's profile (`backends.base.CallSizes`). An item the encoder turns into NaN/Inf
or an all-zero embedding (features far beyond the model's scale, e.g. ×1e30, overflow its L2
norm) is refused, naming the file and the item (`scan_deploy.runtime.encoded`): such a gallery
would score every query alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scan_deploy.runtime.backends.base import CallSizes
from scan_deploy.runtime.encoded import check_encoded_images, check_encoded_texts
from scan_deploy.runtime.first_stage import check_stages
from scan_deploy.runtime.gallery import Gallery
from scan_deploy.runtime.gallery_format import MARKER
from scan_deploy.runtime.gallery_writer import GalleryWriter

from scan_deploy.atomic import atomic_dir, check_output_dir
from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import Bundle
from scan_deploy.choices import FirstStage, GalleryDtype
from scan_deploy.errors import input_error
from scan_deploy.precomp import (
    PrecompSplit,
    check_feature_dim,
    image_boxes,
    image_ids,
    images_folder,
    load_files,
)

if TYPE_CHECKING:
    from scan_deploy.runtime.ray_index import RayIndexing

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class IndexInputs:
    """A split to index, as read: its features (memory-mapped), captions and image ids."""

    data: PrecompSplit
    names: list[str]
    features_path: Path
    captions_path: Path | None

    @classmethod
    def read(cls, features_path: Path, captions_path: Path | None, scan_values: bool = True):
        """`scan_values`: scan every feature for NaN/Inf and padding now (else the encoding
        of each shard does: `check_image_rows`)."""
        data = load_files(features_path, captions_path, check_finite=scan_values)
        names = image_ids(features_path, data.num_images)
        return cls(data, names, Path(features_path), captions_path)

    def image_texts(self, rows: range) -> list[str] | None:
        """Each image's first caption (shown with its hits), or None without captions."""
        captions, per_image = self.data.captions, self.data.captions_per_image
        return [captions[i * per_image] for i in rows] if captions else None

    def caption_ids(self, lines: range) -> list[str]:
        per_image = self.data.captions_per_image
        return [f"{self.names[j // per_image]}:{j % per_image}" for j in lines]


def index_gallery(
    bundle: Bundle,
    backend,
    features_path: Path,
    captions_path: Path | None,
    out: Path,
    dtype: GalleryDtype | str = GalleryDtype.FP16,
    shard_size: int = 4096,
    force: bool = False,
    progress: Progress | None = None,
    first_stages: dict[FirstStage | str, str | None] | None = None,
    base: dict[str, Gallery] | None = None,
    ray: RayIndexing | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the gallery folder `out`; returns the manifest written for each kind (its `count`,
    `first_stages` records, ...). `first_stages`:
    the FAISS index of each first stage for `query --shortlist`, by index-factory string (None:
    the default; `runtime.first_stage`), in both galleries. `base`: the galleries (by kind)
    the new ones extend (`runtime.generations.append_gallery`: their items first, then these;
    their dtype, shard size and first stages kept). `ray`: encode the shards on a Ray Data
    pool of workers (`runtime.ray_index`) instead of `backend` in this process (which still
    checks the graphs open)."""
    report = progress or (lambda stage, done, total: None)
    out = Path(out)
    checkpoint = getattr(backend, "checkpoint", None)  # the torch backend's
    inputs = [p for p in (features_path, captions_path, bundle.path, checkpoint) if p is not None]
    check_output_dir(out, force, replace(MARKER, file=f"images/{MARKER.file}"), inputs)
    split = IndexInputs.read(features_path, captions_path, scan_values=ray is None)
    data = split.data
    bundle.check_regions(data.num_regions, data.padded, features_path, "shape")
    if base is not None:
        _check_base(base, data, features_path, captions_path)
        images = base["images"]  # a deleted id may be added again
        known = {
            item for item, gone in zip(images.ids, images.deleted_mask, strict=True) if not gone
        }
        clash = next((name for name in split.names if name in known), None)
        if clash is not None:
            message = f"image {clash!r} is already in the gallery (ids must stay unique)"
            raise input_error(features_path, "ids", message)
    check_feature_dim(data, bundle.config.img_dim, bundle.path / "manifest.json")
    n, dim = data.num_images, int(bundle.config.embed_size)
    stages = check_stages(first_stages or {}, dim, n, n * data.num_regions, out / "images")
    encoders = LocalEncoders(bundle, backend, split)  # both graphs opened (checked) first
    with atomic_dir(out) as tmp, contextlib.ExitStack() as stack:
        writers = {
            kind: stack.enter_context(writer)
            for kind, writer in _open_writers(
                bundle, split, tmp, out, dtype, shard_size, stages, base
            ).items()
        }
        if ray is None:
            cut = encoders.encode_all(writers, report)
        else:
            from scan_deploy.runtime.ray_index import encode_on_ray

            cut = encode_on_ray(ray, bundle, split, writers, tmp, out, report)
    bundle.warn_cut(cut, data.num_captions, "captions", encoders.sizes.max_tokens)
    return {kind: writer.manifest for kind, writer in writers.items()}


def _open_writers(bundle, split, tmp, out, dtype, shard_size, stages, base):
    """The gallery writers of `out`'s images (and captions) parts, in the temp folder `tmp`."""
    n, regions = split.data.num_images, split.data.num_regions
    writers = {
        "images": GalleryWriter(
            tmp / "images",
            "images",
            bundle,
            dtype,
            shard_size,
            first_stages=stages,
            where=out / "images",
            boxes=image_boxes(split.features_path, n, regions),
            images_dir=images_folder(split.features_path),
            base=None if base is None else base["images"],
        )
    }
    if split.data.captions:
        writers["captions"] = GalleryWriter(
            tmp / "captions",
            "captions",
            bundle,
            dtype,
            shard_size,
            first_stages=stages,
            where=out / "captions",
            base=None if base is None else base["captions"],
        )
    return writers


class LocalEncoders:
    """Encode a split's images and captions into gallery writers with one backend's runners,
    in the engine's batch sizes (`CallSizes`): the whole split (`index_gallery`), or one
    shard's range (`runtime.ray_index`, in each worker)."""

    def __init__(self, bundle: Bundle, backend, split: IndexInputs) -> None:
        self.bundle, self.split = bundle, split
        self.image_runner = backend.runner("image_encoder")
        self.text_runner = backend.runner("text_encoder") if split.data.captions else None
        self.sizes = CallSizes.of(backend)

    def encode_all(self, writers: dict[str, GalleryWriter], report: Progress) -> int:
        """Every image and caption; returns the number of captions cut."""
        self.encode_images(range(self.split.data.num_images), writers["images"], report)
        if "captions" not in writers:
            return 0
        return self.encode_captions(
            range(self.split.data.num_captions), writers["captions"], report
        )

    def encode_images(self, rows: range, writer: GalleryWriter, report: Progress) -> None:
        features, path = self.split.data.images, self.split.features_path
        step = self.sizes.image_batch
        for start in range(rows.start, rows.stop, step):
            batch_rows = range(start, min(start + step, rows.stop))
            batch = np.asarray(features[batch_rows.start : batch_rows.stop], np.float32)
            regions, region_gram, pooled = self.image_runner.run({"features": batch})
            check_encoded_images(batch, regions, pooled, path, start)
            arrays = {"regions": regions, "region_gram": region_gram, "global": pooled}
            ids = [self.split.names[i] for i in batch_rows]
            writer.add(arrays, ids, self.split.image_texts(batch_rows))
            report("images", len(batch), self.split.data.num_images)

    def encode_captions(self, lines: range, writer: GalleryWriter, report: Progress) -> int:
        """The captions of `lines`; returns how many were cut to the engine's word limit."""
        captions, cut = self.split.data.captions, 0
        step, max_tokens = self.sizes.text_batch, self.sizes.max_tokens
        for start in range(lines.start, lines.stop, step):
            chunk_lines = range(start, min(start + step, lines.stop))
            chunk = captions[chunk_lines.start : chunk_lines.stop]
            token_lists, chunk_cut = self.bundle.encode_captions(chunk, max_tokens)
            cut += chunk_cut
            tokens, lengths = pad_tokens(token_lists)
            words, caption_gram, pooled = self.text_runner.run(
                {"tokens": tokens, "lengths": lengths}
            )
            numbers = [f"line {j + 1}" for j in chunk_lines]
            check_encoded_texts(words, pooled, lengths, self.split.captions_path, numbers)
            arrays = {"words": words, "lengths": lengths, "caption_gram": caption_gram}
            ids = self.split.caption_ids(chunk_lines)
            writer.add({**arrays, "global": pooled}, ids, chunk)
            report("captions", len(chunk), len(captions))
        return cut


def _check_base(base: dict[str, Gallery], data, features_path: Path, captions_path) -> None:
    """Appended features must fit the galleries they extend: the same region count, and
    captions exactly when the gallery has a captions part."""
    regions = base["images"].shards[0].shape("regions")[1]
    if data.num_regions != regions:
        message = f"has {data.num_regions} regions per image, the gallery's images have {regions}"
        raise input_error(features_path, "shape", message)
    kept = "boxes" in base["images"].manifest
    if kept and image_boxes(features_path, data.num_images, data.num_regions) is None:
        message = "the gallery keeps boxes: the appended split needs its {split}_boxes.npy too"
        raise input_error(features_path, "boxes", message)
    if ("captions" in base) != (captions_path is not None):
        where = base["images"].path.parent
        message = (
            "has captions: append them too (--captions)"
            if "captions" in base
            else "has no captions part: append images only"
        )
        raise input_error(where, "captions", message)
