"""The engine cache and timing cache of ONNX Runtime's TensorRT execution provider: without them
every process rebuilds its TensorRT engines.

Sessions led by the TensorRT provider get both caches under `BUNDLE/engines/` (ONNX Runtime's
`trt_engine_cache_*` and `trt_timing_cache_*` provider options, docs/tensorrt.md), keyed like the
sidecars: the engine cache of a graph is
`{graph}.{precision}.ort{version}-trt{version}.{sm}.trtep.{sha12}.trt_cache/`, and the timing
cache, which ONNX Runtime documents as reusable across models on one GPU, is
`timing.trt{version}.{sm}.trt_cache/`. ONNX Runtime itself keys cached engines by model and
compute capability only; a cache it cannot deserialize (another TensorRT) is a one-line
UserError naming the folder to delete. The cache paths are never recorded in a sidecar: they are
keyed by the versions running when a session is created.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scan_deploy.engines.ort_providers import EXECUTION_PROVIDERS
from scan_deploy.engines.sidecar import engine_stem, version_tuple

from scan_deploy.choices import Provider
from scan_deploy.errors import UserError

LOG = logging.getLogger("scan_deploy.engines")
TRT_CACHE_SUFFIX = ".trt_cache"
# TensorRT provider options holding cache paths.
CACHE_PATHS = ("trt_engine_cache_path", "trt_timing_cache_path")
# Distributions that carry TensorRT's version: NVIDIA's pip wheels (`tensorrt` and its CUDA-major
# packages), and JetPack's python3-libnvinfer where it installs `tensorrt` package metadata.
TENSORRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu13",
    "tensorrt-cu12",
    "tensorrt-cu11",
    "tensorrt-cu13-libs",
    "tensorrt-cu12-libs",
)
# What ONNX Runtime's TensorRT provider says when a cached engine does not deserialize
# (onnxruntime tensorrt_execution_provider.cc): built by another TensorRT or for another GPU.
STALE_CACHE_MESSAGE = "could not deserialize engine from cache"


def tensorrt_version() -> str | None:
    """The TensorRT version installed for this Python (package metadata; `tensorrt` itself is
    never imported here), or None when no TensorRT distribution is found."""
    from importlib import metadata

    for name in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_tag(prefix: str, version: str | None) -> str:
    """`ort1.20.1`, `trt10.3.0` (three parts at most); `trt` alone when the version is unknown."""
    if not version:
        return prefix
    return prefix + ".".join(str(part) for part in version_tuple(version)[:3])


def tensorrt_cache_options(
    engines: Path,
    graph: str,
    precision: str,
    source_sha256: str,
    device_tag: str,
    ort_version: str,
    trt_version: str | None,
) -> dict[str, Any]:
    """The TensorRT provider's engine-cache and timing-cache options for one graph, as
    absolute paths under `engines`, keyed like the sidecars (see the module docstring)."""
    trt_tag = version_tag("trt", trt_version)
    backend_tag = f"{version_tag('ort', ort_version)}-{trt_tag}"
    stem = engine_stem(graph, precision, backend_tag, device_tag, "trtep", source_sha256)
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engines / f"{stem}{TRT_CACHE_SUFFIX}"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(engines / f"timing.{trt_tag}.{device_tag}{TRT_CACHE_SUFFIX}"),
    }


def make_cache_folders(caches: dict[str, Any]) -> bool:
    """Create the cache folders (ONNX Runtime creates only the last level, and refuses the
    session when it cannot); False, with a warning, when the file system refuses."""
    for key in CACHE_PATHS:
        try:
            Path(caches[key]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            LOG.warning(
                "%s: cannot create the TensorRT cache folder (%s): engines are rebuilt by "
                "every process",
                caches[key],
                exc.strerror or exc,
            )
            return False
    return True


def stale_cache_error(exc: Exception, caches: dict[str, Any]) -> UserError | None:
    """A one-line UserError for a session refused because a cached TensorRT engine does not
    deserialize (another TensorRT version or GPU), or None for any other failure."""
    if STALE_CACHE_MESSAGE not in str(exc) or "trt_engine_cache_path" not in caches:
        return None
    folder = caches["trt_engine_cache_path"]
    return UserError(
        f"{folder}: TensorRT cannot load an engine cached there (built by another TensorRT "
        "version or for another GPU): delete this folder, the next run rebuilds it"
    )


def session_with_caches(ort: Any, model: str, options: Any, providers: list[tuple]) -> Any:
    """`ort.InferenceSession`, with a stale TensorRT cache turned into a one-line UserError."""
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        for name, provider_options in providers:
            if name == EXECUTION_PROVIDERS[Provider.TENSORRT]:
                error = stale_cache_error(exc, provider_options)
                if error is not None:
                    raise error from None
        raise
