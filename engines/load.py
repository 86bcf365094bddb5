"""Loading engines: finding the ones `scan-deploy build-engine` wrote for a graph by their
sidecars, and loading one after checking its sidecar against the bundle, the running backend and
its version, and the device. A stale engine is refused (one-line UserError with the command that
rebuilds it), never run.

- TensorRT (`load_engine`): the plan, deserialized by `tensorrt_api.deserialize_engine`.
- ONNX Runtime (`load_session`): a graph optimized offline for one execution provider, run with
  the session settings its sidecar records (`build.session`: the optimization level and the
  provider list). Sessions led by the TensorRT provider get the engine and timing caches keyed
  by the running ONNX Runtime, TensorRT and GPU (`ort_cache`), never the paths a sidecar may
  record, so a TensorRT upgrade gets a fresh cache instead of one it cannot read.

Torch-free and onnx-free: TensorRT or onnxruntime is imported when an engine of its kind loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scan_deploy.engines import tensorrt_api
from scan_deploy.engines.cuda_device import DeviceInfo, current_device
from scan_deploy.engines.ort_cache import (
    CACHE_PATHS,
    make_cache_folders,
    session_with_caches,
    tensorrt_cache_options,
    tensorrt_version,
)
from scan_deploy.engines.ort_providers import (
    EXECUTION_PROVIDERS,
    check_provider,
    import_onnxruntime,
    provider_device,
)
from scan_deploy.engines.sidecar import (
    ENGINES_DIR,
    build_engine_command,
    check_engine_file,
    check_sidecar,
    read_sidecar,
    sidecar_path,
)

from scan_deploy.bundle import Bundle
from scan_deploy.choices import Backend, Graph, Precision, Provider
from scan_deploy.errors import UserError

LOG = logging.getLogger("scan_deploy.engines")


def find_engines(
    bundle: Bundle,
    backend: Backend,
    graph: Graph,
    precision: Precision,
    provider: Provider | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """The artifacts `scan-deploy build-engine` wrote under `BUNDLE/engines/` for this backend,
    graph, precision (and ONNX Runtime provider), newest first, with their sidecars. Only
    their sidecars are read here: whether one fits the running backend and device is for
    the loader to check. An unreadable sidecar is skipped with a warning."""
    folder = bundle.path / ENGINES_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            sidecar = read_sidecar(path)
        except UserError as exc:
            LOG.warning("ignoring %s", exc)
            continue
        if (sidecar["backend"], sidecar["graph"], sidecar["precision"]) != (
            backend,
            graph,
            precision,
        ):
            continue
        if provider is not None and sidecar.get("provider") != provider:
            continue
        name = sidecar["engine"].get("file")
        if not isinstance(name, str) or Path(name).name != name:
            name = path.with_suffix(".engine" if backend == Backend.TENSORRT else ".onnx").name
        engine = folder / name
        found.append((engine, sidecar, path.stat().st_mtime))
    found.sort(key=lambda item: (-item[2], item[0].name))
    return [(engine, sidecar) for engine, sidecar, _ in found]


def load_engine(path: str | Path, bundle: Bundle, precision: Precision | None = None) -> Any:
    """A TensorRT engine (`ICudaEngine`), deserialized after checking it against its sidecar,
    the bundle, the running TensorRT and the current GPU (a stale engine is refused with its
    rebuild command). The sidecar is read before TensorRT is imported."""
    path = Path(path)
    sidecar = read_sidecar(sidecar_path(path))
    check_sidecar(
        sidecar,
        path,
        bundle,
        backend=Backend.TENSORRT,
        backend_version=tensorrt_api.version(),
        device=current_device(),
        precision=precision,
    )
    check_engine_file(path, sidecar)
    build = sidecar["build"]
    return tensorrt_api.deserialize_engine(
        path,
        dla_core=build.get("dla_core"),
        # A version-compatible plan that embeds its lean runtime: host code TensorRT must load.
        host_code_allowed=bool(
            build.get("version_compatible") and not build.get("exclude_lean_runtime")
        ),
    )


def load_session(
    path: str | Path, bundle: Bundle, precision: Precision | None = None, threads: int = 0
) -> Any:
    """An `onnxruntime.InferenceSession` on an optimized model (an artifact of build-engine
    --backend onnxruntime), after checking its sidecar against the bundle, the running
    onnxruntime, its providers and the device."""
    path = Path(path)
    ort = import_onnxruntime()
    sidecar = read_sidecar(sidecar_path(path))
    provider = Provider.parse(sidecar.get("provider"), "provider", sidecar_path(path))
    check_provider(provider)
    device = provider_device(provider)
    check_sidecar(
        sidecar,
        path,
        bundle,
        backend=Backend.ONNXRUNTIME,
        backend_version=ort.__version__,
        device=device,
        precision=precision,
    )
    check_engine_file(path, sidecar)
    level, chain = _session_settings(ort, sidecar, sidecar_path(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    providers = []
    for name, provider_options in chain:
        resolved = {k: v for k, v in provider_options.items() if k not in CACHE_PATHS}
        if name == EXECUTION_PROVIDERS[Provider.TENSORRT]:
            resolved.pop("trt_engine_cache_enable", None)
            resolved.pop("trt_timing_cache_enable", None)
            caches = artifact_cache_options(path.parent, sidecar, device, ort.__version__)
            if make_cache_folders(caches):
                resolved.update(caches)
        providers.append((name, resolved))
    return session_with_caches(ort, str(path), options, providers)


def artifact_cache_options(
    engines: Path, sidecar: dict[str, Any], device: DeviceInfo, ort_version: str
) -> dict[str, Any]:
    """The TensorRT provider's cache options for a build-engine artifact: keyed by its graph,
    precision and source graph, and by the running ONNX Runtime, TensorRT and GPU."""
    return tensorrt_cache_options(
        engines,
        sidecar["graph"],
        sidecar["precision"],
        sidecar["source"]["sha256"],
        device.sm,
        ort_version,
        tensorrt_version(),
    )


def _session_settings(ort: Any, sidecar: dict[str, Any], path: Path) -> tuple[Any, list]:
    """The sidecar's `build.session`: the optimization level and the provider list, checked
    (a one-line UserError naming the sidecar and the field when malformed)."""
    session = sidecar["build"].get("session")
    if not isinstance(session, dict):
        raise UserError(f"{path}: build.session: expected an object")
    name = session.get("graph_optimization_level")
    level = getattr(ort.GraphOptimizationLevel, name, None) if isinstance(name, str) else None
    if not isinstance(level, ort.GraphOptimizationLevel):
        raise UserError(
            f"{path}: build.session.graph_optimization_level: got {name!r}, expected an "
            "ort.GraphOptimizationLevel name"
        )
    providers = session.get("providers")
    if not isinstance(providers, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], dict)
        and all(isinstance(p[1].get(key, ""), str) for key in CACHE_PATHS)
        for p in providers
    ):
        raise UserError(
            f"{path}: build.session.providers: expected a list of [name, options] pairs"
        )
    return level, providers


def engine_candidates(bundle: Bundle, graph: Graph, precision: Precision) -> list[Path]:
    """The TensorRT engine files of `graph` at `precision`, newest first; a UserError with the
    build-engine command when there is none."""
    found = [path for path, _ in find_engines(bundle, Backend.TENSORRT, graph, precision)]
    if not found:
        raise UserError(
            f"{bundle.path / 'engines'}: no TensorRT {precision} engine of {graph}; build it: "
            f"{build_engine_command(bundle.path, Backend.TENSORRT, precision, graph)}"
        )
    return found
