"""Joining Ray (the `ray` extra) for the commands that scale out: `serve --ray-actors` and
`index --ray-workers`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scan_deploy.choices import Provider
from scan_deploy.errors import UserError

INSTALL = "pip install 'scan-deploy[ray]'"


def require_ray(data: bool = False) -> Any:
    """The `ray` module (with `ray.data` imported when `data`), or a one-line UserError."""
    try:
        import ray

        if data:
            import ray.data  # needs pandas and pyarrow: ray[data]
    except ModuleNotFoundError as exc:
        what = "Ray Data" if data and exc.name != "ray" else "Ray"
        raise UserError(f"scale-out needs {what} ({exc.name} is missing): {INSTALL}") from None
    if data:
        _quiet_ray_data()
    return ray


def _quiet_ray_data() -> None:
    """Ray Data prints each run's plan and timings, and that its progress bars are off (the
    command shows its own), on stderr: keep that to errors; its log files still get all."""
    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            handler.setLevel(logging.ERROR)


@contextmanager
def ray_cluster(address: str | None = None) -> Iterator[Any]:
    """Connected to the Ray cluster at `address` (`ray start`, KubeRay: "auto" or HOST:PORT), or
    to a local instance started for the block when None; disconnected after. A connection the
    caller made before (`ray.init`) is used as it is and kept.

    Ray's logging is kept to errors and the workers' output stays in Ray's log files
    (`/tmp/ray/session_latest/logs`): what goes wrong reaches the user as an exception."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    local = {"include_dashboard": False} if address is None else {}
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
    try:
        yield ray
    finally:
        ray.shutdown()


def gpus_for(backend: Any) -> float:
    """The GPUs a Ray actor running the same backend as `backend` must reserve: one when it runs
    on a GPU (TensorRT, ONNX Runtime's CUDA or TensorRT provider, torch on CUDA), else none.
    Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES="")."""
    providers = getattr(backend, "providers", None)  # ONNX Runtime's, most preferred first
    if providers is not None:
        return 0.0 if providers[0] == Provider.CPU else 1.0
    device = getattr(backend, "device", None)  # torch's
    if device is not None:
        return 0.0 if getattr(device, "type", str(device)) == "cpu" else 1.0
    return 1.0  # TensorRT


def check_gpus(ray: Any, needed: float, what: str) -> None:
    """A one-line UserError when the cluster has fewer GPUs than `needed` (the actors would wait
    for them forever)."""
    have = float(ray.cluster_resources().get("GPU", 0))
    if needed > have:
        raise UserError(
            f"{what} need {needed:g} GPUs (the backend runs on a GPU: one each); "
            f"the Ray cluster has {have:g}"
        )


def first_line(exc: BaseException) -> str:
    """An exception's first line (Ray's carry tracebacks), or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
