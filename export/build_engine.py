"""`scan-deploy build-engine`: one engine per graph of a bundle, for TensorRT or ONNX Runtime.

The decisions are made here, in pure Python, as a `BuildPlan` per graph (network flags by
TensorRT major version, optimization profiles, memory pool, builder flags, DLA and hardware
compatibility); `scan_deploy.tensorrt_api` only applies a plan with the real API. Precision
lives in the graph (docs/design.md §4): engines are strongly typed and no FP16/INT8 builder flag or
calibrator is ever set.

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

from scan_deploy.export.engine_profiles import Profile, build_profiles, parse_shapes

from scan_deploy import __version__
from scan_deploy.atomic import FILE_MODE, atomic_path, write_json
from scan_deploy.bundle import GRAPHS, PRECISIONS, Bundle, sha256_file
from scan_deploy.cuda_device import DeviceInfo
from scan_deploy.engine_sidecar import (
    BACKENDS,
    ENGINES_DIR,
    EXECUTION_PROVIDERS,
    FORMAT_VERSION,
    engine_stem,
    sidecar_path,
    version_tuple,
)
from scan_deploy.errors import UserError, one_of

MIB = 1 << 20


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for (the command line's options), validated on creation."""

    backend: str = "tensorrt"
    precision: str = "fp32"
    graphs: tuple[str, ...] = GRAPHS
    provider: str = "cpu"
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
        one_of(self.backend, BACKENDS, "--backend")
        one_of(self.precision, PRECISIONS, "--precision")
        one_of(self.provider, EXECUTION_PROVIDERS, "--provider")
        if not self.graphs:
            raise UserError(f"--graph: expected one or more of {', '.join(GRAPHS)}")
        for k, graph in enumerate(self.graphs):
            one_of(graph, GRAPHS, "--graph")
            if graph in self.graphs[:k]:
                raise UserError(f"--graph: {graph} is given twice")
        tensorrt_only = {
            "--timing-cache": self.timing_cache is not None,
            "--dla-core": self.dla_core is not None,
            "--hardware-compat": self.hardware_compat,
            "--version-compatible": self.version_compatible,
            "--exclude-lean-runtime": self.exclude_lean_runtime,
        }
        profile_options = {
            "--min-shapes": bool(self.min_shapes),
            "--opt-shapes": bool(self.opt_shapes),
            "--max-shapes": bool(self.max_shapes),
            "--workspace": self.workspace_mib is not None,
        }
        if self.backend == "tensorrt" and self.provider != "cpu":
            raise UserError("--provider: applies to --backend onnxruntime")
        if self.backend == "onnxruntime":
            for name, given in tensorrt_only.items():
                if given:
                    raise UserError(f"{name}: applies to --backend tensorrt")
            if self.provider != "tensorrt":
                for name, given in profile_options.items():
                    if given:
                        raise UserError(
                            f"{name}: applies to --backend tensorrt or --provider tensorrt"
                        )
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UserError(f"--workspace: expected a size in MiB >= 1, got {self.workspace_mib}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise UserError(f"--dla-core: expected a core index >= 0, got {self.dla_core}")
            if self.precision == "fp32":
                raise UserError(
                    "--dla-core: DLA runs FP16 and INT8 only; build the fp16 or int8 graph "
                    "(--precision fp16)"
                )
        if self.exclude_lean_runtime and not self.version_compatible:
            raise UserError("--exclude-lean-runtime: applies with --version-compatible")

    def cli_args(self) -> list[str]:
        """These options as command-line arguments (all but the bundle, backend, precision and
        graph), recorded in the sidecar so a stale engine's error can say how to rebuild it."""
        args = ["--provider", self.provider] if self.backend == "onnxruntime" else []
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
    Python API's enum members (applied by `scan_deploy.tensorrt_api.build_engine`)."""

    graph: str
    precision: str
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


def graph_profiles(bundle: Bundle, graph: str, options: BuildOptions) -> list[Profile]:
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
        ("--min-shapes", options.min_shapes),
        ("--opt-shapes", options.opt_shapes),
        ("--max-shapes", options.max_shapes),
    ):
        for text in texts:
            unknown = sorted(set(parse_shapes(text, option)) - inputs)
            if unknown:
                raise UserError(
                    f"{option}: unknown input {unknown[0]!r} "
                    f"(inputs of {', '.join(options.graphs)}: {', '.join(sorted(inputs))})"
                )


def make_plan(
    bundle: Bundle, graph: str, options: BuildOptions, tensorrt_version: str
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
    if options.backend == "tensorrt":  # so does a missing backend
        from scan_deploy import tensorrt_api

        tensorrt_api.version()
    else:
        from scan_deploy.export.ort_engine import check_provider

        check_provider(options.provider)
    engines = bundle.path / ENGINES_DIR
    engines.mkdir(exist_ok=True)
    with staging(engines) as stage:
        if options.backend == "tensorrt":
            artifacts, timing_cache = _build_tensorrt(bundle, options, stage)
        else:
            from scan_deploy.export.ort_engine import build_ort_engines

            artifacts, timing_cache = build_ort_engines(bundle, options, stage), None
        rows = [_publish(engines, stage, a) for a in artifacts]
    if timing_cache is not None and options.timing_cache is not None:
        with atomic_path(options.timing_cache) as tmp:
            tmp.write_bytes(timing_cache)
    return rows


def _build_tensorrt(
    bundle: Bundle, options: BuildOptions, stage: Path
) -> tuple[list[Artifact], bytes | None]:
    from scan_deploy import tensorrt_api
    from scan_deploy.cuda_device import current_device

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
        sidecar = base_sidecar(bundle, plan.graph, plan.precision, "tensorrt", version, device)
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
    graph: str,
    precision: str,
    backend: str,
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
