"""Galleries that change: `index --append` adds items, `delete` marks items deleted, `compact`
drops them, and each change is a new generation of the gallery, switched to atomically.

    GALLERY/images/, captions/                generation 0, as `index` wrote it
    GALLERY/generations/000001/images/, ...   a later generation (a complete gallery folder)
    GALLERY/CURRENT                           {"format_version": 1, "generation": 1,
                                               "path": "generations/000001"}

A generation never changes once written. The next one links the shard files of the one before
(hard links: shards are immutable, so nothing is copied), adds shards for the items appended,
rewrites the ids, texts, boxes, tombstones (`deleted.json`: the deleted items' positions,
skipped by every search) and manifest, and extends the first-stage FAISS indexes with the new
vectors (their training kept). Readers (`open_galleries`, `Retriever.open`) read CURRENT once and
open that generation: a consistent snapshot whatever a writer does meanwhile (`serve` looks
again every few seconds and switches: `serve.live`).

A writer holds an exclusive lock on `GALLERY/.lock` (one writer at a time), writes the new
generation into a temp folder renamed into place (`atomic_dir`), and only then replaces CURRENT
(temp file + rename). Killed at any point (kill -9), it leaves the previous generation current
and whole (tests/runtime/test_generations.py kills it at every step); the next writer sweeps
what was left. Finished generations are kept until `prune_generations` (`scan-deploy prune`)
removes those before the current one that no reader holds: a reader takes a shared flock on
`GALLERY/.readers/NNNNNN` before it opens generation N and keeps it until its galleries are
closed (`Lease`; the kernel drops it when the process ends, however it ends).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from scan_deploy.runtime.gallery import Gallery, Verify, open_gallery
from scan_deploy.runtime.gallery_format import KINDS
from scan_deploy.runtime.gallery_writer import GalleryWriter

from scan_deploy.atomic import _kill_point, atomic_dir, write_json
from scan_deploy.bundle import Bundle
from scan_deploy.errors import input_error
from scan_deploy.jsonfile import read_json_object, typed

LOG = logging.getLogger(__name__)
CURRENT = "CURRENT"
GENERATIONS = "generations"
LOCK = ".lock"
READERS = ".readers"  # a lease file per generation read: `Lease`


def current_generation(root: Path) -> tuple[int, Path]:
    """(number, folder) of the generation CURRENT names: generation 0 is `root` itself."""
    root = Path(root)
    pointer = root / CURRENT
    if not pointer.exists():
        return 0, root
    record = read_json_object(pointer, "a gallery's current-generation pointer")
    number = typed(record.get("generation"), int, "generation", pointer)
    folder = root / typed(record.get("path"), str, "path", pointer)
    if number < 1 or folder.parent != root / GENERATIONS or not folder.is_dir():
        raise input_error(pointer, "path", f"names {folder}, not a generation of {root}")
    return number, folder


def open_galleries(root: str | Path, verify: Verify = True) -> dict[str, Gallery]:
    """The `images/` and `captions/` galleries (by kind) of a gallery folder, in its current
    generation, leased (`Lease`) until they are closed."""
    return open_current(root, verify)[1]


class Lease:
    """A reader's hold on the generation it opened: a shared flock on GALLERY/.readers/NNNNNN,
    which `prune_generations` never removes a generation under. Released by `close()` (the
    galleries' `close`), or by the kernel when the process ends, however it ends."""

    def __init__(self, file: IO[str]) -> None:
        self._file: IO[str] | None = file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lease_file(root: Path, number: int) -> Path:
    return root / READERS / f"{number:06d}"


def _lease(root: Path, number: int) -> Lease | None:
    """A shared lock on generation `number`'s lease file (writers create it: a reader without
    write access opens it read-only); None, with a warning, where there is none to take."""
    path = _lease_file(root, number)
    try:
        path.parent.mkdir(exist_ok=True)
        file = open(path, "a")  # noqa: SIM115 (held by the Lease)
    except OSError:
        try:
            file = open(path)  # noqa: SIM115
        except OSError as exc:
            LOG.warning("%s: no reader's lease (%s): prune may remove it", path, exc.strerror)
            return None
    try:
        fcntl.flock(file, fcntl.LOCK_SH)
    except OSError as exc:  # a file system without flock
        file.close()
        LOG.warning("%s: no reader's lease (%s): prune may remove it", path, exc.strerror)
        return None
    return Lease(file)


def _generation_folders(root: Path, number: int) -> list[Path]:
    """What generation `number` is on disk: `generations/NNNNNN`, or for generation 0 the
    `images/` and `captions/` folders `index` wrote in the gallery folder."""
    folders = [root / GENERATIONS / f"{number:06d}"] if number else [root / k for k in KINDS]
    return [folder for folder in folders if folder.is_dir()]


def generation_of(root: str | Path, galleries: dict[str, Gallery]) -> int:
    """The number of the generation of `root` that `galleries` (`open_galleries`) belong to."""
    folder = generation_folder(galleries).resolve()
    return 0 if folder == Path(root).resolve() else int(folder.name)


def generation_folder(galleries: dict[str, Gallery]) -> Path:
    """The folder of the generation `galleries` belong to (its `images/`, `captions/`), for
    `open_generation`."""
    return next(iter(galleries.values())).path.parent


def open_current(root: str | Path, verify: Verify = True) -> tuple[int, dict[str, Gallery]]:
    """(number, galleries by kind) of a gallery folder's current generation, leased: the lease
    is taken before the folder is opened, and a generation pruned in between is read again
    from CURRENT (only ever a newer one)."""
    root = Path(root)
    while True:
        number, folder = current_generation(root)
        lease = _lease(root, number)
        gone = lease is not None and not _generation_folders(root, number)
        if not (gone and current_generation(root)[0] != number):
            break
        lease.close()  # pruned after CURRENT was read: a newer one is current
    try:
        galleries = open_generation(folder, verify)
    except BaseException:
        if lease is not None:
            lease.close()
        raise
    for gallery in galleries.values():
        gallery.lease = lease
    return number, galleries


def open_generation(folder: str | Path, verify: Verify = True) -> dict[str, Gallery]:
    """The galleries (by kind) in one generation's folder, whichever generation is current."""
    folder = Path(folder)
    found = {kind: folder / kind for kind in KINDS if (folder / kind).is_dir()}
    if not found:
        raise input_error(folder, None, "not a gallery folder (expected images/ or captions/)")
    return {kind: open_gallery(path, verify) for kind, path in found.items()}


@contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """The gallery folder `root`'s writer's lock (one writer, or prune, at a time)."""
    if not (root / CURRENT).is_file() and not any((root / kind).is_dir() for kind in KINDS):
        raise input_error(root, None, "not a gallery folder (expected images/ or captions/)")
    with open(root / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def changing(root: Path) -> Iterator[tuple[dict[str, Gallery], Path]]:
    """Hold the writer's lock; yield the current galleries and the folder to write the next
    generation to (`atomic_dir` it); when the block ends normally the folder is made current.
    """
    root = Path(root)
    with _writer_lock(root):
        number, _ = current_generation(root)
        _prune_unfinished(root, number)
        base = open_galleries(root, verify=False)  # immutable: checked when it was written
        target = root / GENERATIONS / f"{number + 1:06d}"
        try:
            yield base, target
        finally:
            for gallery in base.values():
                gallery.close()
        _kill_point("generation:written", target)
        (root / READERS).mkdir(exist_ok=True)  # its lease file, for readers without write access
        _lease_file(root, number + 1).touch()
        pointer = {"format_version": 1, "generation": number + 1}
        write_json(root / CURRENT, {**pointer, "path": f"{GENERATIONS}/{target.name}"})
        _kill_point("generation:switched", target)


def append_gallery(
    bundle: Bundle,
    backend,
    root: Path,
    features_path: Path,
    captions_path: Path | None,
    progress=None,
    ray=None,
) -> dict[str, dict[str, Any]]:
    """Append the images of `features_path` (and their captions, when the gallery has a
    captions part) in a new generation; returns the manifests written (`index_gallery`'s, whose
    `ray` settings encode on Ray Data workers)."""
    from scan_deploy.runtime.indexer import index_gallery  # the indexer imports galleries

    with changing(Path(root)) as (base, target):
        for gallery in base.values():
            gallery.check_bundle(bundle)
        return index_gallery(
            bundle,
            backend,
            features_path,
            captions_path,
            target,
            progress=progress,
            base=base,
            ray=ray,
        )


def delete_items(root: Path, ids: Sequence[str]) -> dict[str, Any]:
    """Mark the items `ids` deleted in a new generation: an image id deletes the image and its
    captions (`image:k`), a caption id that caption; an id the gallery does not have, or one
    already deleted, is a UserError and nothing changes. Returns {kind: items deleted}."""
    root = Path(root)
    with changing(root) as (base, target):
        known = {kind: set(gallery.ids) for kind, gallery in base.items()}
        by_kind: dict[str, list[str]] = {kind: [] for kind in base}
        for item in dict.fromkeys(ids):
            kind = next((k for k in KINDS if item in known.get(k, ())), None)
            if kind is None:
                raise input_error(root, "delete", f"id {item!r}: not in the gallery")
            by_kind[kind].append(item)
        if "captions" in base and by_kind.get("images"):  # an image's live captions go with it
            captions, gone = base["captions"], set(by_kind["images"])
            asked = set(by_kind["captions"])
            by_kind["captions"] += [
                caption
                for caption, deleted in zip(captions.ids, captions.deleted_mask, strict=True)
                if caption.rpartition(":")[0] in gone and not deleted and caption not in asked
            ]
        with atomic_dir(target) as tmp:
            for kind, gallery in base.items():
                writer = GalleryWriter(
                    tmp / kind, kind, None, base=gallery, delete=by_kind[kind], where=root / kind
                )
                writer.close()
    return {kind: len(items) for kind, items in by_kind.items()}


def compact_gallery(root: Path) -> dict[str, int]:
    """A new generation without the deleted items: the live ones written again in order, the
    first-stage indexes rebuilt (positions change). Returns {kind: items kept}."""
    root = Path(root)
    with changing(root) as (base, target):
        if not any(len(gallery.deleted) for gallery in base.values()):
            raise input_error(root, "deleted", "no deleted items: nothing to compact")
        with atomic_dir(target) as tmp:
            for kind, gallery in base.items():
                GalleryWriter(
                    tmp / kind, kind, None, base=gallery, compact=True, where=root / kind
                ).close()
    return {kind: gallery.live_count for kind, gallery in base.items()}


def prune_generations(root: Path) -> dict[str, Any]:
    """Remove the generations before the current one that no reader holds (`Lease`), under
    the writer's lock; returns {"removed": [numbers], "in_use": [numbers], "current": N,
    "freed_bytes": bytes of files no other generation shares}."""
    root = Path(root)
    removed, in_use, freed = [], [], 0
    with _writer_lock(root):
        current, _ = current_generation(root)
        for number in range(current):
            folders = _generation_folders(root, number)
            if not folders:
                continue
            (root / READERS).mkdir(exist_ok=True)
            lease_file = _lease_file(root, number)
            with open(lease_file, "a") as held:
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    in_use.append(number)
                    continue
                freed += sum(_unshared_bytes(folder) for folder in folders)
                aside = [root / GENERATIONS / f".pruned-{number:06d}-{f.name}" for f in folders]
                (root / GENERATIONS).mkdir(exist_ok=True)
                for folder, target in zip(folders, aside, strict=True):
                    os.replace(folder, target)  # gone from readers at once, whole
                lease_file.unlink()
                for target in aside:  # a removal cut short is swept by the next writer
                    shutil.rmtree(target)
            removed.append(number)
    return {"removed": removed, "in_use": in_use, "current": current, "freed_bytes": freed}


def _unshared_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` that no other generation links to."""
    return sum(
        status.st_size
        for path in folder.rglob("*")
        if path.is_file() and (status := path.stat()).st_nlink == 1
    )


def _prune_unfinished(root: Path, current: int) -> None:
    """Remove what a killed writer left: generations it wrote but never made current (numbered
    past `current`) and temp folders. Finished generations stay: a reader may still use one."""
    folder = root / GENERATIONS
    for path in folder.iterdir() if folder.is_dir() else []:
        if not (path.name.isdigit() and int(path.name) <= current):
            shutil.rmtree(path, ignore_errors=True)
