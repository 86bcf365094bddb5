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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

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
    check_feature_dim,
    image_boxes,
    image_ids,
    images_folder,
    load_files,
)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


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
) -> dict[str, dict[str, Any]]:
    """Write the gallery folder `out`; returns the manifest written for each kind (its `count`,
    `first_stages` records, ...). `first_stages`:
    the FAISS index of each first stage for `query --shortlist`, by index-factory string (None:
    the default; `runtime.first_stage`), in both galleries. `base`: the galleries (by kind)
    the new ones extend (`runtime.generations.append_gallery`: their items first, then these;
    their dtype, shard size and first stages kept)."""
    report = progress or (lambda stage, done, total: None)
    out = Path(out)
    checkpoint = getattr(backend, "checkpoint", None)  # the torch backend's
    inputs = [p for p in (features_path, captions_path, bundle.path, checkpoint) if p is not None]
    check_output_dir(out, force, replace(MARKER, file=f"images/{MARKER.file}"), inputs)
    data = load_files(features_path, captions_path)  # checks NaN/Inf in bounded chunks
    bundle.check_regions(data.num_regions, data.padded, features_path, "shape")
    if base is not None:
        _check_base(base, data, features_path, captions_path)
    check_feature_dim(data, bundle.config.img_dim, bundle.path / "manifest.json")
    n, dim = len(data.images), int(bundle.config.embed_size)
    stages = check_stages(first_stages or {}, dim, n, n * data.num_regions, out / "images")
    features, captions, per_image = data.images, data.captions, data.captions_per_image
    names = image_ids(features_path, n)
    if base is not None:
        known = set(base["images"].ids)
        clash = next((name for name in names if name in known), None)
        if clash is not None:
            message = f"image {clash!r} is already in the gallery (ids must stay unique)"
            raise input_error(features_path, "ids", message)
    runner = backend.runner("image_encoder")  # both graphs opened (and checked) before any work
    text_runner = backend.runner("text_encoder") if captions else None
    sizes = CallSizes.of(backend)
    with atomic_dir(out) as tmp:
        images = GalleryWriter(
            tmp / "images",
            "images",
            bundle,
            dtype,
            shard_size,
            first_stages=stages,
            where=out / "images",
            boxes=image_boxes(features_path, n, data.num_regions),
            images_dir=images_folder(features_path),
            base=None if base is None else base["images"],
        )
        with images as writer:
            for start in range(0, len(features), sizes.image_batch):
                batch = np.asarray(features[start : start + sizes.image_batch], np.float32)
                regions, region_gram, pooled = runner.run({"features": batch})
                check_encoded_images(batch, regions, pooled, features_path, start)
                ids = [names[i] for i in ids_range(start, batch)]
                texts = (
                    [captions[i * per_image] for i in ids_range(start, batch)] if captions else None
                )
                writer.add(
                    {"regions": regions, "region_gram": region_gram, "global": pooled}, ids, texts
                )
                report("images", len(batch), len(features))
        manifests = {"images": images.manifest}
        if captions:
            writer = GalleryWriter(
                tmp / "captions",
                "captions",
                bundle,
                dtype,
                shard_size,
                first_stages=stages,
                where=out / "captions",
                base=None if base is None else base["captions"],
            )
            _index_captions(writer, bundle, text_runner, captions_path, data, names, report, sizes)
            manifests["captions"] = writer.manifest
    return manifests


def ids_range(start: int, batch: np.ndarray) -> range:
    return range(start, start + len(batch))


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


def _index_captions(writer, bundle, runner, captions_path, data, names, report, sizes) -> None:
    captions, per_image, cut = data.captions, data.captions_per_image, 0
    with writer:
        for start in range(0, len(captions), sizes.text_batch):
            chunk = captions[start : start + sizes.text_batch]
            token_lists, chunk_cut = bundle.encode_captions(chunk, sizes.max_tokens)
            cut += chunk_cut
            tokens, lengths = pad_tokens(token_lists)
            words, caption_gram, pooled = runner.run({"tokens": tokens, "lengths": lengths})
            lines = [f"line {j + 1}" for j in range(start, start + len(chunk))]
            check_encoded_texts(words, pooled, lengths, captions_path, lines)
            arrays = {"words": words, "lengths": lengths, "caption_gram": caption_gram}
            rows = range(start, start + len(chunk))
            ids = [f"{names[j // per_image]}:{j % per_image}" for j in rows]
            writer.add({**arrays, "global": pooled}, ids, chunk)
            report("captions", len(chunk), len(captions))
    bundle.warn_cut(cut, len(captions), "captions", sizes.max_tokens)
