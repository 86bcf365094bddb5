"""`scan-deploy build-engine`: one engine per graph of a bundle, for TensorRT or ONNX Runtime.

TensorRT: the decisions are made here, in pure Python, as a `BuildPlan` per graph (network flags
by TensorRT major version, optimization profiles, memory pool, builder flags, DLA and hardware
compatibility); `engines.tensorrt_api` only applies a plan with the real API. Precision lives in
the graph (docs/design.md §4): engines are strongly typed and no FP16/INT8 builder flag or
calibrator is ever set.

ONNX Runtime "engines": a graph optimized offline for one execution provider, serialized with
`SessionOptions.optimized_model_filepath`, plus the session settings that recreate it
(`engines.load.load_session`). ONNX Runtime's graph-optimization docs: an offline-optimized model
must be run with the same options, execution providers and hardware it was optimized for, and
layout optimizations (`ORT_ENABLE_ALL`) tie it to the CPU's instruction set (AVX2, ...); so the
sidecar records the provider, the ONNX Runtime version and the CPU model or GPU. The
optimization level per provider:
- cpu: `ORT_ENABLE_ALL` (layout optimizations apply to CPU nodes only);
- cuda: `ORT_ENABLE_EXTENDED` (extended fusions run after partitioning, on CPU and CUDA nodes);
- tensorrt: `ORT_ENABLE_BASIC`, optimized with the CPU provider: basic rewrites run before
  partitioning and suit every provider, while ONNX Runtime refuses to serialize a model with nodes
  compiled by the TensorRT provider (onnxruntime#5840). TensorRT engines are then built by the
  provider itself when the runtime first creates the session, and cached (`engines.ort_cache`,
  docs/tensorrt.md).
The TensorRT provider gets `trt_fp16_enable`/`trt_int8_enable` off: with TensorRT >= 10 it then
builds a strongly typed network (onnxruntime `tensorrt_execution_provider.cc`, #24298), so the
FP16 and Q/DQ graphs keep the precision they carry (the flags were needed for Q/DQ graphs only
with TensorRT 8, onnxruntime#13381).

Everything is built into a hidden staging folder under `BUNDLE/engines/` first; only when every
graph has built is each engine moved into place and its sidecar written (both atomically), so a
failed build leaves nothing half-written. Should a crash fall between an engine and its sidecar,
the loader's sha256 check refuses the pair.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scan_deploy.engines import tensorrt_api
from scan_deploy.engines.cuda_device import DeviceInfo, current_device
from scan_deploy.engines.ort_providers import (
    EXECUTION_PROVIDERS,
    check_provider,
    import_onnxruntime,
    provider_device,
)
from scan_deploy.engines.profiles import Profile, build_profiles, parse_shapes
from scan_deploy.engines.sidecar import (
    BACKENDS,
    ENGINES_DIR,
    FORMAT_VERSION,
    engine_stem,
    sidecar_path,
    version_tuple,
)

from scan_deploy import __version__
from scan_deploy.atomic import FILE_MODE, atomic_path, write_json
from scan_deploy.bundle import Bundle, sha256_file
from scan_deploy.choices import Backend, Graph, Precision, Provider
from scan_deploy.errors import UserError

MIB = 1 << 20


@dataclass(frozen=True)
class BuildOptions:
    """What to build (the options of `build-engine`), validated on creation; the choices are
    taken as members or their values and kept as members."""

    backend: Backend = Backend.TENSORRT
    precision: Precision = Precision.FP32
    graphs: tuple[Graph, ...] = tuple(Graph)
    provider: Provider = Provider.CPU
    min_shapes: tuple[str, ...] = ()
    opt_shapes: tuple[str, ...] = ()
    max_shapes: tuple[str, ...] = ()
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    dla_core: int | None = None
    hardware_compat: bool = False
    version_compatible: bool = False
    exclude_lean_runtime: bool = False

    def __post_init__(self) -> None:
        parsed = {
            "backend": Backend.parse(self.backend, "backend", among=BACKENDS),
            "precision": Precision.parse(self.precision, "precision"),
            "graphs": tuple(Graph.parse(graph, "graphs") for graph in self.graphs),
            "provider": Provider.parse(self.provider, "provider"),
        }
        for name, value in parsed.items():
            object.__setattr__(self, name, value)
        if not self.graphs:
            raise UserError(f"graphs: expected one or more of {', '.join(Graph)}")
        for k, graph in enumerate(self.graphs):
            if graph in self.graphs[:k]:
                raise UserError(f"graphs: {graph} is given twice")
        tensorrt_only = {
            "timing_cache": self.timing_cache is not None,
            "dla_core": self.dla_core is not None,
            "hardware_compat": self.hardware_compat,
            "version_compatible": self.version_compatible,
            "exclude_lean_runtime": self.exclude_lean_runtime,
        }
        profile_options = {
            "min_shapes": bool(self.min_shapes),
            "opt_shapes": bool(self.opt_shapes),
            "max_shapes": bool(self.max_shapes),
            "workspace_mib": self.workspace_mib is not None,
        }
        if self.backend == Backend.TENSORRT and self.provider != Provider.CPU:
            raise UserError("provider: applies to backend onnxruntime")
        if self.backend == Backend.ONNXRUNTIME:
            for name, given in tensorrt_only.items():
                if given:
                    raise UserError(f"{name}: applies to backend tensorrt")
            if self.provider != Provider.TENSORRT:
                for name, given in profile_options.items():
                    if given:
                        raise UserError(f"{name}: applies to backend tensorrt or provider tensorrt")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UserError(f"workspace_mib: expected a size in MiB >= 1, got {self.workspace_mib}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise UserError(f"dla_core: expected a core index >= 0, got {self.dla_core}")
            if self.precision == Precision.FP32:
                raise UserError(
                    "dla_core: DLA runs FP16 and INT8 only; build the fp16 or int8 graph "
                    "(precision fp16)"
                )
        if self.exclude_lean_runtime and not self.version_compatible:
            raise UserError("exclude_lean_runtime: applies with version_compatible")

    def cli_args(self) -> list[str]:
        """These options as command-line arguments (all but the bundle, backend, precision and
        graph), recorded in the sidecar so a stale engine's error can say how to rebuild it."""
        args = ["--provider", self.provider] if self.backend == Backend.ONNXRUNTIME else []
        for option, values in (
            ("--min-shapes", self.min_shapes),
            ("--opt-shapes", self.opt_shapes),
            ("--max-shapes", self.max_shapes),
        ):
            for value in values:
                args += [option, value]
        if self.workspace_mib is not None:
            args += ["--workspace", str(self.workspace_mib)]
        if self.timing_cache is not None:
            args += ["--timing-cache", str(self.timing_cache)]
        if self.dla_core is not None:
            args += ["--dla-core", str(self.dla_core)]
        for flag, given in (
            ("--hardware-compat", self.hardware_compat),
            ("--version-compatible", self.version_compatible),
            ("--exclude-lean-runtime", self.exclude_lean_runtime),
        ):
            if given:
                args.append(flag)
        return args


@dataclass(frozen=True)
class BuildPlan:
    """Everything a TensorRT build of one graph is configured with, as names of the TensorRT
    Python API's enum members (applied by `tensorrt_api.build_engine`)."""

    graph: Graph
    precision: Precision
    source: Path
    source_sha256: str
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members
    profiles: tuple[Profile, ...]
    workspace_bytes: int | None  # MemoryPoolType.WORKSPACE limit; None keeps TensorRT's default
    default_device: str  # DeviceType member: GPU or DLA
    dla_core: int | None
    hardware_compatibility_level: str | None  # HardwareCompatibilityLevel member
    timing_cache: Path | None
    # ProfilingVerbosity member: DLA builds keep DETAILED layer information in the engine so the
    # engine inspector can report layer types; GPU builds (None) keep TensorRT's default.
    profiling_verbosity: str | None = None


def network_flags(tensorrt_version: str) -> tuple[str, ...]:
    """TensorRT 10: strongly typed networks need `STRONGLY_TYPED`; TensorRT 11: strong typing is
    always on (the flag is deprecated and ignored) and `EXPLICIT_BATCH` is gone."""
    major = version_tuple(tensorrt_version)[:1]
    if not major or major[0] < 10:
        raise UserError(
            f"TensorRT {tensorrt_version} is too old: build-engine needs TensorRT 10 or newer "
            "(strongly typed networks)"
        )
    return ("STRONGLY_TYPED",) if major[0] == 10 else ()


def graph_profiles(bundle: Bundle, graph: Graph, options: BuildOptions) -> list[Profile]:
    """The optimization profiles of one graph (static when built for the DLA). Building several
    graphs, each takes the shapes of its own inputs from the shape options."""
    entry = bundle.graph(graph, options.precision)
    return build_profiles(
        entry["inputs"],
        bundle.manifest["shape_ranges"],
        list(options.min_shapes),
        list(options.opt_shapes),
        list(options.max_shapes),
        static=options.dla_core is not None,
        only_known=len(options.graphs) > 1,
    )


def check_shape_options(bundle: Bundle, options: BuildOptions) -> None:
    """Every input a shape option names belongs to one of the graphs being built."""
    inputs = {
        value["name"]
        for graph in options.graphs
        for value in bundle.graph(graph, options.precision)["inputs"]
    }
    for option, texts in (
        ("min_shapes", options.min_shapes),
        ("opt_shapes", options.opt_shapes),
        ("max_shapes", options.max_shapes),
    ):
        for text in texts:
            unknown = sorted(set(parse_shapes(text, option)) - inputs)
            if unknown:
                raise UserError(
                    f"{option}: unknown input {unknown[0]!r} "
                    f"(inputs of {', '.join(options.graphs)}: {', '.join(sorted(inputs))})"
                )


def make_plan(
    bundle: Bundle, graph: Graph, options: BuildOptions, tensorrt_version: str
) -> BuildPlan:
    entry = bundle.graph(graph, options.precision)
    builder_flags = []
    if options.dla_core is not None:
        builder_flags.append("GPU_FALLBACK")
    if options.version_compatible:
        builder_flags.append("VERSION_COMPATIBLE")
    if options.exclude_lean_runtime:
        builder_flags.append("EXCLUDE_LEAN_RUNTIME")
    return BuildPlan(
        graph=graph,
        precision=options.precision,
        source=bundle.path / entry["file"],
        source_sha256=entry["sha256"],
        network_flags=network_flags(tensorrt_version),
        builder_flags=tuple(builder_flags),
        profiles=tuple(graph_profiles(bundle, graph, options)),
        workspace_bytes=None if options.workspace_mib is None else options.workspace_mib * MIB,
        default_device="GPU" if options.dla_core is None else "DLA",
        dla_core=options.dla_core,
        hardware_compatibility_level="AMPERE_PLUS" if options.hardware_compat else None,
        timing_cache=options.timing_cache,
        profiling_verbosity=None if options.dla_core is None else "DETAILED",
    )


def tensorrt_stem(plan: BuildPlan, tensorrt_version: str, device: DeviceInfo) -> str:
    version = ".".join(str(p) for p in version_tuple(tensorrt_version)[:3])
    backend_tag = f"trt{version}" + ("vc" if "VERSION_COMPATIBLE" in plan.builder_flags else "")
    device_tag = (plan.hardware_compatibility_level or device.sm).lower()
    target = "gpu" if plan.dla_core is None else f"dla{plan.dla_core}"
    return engine_stem(
        plan.graph, plan.precision, backend_tag, device_tag, target, plan.source_sha256
    )


@dataclass
class Artifact:
    """One built engine, staged: its file (already in the staging folder) and its sidecar."""

    stem: str
    suffix: str
    sidecar: dict[str, Any]

    @property
    def file_name(self) -> str:
        return self.stem + self.suffix


def build_engines(bundle: Bundle, options: BuildOptions) -> list[dict[str, Any]]:
    """Build the engines `options` ask for; returns one summary row per engine written."""
    check_shape_options(bundle, options)  # shape and precision mistakes fail before any build
    for graph in options.graphs:
        graph_profiles(bundle, graph, options)
    if options.backend == Backend.TENSORRT:  # so does a missing backend
        tensorrt_api.version()
    else:
        check_provider(options.provider)
    engines = bundle.path / ENGINES_DIR
    engines.mkdir(exist_ok=True)
    with staging(engines) as stage:
        if options.backend == Backend.TENSORRT:
            artifacts, timing_cache = _build_tensorrt(bundle, options, stage)
        else:
            artifacts, timing_cache = build_ort_engines(bundle, options, stage), None
        rows = [_publish(engines, stage, a) for a in artifacts]
    if timing_cache is not None and options.timing_cache is not None:
        with atomic_path(options.timing_cache) as tmp:
            tmp.write_bytes(timing_cache)
    return rows


def _build_tensorrt(
    bundle: Bundle, options: BuildOptions, stage: Path
) -> tuple[list[Artifact], bytes | None]:
    version = tensorrt_api.version()
    plans = [make_plan(bundle, g, options, version) for g in options.graphs]
    device = current_device()
    cache = None
    if options.timing_cache is not None:  # b"" makes TensorRT start a new cache
        cache = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
    artifacts = []
    for plan in plans:
        built = tensorrt_api.build_engine(plan, cache)
        cache = built.timing_cache
        stem = tensorrt_stem(plan, version, device)
        (stage / f"{stem}.engine").write_bytes(built.data)
        sidecar = base_sidecar(
            bundle, plan.graph, plan.precision, Backend.TENSORRT, version, device
        )
        sidecar["device"]["dla_core"] = plan.dla_core
        sidecar["profiles"] = [p.to_json() for p in plan.profiles]
        sidecar["build"] = {
            "cli": options.cli_args(),
            "network_flags": list(plan.network_flags),
            "builder_flags": list(plan.builder_flags),
            "workspace_bytes": plan.workspace_bytes,
            "timing_cache": None if plan.timing_cache is None else str(plan.timing_cache),
            "default_device": plan.default_device,
            "dla_core": plan.dla_core,
            "hardware_compatibility_level": plan.hardware_compatibility_level,
            "version_compatible": options.version_compatible,
            "exclude_lean_runtime": options.exclude_lean_runtime,
        }
        if built.placement is not None:
            sidecar["dla"] = built.placement
        artifacts.append(Artifact(stem, ".engine", sidecar))
    return artifacts, cache


def base_sidecar(
    bundle: Bundle,
    graph: Graph,
    precision: Precision,
    backend: Backend,
    backend_version: str,
    device: DeviceInfo,
) -> dict[str, Any]:
    """The sidecar fields every backend records (the engine's file and hash are added when it
    is published)."""
    entry = bundle.graph(graph, precision)
    return {
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "backend_version": backend_version,
        "provider": None,
        "device": {
            "name": device.name,
            "compute_capability": device.compute_capability,
            "sm": device.sm,
            "total_memory": device.total_memory,
            "machine": platform.machine(),
        },
        "precision": precision,
        "graph": graph,
        "profiles": [],
        "source": {"file": entry["file"], "sha256": entry["sha256"]},
        "vocab": {"words_sha256": bundle.manifest["vocab"]["words_sha256"]},
        "scan_deploy": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@contextmanager
def staging(engines: Path) -> Iterator[Path]:
    """A hidden folder beside the engines; removed with whatever is left in it."""
    stage = Path(tempfile.mkdtemp(prefix=".build-engine.", dir=engines))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(engines: Path, stage: Path, artifact: Artifact) -> dict[str, Any]:
    staged = stage / artifact.file_name
    target = engines / artifact.file_name
    sidecar = artifact.sidecar
    sidecar["engine"] = {
        "file": artifact.file_name,
        "sha256": sha256_file(staged),
        "size": staged.stat().st_size,
    }
    os.chmod(staged, FILE_MODE)
    os.replace(staged, target)
    write_json(sidecar_path(target), sidecar)
    return {
        "graph": sidecar["graph"],
        "precision": sidecar["precision"],
        "backend": sidecar["backend"],
        "backend_version": sidecar["backend_version"],
        "provider": sidecar["provider"],
        "device": sidecar["device"]["name"],
        "file": str(target),
        "sidecar": str(sidecar_path(target)),
        "size": sidecar["engine"]["size"],
        "profiles": sidecar["profiles"],
    }


# --- ONNX Runtime (see the module docstring) -------------------------------------------------

OPTIMIZATION_LEVELS = {
    Provider.CPU: "ORT_ENABLE_ALL",
    Provider.CUDA: "ORT_ENABLE_EXTENDED",
    Provider.TENSORRT: "ORT_ENABLE_BASIC",
}


# Providers the optimized model is produced with (see the module docstring for tensorrt).
OPTIMIZE_WITH = {
    Provider.CPU: ["CPUExecutionProvider"],
    Provider.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    Provider.TENSORRT: ["CPUExecutionProvider"],
}


TARGETS = {Provider.CPU: "cpu", Provider.CUDA: "cuda", Provider.TENSORRT: "trtep"}


def ort_stem(
    graph: Graph,
    precision: Precision,
    source_sha256: str,
    provider: Provider,
    device: DeviceInfo,
    ort_version: str,
) -> str:
    version = ".".join(str(p) for p in version_tuple(ort_version)[:3])
    device_tag = platform.machine().lower() if provider == Provider.CPU else device.sm
    return engine_stem(
        graph, precision, f"ort{version}", device_tag, TARGETS[provider], source_sha256
    )


def tensorrt_ep_options(profiles: list[Profile], options: BuildOptions) -> dict:
    """Options of ONNX Runtime's TensorRT provider recorded in the sidecar: the explicit
    profile, the workspace and no FP16/INT8 flags. The caches are added by `load_session`."""
    if len(profiles) > 1:
        raise UserError("provider tensorrt: give one optimization profile (each shape option once)")
    result: dict[str, Any] = {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
    }
    for which in ("min", "opt", "max"):
        result[f"trt_profile_{which}_shapes"] = profiles[0].trtexec(which)
    if options.workspace_mib is not None:
        result["trt_max_workspace_size"] = options.workspace_mib * MIB
    return result


def session_providers(provider: Provider, ep_options: dict[str, Any]) -> list[list]:
    """The provider list the runtime creates its session with, most preferred first."""
    chain = {
        Provider.CPU: [["CPUExecutionProvider", {}]],
        Provider.CUDA: [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]],
        Provider.TENSORRT: [
            ["TensorrtExecutionProvider", ep_options],
            ["CUDAExecutionProvider", {}],
            ["CPUExecutionProvider", {}],
        ],
    }
    return chain[provider]


def optimize_graph(source: Path, target: Path, provider: Provider) -> None:
    """Write `source` optimized for `provider` to `target` (ONNX Runtime's offline mode)."""
    ort = import_onnxruntime()
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
    version = import_onnxruntime().__version__
    device = provider_device(options.provider)
    artifacts = []
    for graph in options.graphs:
        entry = bundle.graph(graph, options.precision)
        stem = ort_stem(
            graph, options.precision, entry["sha256"], options.provider, device, version
        )
        trt_ep = options.provider == Provider.TENSORRT
        profiles = graph_profiles(bundle, graph, options) if trt_ep else []
        ep_options = tensorrt_ep_options(profiles, options) if trt_ep else {}
        optimize_graph(bundle.path / entry["file"], stage / f"{stem}.onnx", options.provider)
        sidecar = base_sidecar(
            bundle, graph, options.precision, Backend.ONNXRUNTIME, version, device
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
