"""The SCAN "precomp" data format: `{split}_ims.npy` region features, `{split}_caps.txt` captions.

`{split}_ims.npy` holds float32 features of shape (images, regions, features), memory-mapped when
read so a 2 GB training split never has to fit in memory. `{split}_caps.txt` holds one caption per
line: five per image (caption j describes image j // 5) or one per image (UTF-8; a leading byte
order mark is dropped). The vocabulary is `{data_name}_vocab.json` in the same folder (the only
`*_vocab.json` file there when the data set's name is not known).

Every `.npy` file the package reads (features, gallery shards) is opened by `open_npy` /
`read_npy_header`: a file that is not a whole .npy file (a corrupt header, truncated, trailing
bytes) is a one-line UserError naming it. Numpy only: the runtime reads galleries through this
module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError

import numpy as np

from scan_deploy.atomic import atomic_path, write_text
from scan_deploy.errors import input_error

CAPTIONS_PER_IMAGE = (5, 1)
FEATURE_DTYPE = np.dtype("<f4")
_CHUNK_BYTES = 64 << 20  # how much of the memory-mapped features one finiteness check reads
# What numpy raises on a file that is not a whole .npy file: a flipped byte in the header alone
# gives ValueError, SyntaxError or tokenize.TokenError (the header is parsed as a Python literal).
_NPY_ERRORS = (ValueError, SyntaxError, TokenError, OSError, EOFError)


@dataclass(frozen=True, eq=False)
class PrecompSplit:
    """One split: memory-mapped region features and their captions."""

    images: np.ndarray  # (N, R, F) float32, memory-mapped
    captions: list[str]
    captions_per_image: int  # 5 or 1 (0: features read without captions)
    features_path: Path | None = None  # where `images` was read from, for error messages
    padded: bool = False  # some images have fewer regions than R (all-zero rows)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    def image_of_caption(self, j: int) -> int:
        """The index of the image that caption `j` describes."""
        if not 0 <= j < self.num_captions:
            raise IndexError(f"caption {j} out of range 0..{self.num_captions - 1}")
        return j // self.captions_per_image


def split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """The features file and the captions file of `split` in `data_dir`."""
    data_dir = Path(data_dir)
    return data_dir / f"{split}_ims.npy", data_dir / f"{split}_caps.txt"


def load_split(data_dir: str | Path, split: str, *, check_finite: bool = True) -> PrecompSplit:
    """Read and validate one split; the features stay memory-mapped."""
    ims_path, caps_path = split_paths(data_dir, split)
    _require_files(Path(data_dir), split, ims_path, caps_path)
    return load_files(ims_path, caps_path, check_finite=check_finite)


def load_files(
    ims_path: Path, caps_path: Path | None, *, check_finite: bool = True
) -> PrecompSplit:
    """Features (memory-mapped) and, unless `caps_path` is None, their captions, from any two
    files in the precomp format (without captions: an empty caption list, 0 per image)."""
    images = _open_features(Path(ims_path))
    padded = check_feature_values(images, Path(ims_path)) if check_finite else False
    if caps_path is None:
        return PrecompSplit(images, [], 0, Path(ims_path), padded)
    captions = read_captions(Path(caps_path))
    per_image = _captions_per_image(len(captions), images.shape[0], Path(caps_path), Path(ims_path))
    return PrecompSplit(images, captions, per_image, Path(ims_path), padded)


def image_ids(ims_path: Path, count: int) -> list[str]:
    """The ids of the images of a features file: the lines of `{split}_ids.txt` beside
    `{split}_ims.npy` when there is one (`data import-tsv` writes it), else the row numbers.
    The file must hold `count` unique, non-empty ids (a UserError names the line)."""
    ims_path = Path(ims_path)
    path = _beside(ims_path, "_ids.txt")
    if path is None or not path.is_file():
        return [str(i) for i in range(count)]
    ids = read_captions(path)  # one non-empty line each, UTF-8
    if len(ids) != count:
        message = f"has {len(ids)} ids for the {count} images of {ims_path.name}, expected one each"
        raise input_error(path, None, message)
    first: dict[str, int] = {}
    for number, image_id in enumerate(ids, start=1):
        if image_id in first:
            message = f"{image_id!r} again (first at line {first[image_id]}), expected unique ids"
            raise input_error(path, f"line {number}", message)
        first[image_id] = number
    return ids


def image_boxes(ims_path: Path, images: int, regions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The boxes (images, regions, 4) and image sizes (images, 2: width, height) written beside
    `{split}_ims.npy` by `data import-tsv` (`{split}_boxes.npy`, `{split}_image_sizes.npy`),
    memory-mapped, or None when the split has none; a UserError names a file of another shape."""
    ims_path = Path(ims_path)
    paths = _beside(ims_path, "_boxes.npy"), _beside(ims_path, "_image_sizes.npy")
    if not all(path is not None and path.is_file() for path in paths):
        return None
    arrays = []
    for path, shape in zip(paths, ((images, regions, 4), (images, 2)), strict=True):
        array = open_npy(path)
        if array.shape != shape:
            message = f"has shape {array.shape}, expected {shape} (those of {ims_path.name})"
            raise input_error(path, "shape", message)
        arrays.append(array)
    return arrays[0], arrays[1]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def images_folder(ims_path: Path) -> Path | None:
    """`{split}_images/` beside `{split}_ims.npy` (the image files, named by image id), or None."""
    folder = _beside(Path(ims_path), "_images")
    return folder if folder is not None and folder.is_dir() else None


def _beside(ims_path: Path, suffix: str) -> Path | None:
    """`{split}{suffix}` beside a `{split}_ims.npy` file; None for features named otherwise."""
    if not ims_path.name.endswith("_ims.npy"):
        return None
    return ims_path.with_name(ims_path.name.removesuffix("_ims.npy") + suffix)


def image_file(folder: Path, image_id: str) -> Path | None:
    """`folder/{image_id}.png` (or .jpg, .jpeg), or None."""
    for suffix in IMAGE_SUFFIXES:
        path = Path(folder) / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def find_vocab(data_dir: str | Path, data_name: str | None = None) -> Path:
    """The vocabulary in `data_dir`: `{data_name}_vocab.json` when the data set's name is known,
    otherwise the single `*_vocab.json` file there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise input_error(data_dir, None, "data directory not found")
    found = sorted(data_dir.glob("*_vocab.json"))
    if data_name is not None:
        path = data_dir / f"{data_name}_vocab.json"
        if path.is_file():
            return path
        expected = path.name
    elif len(found) == 1:
        return found[0]
    else:
        expected = "exactly one {data_name}_vocab.json"
    listed = ", ".join(p.name for p in found) if found else "none"
    raise input_error(data_dir, "vocab", f"expected {expected}, found {listed}")


def check_feature_dim(split: PrecompSplit, img_dim: int, source: str | Path | None) -> None:
    """Fail when a model configured in `source` expects `img_dim` features and the data differ."""
    if split.feature_dim != img_dim:
        where = f" in {split.features_path}" if split.features_path is not None else ""
        raise input_error(
            source,
            "img_dim",
            f"the model expects {img_dim} features per region, the data{where} "
            f"have {split.feature_dim}",
        )


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy file's header says: where the data start, their shape, dtype and order."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def read_npy_header(path: Path, fix: str = "") -> NpyHeader:
    """The header of the .npy file `path`, checked against the file's size. A file that is not a
    whole .npy file is a one-line UserError naming it (`fix`, e.g. ": re-run ...", is appended)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read(handle)
            offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
    except _NPY_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise input_error(path, "format", f"not a readable .npy file ({reason}){fix}") from None
    if dtype.hasobject:
        raise input_error(path, "dtype", f"holds Python objects, expected numbers{fix}")
    if any(n < 0 for n in shape):  # (1, -1, -1) passes the size check below, then np.memmap fails
        raise input_error(path, "shape", f"got {tuple(shape)}, expected sizes >= 0{fix}")
    needed = offset + math.prod(shape) * dtype.itemsize
    if size != needed:
        problem = "truncated" if size < needed else "has trailing bytes"
        array = f"{tuple(shape)} {dtype.name}"
        raise input_error(
            path, "size", f"{problem}: {size} bytes, its header's {array} array needs {needed}{fix}"
        )
    return NpyHeader(offset, tuple(shape), dtype, fortran_order)


def open_npy(path: Path, fix: str = "") -> np.ndarray:
    """The array of the .npy file `path`, memory-mapped read-only (checked by `read_npy_header`)."""
    header = read_npy_header(path, fix)
    order = "F" if header.fortran_order else "C"
    return np.memmap(path, header.dtype, "r", header.offset, header.shape, order)


def write_split(data_dir: str | Path, split: str, images: np.ndarray, captions: list[str]) -> None:
    """Write `images` (N, R, F) and `captions` (N or 5N lines) as one precomp split, atomically."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be 3-D (images, regions, features), got {images.shape}")
    chunks = (chunk for _, chunk in _chunks(images))
    write_split_chunks(data_dir, split, images.shape, chunks, captions)


def write_split_chunks(
    data_dir: str | Path,
    split: str,
    shape: tuple[int, int, int],
    chunks: Iterable[np.ndarray],
    captions: list[str],
) -> None:
    """Like `write_split`, but the features arrive as consecutive chunks of images.

    Lets a generator stream a large split to disk without holding it in memory.
    """
    num_images, regions, features = shape
    _validate_captions_to_write(captions, num_images)
    ims_path, caps_path = split_paths(data_dir, split)
    with atomic_path(ims_path, suffix=".npy") as tmp, open(tmp, "wb") as out:
        header = {"descr": FEATURE_DTYPE.str, "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(out, header)
        written = 0
        for chunk in chunks:
            if chunk.shape[1:] != (regions, features):
                raise ValueError(f"chunk shape {chunk.shape} does not match {shape}")
            out.write(np.ascontiguousarray(chunk, dtype=FEATURE_DTYPE).data)
            written += len(chunk)
        if written != num_images:
            raise ValueError(f"chunks hold {written} images, expected {num_images}")
    write_text(caps_path, "".join(c + "\n" for c in captions))


def _validate_captions_to_write(captions: list[str], num_images: int) -> None:
    if num_images < 1:
        raise ValueError("a split needs at least one image")
    if len(captions) not in (5 * num_images, num_images):
        raise ValueError(f"{len(captions)} captions for {num_images} images, expected 1x or 5x")
    for j, caption in enumerate(captions):
        if not caption.strip() or "\n" in caption or "\r" in caption:
            raise ValueError(f"caption {j} must be one non-empty line, got {caption!r}")


def _require_files(data_dir: Path, split: str, *paths: Path) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        expected = " and ".join(p.name for p in paths)
        raise input_error(
            data_dir,
            f"split {split!r}",
            f"missing {', '.join(missing)}; the precomp format expects {expected}",
        )


def _open_features(path: Path) -> np.ndarray:
    images = open_npy(path)
    if images.ndim != 3:
        raise input_error(
            path, "shape", f"got {images.shape}, expected 3-D (images, regions, features)"
        )
    if images.dtype != np.float32:
        raise input_error(path, "dtype", f"got {images.dtype}, expected float32")
    if images.shape[0] == 0:
        raise input_error(path, "shape", "holds zero images, expected at least one")
    if 0 in images.shape[1:]:
        raise input_error(path, "shape", f"got {images.shape}, expected regions and features > 0")
    return images


def check_feature_values(
    images: np.ndarray, source: str | Path | None, field: str = "features", first: int = 0
) -> bool:
    """Scan (memory-mapped) features (images, regions, features) in bounded chunks; a one-line
    UserError names `source` and the first image with NaN or Inf values, or with no region (all
    its rows zero: a padded region is an all-zero row, `scan_deploy.scoring.region_mask`);
    `first`: the number of `images[0]` in `source` (a slice's). Returns whether any image is
    padded (has an all-zero row)."""
    padded = False
    for start, chunk in _chunks(images, first):
        bad = ~np.isfinite(chunk).all(axis=(1, 2))
        if bad.any():
            image = start + int(np.argmax(bad))
            raise input_error(source, field, f"image {image} has NaN or Inf values")
        empty = ~chunk.any(axis=(1, 2))
        if empty.any():
            image = start + int(np.argmax(empty))
            message = f"image {image} has no regions (all its features are zero)"
            raise input_error(source, field, message)
        padded = padded or not chunk.any(axis=2).all()
    return padded


def _chunks(images: np.ndarray, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Consecutive runs of whole images, about `_CHUNK_BYTES` each, read one at a time, with
    the number of their first image (counted from `first`)."""
    image_bytes = int(np.prod(images.shape[1:])) * images.itemsize
    rows = max(1, _CHUNK_BYTES // max(1, image_bytes))
    for start in range(0, images.shape[0], rows):
        yield first + start, np.asarray(images[start : start + rows])


def read_captions(path: Path) -> list[str]:
    """One caption (or id) a line (UTF-8, a BOM dropped); an empty line is a UserError naming
    it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise input_error(path, "encoding", f"expected UTF-8 text ({exc.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last caption
    captions = [line.strip() for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption:
            raise input_error(path, f"line {number}", "empty caption, expected one caption a line")
    return captions


def _captions_per_image(num_captions: int, num_images: int, caps_path: Path, ims_path: Path) -> int:
    for per_image in CAPTIONS_PER_IMAGE:
        if num_captions == per_image * num_images:
            return per_image
    raise input_error(
        caps_path,
        "captions",
        f"got {num_captions} captions for the {num_images} images of {ims_path.name}, "
        f"expected {5 * num_images} (5 per image) or {num_images} (1 per image)",
    )
