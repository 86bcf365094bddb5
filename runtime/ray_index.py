"""`index --ray-workers N`: encode a large feature set on a pool of Ray Data workers (the `ray`
extra; Ray Data brings pandas and pyarrow).

The split is cut into the gallery's shards (`shard_size` images, then `shard_size` captions);
Ray Data streams these jobs to N actors (`ShardEncoder`), each holding a backend opened from the
bundle and the features memory-mapped from the same path (storage every node mounts at that
path). Each actor encodes its shard's items with the code one process uses
(`indexer.LocalEncoders`) into a one-shard gallery inside the gallery being written; the driver
then moves the shards in, in order (`GalleryWriter.adopt`), and writes the ids, texts, boxes,
manifests and first-stage indexes as `index` does. The result is the gallery one process writes:
the same shards, ids and texts, values equal to float rounding of the encoders' batch
composition (tests/runtime/test_ray_index.py).

The features are scanned for NaN/Inf and padding shard by shard, in the workers. A user error in
a shard (NaN features, an image with no regions, a caption the encoder cannot take) comes back
as its one-line message and stops the run (the jobs left are skipped, the shards being written
finish first); nothing is written. A worker that dies is restarted by Ray Data and its shard
encoded again, each attempt in a folder of its own, up to `ATTEMPTS` times a shard; then the run
stops with one line. A worker whose process dies while it starts (opening the backend) stops
the run at once (Ray Data's `max_consecutive_actor_init_deaths` is 0), also with one line.
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scan_deploy.runtime.gallery_writer import GalleryWriter
from scan_deploy.runtime.indexer import IndexInputs, LocalEncoders, Progress
from scan_deploy.runtime.ray_cluster import check_gpus, first_line, require_ray

from scan_deploy.atomic import _kill_point
from scan_deploy.bundle import Bundle
from scan_deploy.errors import UserError, input_error
from scan_deploy.precomp import check_feature_values

PARTS = ".parts"  # the workers' one-shard galleries, inside the gallery's temp folder
STOP = "STOP"  # in PARTS once a job failed: the workers skip the jobs left
# Ray Data restarts a worker whose process died and runs its shard again, without end: a
# shard that kills its worker every time (out of memory) stops the run after this many tries.
ATTEMPTS = 4


@dataclass(frozen=True)
class RayIndexing:
    """Encode on `workers` Ray actors, each opening `backend` at `precision` with `threads`
    threads (ONNX Runtime's intra-op threads, and the CPUs Ray reserves for each actor) and
    reserving `gpus` GPUs (`ray_cluster.gpus_for`: one for a backend on a GPU); `checkpoint`:
    the torch backend's."""

    workers: int
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 1
    checkpoint: str | None = None
    gpus: float = 0.0

    def __post_init__(self) -> None:
        for field, value in (("ray_workers", self.workers), ("threads", self.threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise input_error(None, field, f"expected an integer ≥ 1, got {value!r}")


def shard_jobs(split: IndexInputs, shard_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """One job per shard to write, by kind in the order given (images, then captions):
    {kind, shard, start, stop}."""
    totals = {"images": split.data.num_images, "captions": split.data.num_captions}
    return [
        {"kind": kind, "shard": shard, "start": start, "stop": min(start + size, totals[kind])}
        for kind, size in shard_sizes.items()
        for shard, start in enumerate(range(0, totals[kind], size))
    ]


def encode_on_ray(
    settings: RayIndexing,
    bundle: Bundle,
    split: IndexInputs,
    writers: dict[str, GalleryWriter],
    tmp: Path,
    out: Path,
    report: Progress,
) -> int:
    """Encode every shard of `split` on Ray Data actors and add them to `writers` in order;
    returns the number of captions cut to the engine's word limit."""
    ray = require_ray(data=True)
    if not ray.is_initialized():  # as Ray Data would: a local instance
        ray.init()
    check_gpus(ray, settings.workers * settings.gpus, f"{settings.workers} Ray Data workers")
    parts = tmp / PARTS
    parts.mkdir()
    jobs = shard_jobs(split, {kind: writer.shard_size for kind, writer in writers.items()})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command shows its own
    dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map(
        ShardEncoder,
        fn_constructor_kwargs={
            "bundle": str(bundle.path),
            "features": str(split.features_path),
            "captions": None if split.captions_path is None else str(split.captions_path),
            "parts": str(parts),
            "out": str(out),
            "dtype": str(writers["images"].dtype),
            "settings": settings,
        },
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        num_cpus=settings.threads,
        num_gpus=settings.gpus,
    )
    totals = {"images": split.data.num_images, "captions": split.data.num_captions}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    error = None
    for row in _rows(ray, dataset, parts):
        if row["error"] and error is None:
            # The workers skip the jobs left; the run ends once the shards being written are
            # (none may write into the temp folder after it is removed).
            error = row
            (parts / STOP).touch()
        elif error is None:
            done[row["kind"], row["shard"]] = row
            report(row["kind"], row["stop"] - row["start"], totals[row["kind"]])
    if error is not None:
        if error["bug"]:  # not the user's input: the worker's traceback
            raise RuntimeError(f"{error['kind']} shard {error['shard']}: {error['error']}")
        raise UserError(error["error"])
    for job in jobs:
        writers[job["kind"]].adopt(Path(done[job["kind"], job["shard"]]["path"]))
    shutil.rmtree(parts)
    return sum(row["cut"] for row in done.values())


def _rows(ray: Any, dataset: Any, parts: Path) -> Iterator[dict[str, Any]]:
    """The dataset's rows; Ray Data failing as a whole (a worker's process died while it
    started) is one line, after telling the workers left to stop."""
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as exc:
        (parts / STOP).touch()
        raise UserError(f"the Ray Data run failed: {first_line(exc)}") from None


class ShardEncoder:
    """A Ray Data actor: encodes shard jobs into one-shard galleries under `parts`. User errors
    (its own opening included) come back as the job's `error`, one line, as the driver shows
    them."""

    def __init__(
        self,
        bundle: str,
        features: str,
        captions: str | None,
        parts: str,
        out: str,
        dtype: str,
        settings: RayIndexing,
    ) -> None:
        from scan_deploy.runtime.backends import open_backend  # in the worker's process

        from scan_deploy.bundle import load_bundle

        self.parts, self.out, self.dtype = Path(parts), Path(out), dtype
        self.error: dict[str, Any] | None = None
        try:
            self.bundle = load_bundle(bundle)
            backend = open_backend(
                self.bundle,
                settings.backend,
                settings.precision,
                threads=settings.threads,
                checkpoint=settings.checkpoint,
            )
            captions_path = None if captions is None else Path(captions)
            self.split = IndexInputs.read(Path(features), captions_path, scan_values=False)
            self.encoders = LocalEncoders(self.bundle, backend, self.split)
        except Exception as exc:  # told with every job, as the driver shows errors
            self.error = _failure(exc)

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.error is not None:
            return {**job, "path": "", "cut": 0, **self.error}
        try:
            path, cut = self._encode(job)
        except Exception as exc:
            return {**job, "path": "", "cut": 0, **_failure(exc)}
        return {**job, "path": str(path), "cut": cut, "error": None, "bug": False}

    def _encode(self, job: dict[str, Any]) -> tuple[Path, int]:
        if (self.parts / STOP).exists():
            raise UserError("skipped: another shard failed")
        kind, rows = job["kind"], range(job["start"], job["stop"])
        attempt = _claim_attempt(self.parts / f"{kind}-{job['shard']:06d}", kind, rows)
        if kind == "images":
            data, features_path = self.split.data, self.split.features_path
            chunk = data.images[rows.start : rows.stop]
            padded = check_feature_values(chunk, features_path, first=rows.start)
            self.bundle.check_regions(data.num_regions, padded, features_path, "shape")
        path = attempt / kind
        writer = GalleryWriter(
            path, kind, self.bundle, self.dtype, len(rows), where=self.out / kind
        )
        with writer:
            if kind == "images":
                self.encoders.encode_images(rows, writer, _silent)
                cut = 0
            else:
                cut = self.encoders.encode_captions(rows, writer, _silent)
        _kill_point("ray_index:shard-written", attempt.parent)
        return path, cut


def _claim_attempt(folder: Path, kind: str, rows: range) -> Path:
    """A new folder for this attempt at a shard (`folder/attempt-N`: claimed by mkdir, so two
    runs of one job never share one, and no writer sweeps another's temps), or a UserError once
    the shard's workers died `ATTEMPTS` times."""
    folder.mkdir(exist_ok=True)
    for tried in range(ATTEMPTS):
        try:
            (folder / f"attempt-{tried}").mkdir()
        except FileExistsError:
            continue
        return folder / f"attempt-{tried}"
    raise UserError(
        f"{kind} {rows.start}..{rows.stop - 1}: the Ray worker encoding them died "
        f"{ATTEMPTS} times (out of memory? Ray's logs: /tmp/ray/session_latest/logs)"
    )


def _failure(exc: Exception) -> dict[str, Any]:
    """A job's error fields: a UserError, an OSError (a full disk, a file gone) or running out of
    memory is the user's one line; anything else is a bug, with the worker's traceback."""
    if isinstance(exc, UserError):
        return {"error": str(exc), "bug": False}
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return {"error": f"{where}{exc.strerror or exc}", "bug": False}
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():  # also CUDA's
        return {"error": f"out of memory in a Ray worker: {first_line(exc)}", "bug": False}
    return {"error": traceback.format_exc(), "bug": True}


def _silent(stage: str, done: int, total: int) -> None:
    """Workers report nothing: the driver counts finished shards."""
