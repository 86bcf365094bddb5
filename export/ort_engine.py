"""ONNX Runtime "engines": a graph optimized offline for one execution provider, serialized with
`SessionOptions.optimized_model_filepath`, plus the session settings that recreate it.

ONNX Runtime's graph-optimization docs: an offline-optimized model must be run with the same
options, execution providers and hardware it was optimized for, and layout optimizations
(`ORT_ENABLE_ALL`) tie it to the CPU's instruction set (AVX2, ...); so the sidecar records the
provider, the ONNX Runtime version and the CPU model or GPU. The optimization level per provider:
- cpu: `ORT_ENABLE_ALL` (layout optimizations apply to CPU nodes only);
- cuda: `ORT_ENABLE_EXTENDED` (extended fusions run after partitioning, on CPU and CUDA nodes);
- tensorrt: `ORT_ENABLE_BASIC`, optimized with the CPU provider: basic rewrites run before
  partitioning and suit every provider, while ONNX Runtime refuses to serialize a model with nodes
  compiled by the TensorRT provider (onnxruntime#5840). TensorRT engines are then built by the
  provider itself when the runtime first creates the session, and cached: `load_session` adds
  the engine-cache and timing-cache options keyed like the sidecars, by the running ONNX Runtime,
  TensorRT and GPU (`scan_deploy.runtime.backends.onnxruntime_backend.tensorrt_cache_options`,
  docs/tensorrt.md), so a TensorRT upgrade gets a fresh cache instead of one it cannot read.
The TensorRT provider gets `trt_fp16_enable`/`trt_int8_enable` off: with TensorRT >= 10 it then
builds a strongly typed network (onnxruntime `tensorrt_execution_provider.cc`, #24298), so the
FP16 and Q/DQ graphs keep the precision they carry (the flags were needed for Q/DQ graphs only
with TensorRT 8, onnxruntime#13381).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import onnxruntime as ort
from scan_deploy.export.build_engine import (
    MIB,
    Artifact,
    BuildOptions,
    base_sidecar,
    graph_profiles,
)
from scan_deploy.export.engine_profiles import Profile
from scan_deploy.runtime.backends.onnxruntime_backend import (
    make_cache_folders,
    session_with_caches,
    tensorrt_cache_options,
    tensorrt_version,
)

from scan_deploy.bundle import Bundle
from scan_deploy.cuda_device import DeviceInfo, cpu_device, current_device
from scan_deploy.engine_sidecar import (
    EXECUTION_PROVIDERS,
    check_engine_file,
    check_sidecar,
    engine_stem,
    read_sidecar,
    sidecar_path,
    version_tuple,
)
from scan_deploy.errors import UserError, one_of

OPTIMIZATION_LEVELS = {
    "cpu": "ORT_ENABLE_ALL",
    "cuda": "ORT_ENABLE_EXTENDED",
    "tensorrt": "ORT_ENABLE_BASIC",
}
# Providers the optimized model is produced with (see the module docstring for tensorrt).
OPTIMIZE_WITH = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["CPUExecutionProvider"],
}
TARGETS = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "trtep"}
# TensorRT provider options holding cache paths: never recorded in the sidecar (the caches are
# keyed by the running versions when a session is created), replaced when an older sidecar has them.
CACHE_PATHS = ("trt_engine_cache_path", "trt_timing_cache_path")


def check_provider(provider: str, available: list[str] | None = None) -> str:
    """The execution provider's name; a one-line UserError when this onnxruntime lacks it."""
    name = EXECUTION_PROVIDERS[provider]
    available = ort.get_available_providers() if available is None else available
    if name not in available:
        extra = " and TensorRT" if provider == "tensorrt" else ""
        raise UserError(
            f"--provider {provider}: onnxruntime {ort.__version__} has no {name} "
            f"(it has {', '.join(available)}): pip install onnxruntime-gpu{extra}"
        )
    return name


def provider_device(provider: str) -> DeviceInfo:
    return cpu_device() if provider == "cpu" else current_device()


def ort_stem(
    graph: str, precision: str, source_sha256: str, provider: str, device: DeviceInfo
) -> str:
    version = ".".join(str(p) for p in version_tuple(ort.__version__)[:3])
    device_tag = platform.machine().lower() if provider == "cpu" else device.sm
    return engine_stem(
        graph, precision, f"ort{version}", device_tag, TARGETS[provider], source_sha256
    )


def tensorrt_ep_options(profiles: list[Profile], options: BuildOptions) -> dict:
    """Options of ONNX Runtime's TensorRT provider recorded in the sidecar: the explicit
    profile, the workspace and no FP16/INT8 flags. The caches are added by `load_session`."""
    if len(profiles) > 1:
        raise UserError(
            "--provider tensorrt: give one optimization profile (each shape option once)"
        )
    result: dict[str, Any] = {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
    }
    for which in ("min", "opt", "max"):
        result[f"trt_profile_{which}_shapes"] = profiles[0].trtexec(which)
    if options.workspace_mib is not None:
        result["trt_max_workspace_size"] = options.workspace_mib * MIB
    return result


def session_providers(provider: str, ep_options: dict[str, Any]) -> list[list]:
    """The provider list the runtime creates its session with, most preferred first."""
    chain = {
        "cpu": [["CPUExecutionProvider", {}]],
        "cuda": [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]],
        "tensorrt": [
            ["TensorrtExecutionProvider", ep_options],
            ["CUDAExecutionProvider", {}],
            ["CPUExecutionProvider", {}],
        ],
    }
    return chain[provider]


def optimize_graph(source: Path, target: Path, provider: str) -> None:
    """Write `source` optimized for `provider` to `target` (ONNX Runtime's offline mode)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[provider]
    )
    options.optimized_model_filepath = str(target)
    # Errors only: ONNX Runtime warns that an ORT_ENABLE_ALL model is hardware specific, which
    # the sidecar records and the loader checks.
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=OPTIMIZE_WITH[provider])
    if not target.is_file():
        raise UserError(f"{source}: ONNX Runtime did not write the optimized model")


def build_ort_engines(bundle: Bundle, options: BuildOptions, stage: Path) -> list[Artifact]:
    """Optimize each graph into `stage`; returns the artifacts with their sidecars."""
    check_provider(options.provider)
    device = provider_device(options.provider)
    artifacts = []
    for graph in options.graphs:
        entry = bundle.graph(graph, options.precision)
        stem = ort_stem(graph, options.precision, entry["sha256"], options.provider, device)
        profiles = graph_profiles(bundle, graph, options) if options.provider == "tensorrt" else []
        ep_options = (
            tensorrt_ep_options(profiles, options) if options.provider == "tensorrt" else {}
        )
        optimize_graph(bundle.path / entry["file"], stage / f"{stem}.onnx", options.provider)
        sidecar = base_sidecar(
            bundle, graph, options.precision, "onnxruntime", ort.__version__, device
        )
        sidecar["provider"] = options.provider
        sidecar["profiles"] = [p.to_json() for p in profiles]
        sidecar["build"] = {
            "cli": options.cli_args(),
            "execution_provider": EXECUTION_PROVIDERS[options.provider],
            "graph_optimization_level": OPTIMIZATION_LEVELS[options.provider],
            # The graph is already optimized: the docs' advice is to disable optimizations when
            # loading an offline-optimized model.
            "session": {
                "graph_optimization_level": "ORT_DISABLE_ALL",
                "providers": session_providers(options.provider, ep_options),
            },
        }
        artifacts.append(Artifact(stem, ".onnx", sidecar))
    return artifacts


def load_session(
    path: str | Path, bundle: Bundle, precision: str | None = None, threads: int = 0
) -> ort.InferenceSession:
    """An InferenceSession on an optimized model, after checking its sidecar against the
    bundle, the running onnxruntime, its providers and the device."""
    path = Path(path)
    sidecar = read_sidecar(sidecar_path(path))
    provider = one_of(sidecar.get("provider"), EXECUTION_PROVIDERS, "provider", sidecar_path(path))
    check_provider(provider)
    device = provider_device(provider)
    check_sidecar(
        sidecar,
        path,
        bundle,
        backend="onnxruntime",
        backend_version=ort.__version__,
        device=device,
        precision=precision,
    )
    check_engine_file(path, sidecar)
    level, chain = _session_settings(sidecar, sidecar_path(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    providers = []
    for name, provider_options in chain:
        resolved = {k: v for k, v in provider_options.items() if k not in CACHE_PATHS}
        if name == EXECUTION_PROVIDERS["tensorrt"]:
            resolved.pop("trt_engine_cache_enable", None)
            resolved.pop("trt_timing_cache_enable", None)
            caches = artifact_cache_options(path.parent, sidecar, device)
            if make_cache_folders(caches):
                resolved.update(caches)
        providers.append((name, resolved))
    return session_with_caches(ort, str(path), options, providers)


def artifact_cache_options(engines: Path, sidecar: dict[str, Any], device: DeviceInfo) -> dict:
    """The TensorRT provider's cache options for a build-engine artifact: keyed by its graph,
    precision and source graph, and by the running ONNX Runtime, TensorRT and GPU."""
    return tensorrt_cache_options(
        engines,
        sidecar["graph"],
        sidecar["precision"],
        sidecar["source"]["sha256"],
        device.sm,
        ort.__version__,
        tensorrt_version(),
    )


def _session_settings(sidecar: dict[str, Any], path: Path) -> tuple[Any, list]:
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
