"""The only module that imports `tensorrt`: applies a `BuildPlan` with the TensorRT Python API
(build side: `build_engine`), deserializes a plan (load side: `deserialize_engine`, called by
`engines.load.load_engine` once the sidecar is checked) and runs an engine (the runtime's
TensorRT runner).

Written against the Python API documented for both TensorRT 10.x (JetPack 6 ships 10.3) and
11.x (none of it is on 11.x's removed-API list): `ILogger`, `Builder`, `create_network(flags)`,
`INetworkDefinition.num_layers/get_layer`, `ILayer.name`,
`OnnxParser.parse/num_errors/get_error` (errors give `desc()`, `node()`, `node_name()`,
`node_operator()`), `create_builder_config`,
`set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`, `set_flag(BuilderFlag.X)`,
`create_optimization_profile`/`set_shape`/`add_optimization_profile`, `create_timing_cache`/
`set_timing_cache`/`ITimingCache.serialize`, `hardware_compatibility_level`,
`default_device_type`, `DLA_core`, `can_run_on_DLA(layer)`, `profiling_verbosity` (DLA only),
`build_serialized_network`, `Runtime.deserialize_cuda_engine`, `Runtime.DLA_core`,
`Runtime.engine_host_code_allowed`, `ICudaEngine.create_engine_inspector` and
`EngineInspector.get_engine_information(LayerInformationFormat.JSON)`.

Where 10.x and 11.x differ:
- network flags: 10.x needs `NetworkDefinitionCreationFlag.STRONGLY_TYPED`; 11.x always builds
  strongly typed (the flag is deprecated and ignored, `EXPLICIT_BATCH` is removed). The plan
  carries the flags for the running major version (`engines.build.network_flags`).
- `BuilderFlag.FP16/INT8`, calibrators and `platform_has_fast_fp16` are gone in 11.x (deprecated
  in 10.x): never used here.
- the inspector's JSON lists I/O tensors as `Bindings` (10.x) or `I/O Tensors` (11.x); only its
  `Layers` list is read.
- DLA: TensorRT 11.0-11.3 has none; 11.4.1 brings it back on Jetson AGX Orin (JetPack >= 7.2.2).

TensorRT's messages go through one `ILogger` subclass (`tensorrt_logger`), never `trt.Logger`,
which prints to stdout (pyCore.cpp@v10.3.0:698-759), where `--json` output goes: warnings go to
the `scan_deploy` log (one `warning:` line each on stderr under the CLI), errors are kept and the
last one ends the one-line UserError of the call that failed.

Tested against the TensorRT API emulator of the test suite (tests/emulators, a test double); it
has never run on TensorRT itself.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scan_deploy.engines.profiles import Shape

from scan_deploy.errors import UserError

if TYPE_CHECKING:
    from scan_deploy.engines.build import BuildPlan

LOG = logging.getLogger("scan_deploy.tensorrt")
INSTALL_HINT = (
    "TensorRT is not installed: on x86_64 or SBSA run `pip install tensorrt` (NVIDIA's "
    "CUDA 12/13 wheels, tensorrt-cu12 / tensorrt-cu13); on Jetson install JetPack's "
    "python3-libnvinfer (nvidia-tensorrt) apt package"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module, or a one-line UserError telling how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return tensorrt


def version() -> str:
    return import_tensorrt().__version__


@functools.cache
def tensorrt_logger(trt: Any) -> Any:
    """The process's one `trt.ILogger` (a custom logger subclasses it and calls its `__init__`:
    TensorRT's Python API reference, infer/Core/Logger.html). TensorRT uses the logger of a
    Builder or Runtime for everything created through it, so this one lives as long as `trt`."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=16)

        def log(self, severity: Any, msg: str) -> None:
            text = " ".join(str(msg).split())
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(text)
                LOG.debug("TensorRT error: %s", text)
            elif severity == trt.ILogger.WARNING:
                LOG.warning("TensorRT: %s", text)
            else:
                LOG.debug("TensorRT: %s", text)

    return Logger()


def logged_reason() -> str:
    """The last error TensorRT logged (then forgotten): why the call that just failed failed."""
    errors = tensorrt_logger(import_tensorrt()).errors
    reason = errors[-1] if errors else "TensorRT logged no reason"
    errors.clear()
    return reason


# --- Building engines (`engines.build`) -------------------------------------------------------


@dataclass(frozen=True)
class BuiltEngine:
    data: bytes
    timing_cache: bytes | None
    placement: dict[str, list] | None  # DLA runs only: layers on the DLA and on the GPU


def build_engine(plan: BuildPlan, timing_cache: bytes | None = None) -> BuiltEngine:
    """Parse the plan's ONNX graph and build a serialized engine as the plan says.
    `timing_cache` (a serialized cache, b"" or None) is used and returned updated."""
    trt = import_tensorrt()
    logger = tensorrt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(plan.source.read_bytes()):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        report = parser_report(plan.source, errors)
        raise UserError(report or f"{plan.source}: TensorRT ONNX parser failed: {logged_reason()}")
    config = builder.create_builder_config()
    if plan.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.hardware_compatibility_level is not None:
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, plan.hardware_compatibility_level
        )
    config.default_device_type = getattr(trt.DeviceType, plan.default_device)
    if plan.dla_core is not None:
        config.DLA_core = plan.dla_core
    if plan.profiling_verbosity is not None:
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, plan.profiling_verbosity)
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, shapes in profile.inputs.items():
            trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise UserError(
                f"{plan.source}: TensorRT refused the optimization profile with min shapes "
                f"{profile.trtexec('min')}, opt {profile.trtexec('opt')}, max "
                f"{profile.trtexec('max')}"
            )
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        if cache is None or not config.set_timing_cache(cache, False):
            raise UserError(
                f"{plan.timing_cache}: the timing cache is from another device or TensorRT "
                "version (delete it or pass another timing_cache)"
            )
    placement = None
    if plan.dla_core is not None:
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        placement = dla_placement(
            [layer.name for layer in layers], [config.can_run_on_DLA(layer) for layer in layers]
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"{plan.source}: TensorRT could not build the {plan.graph} engine: {logged_reason()}"
        )
    data = bytes(serialized)
    if placement is not None:
        runtime = trt.Runtime(logger)
        runtime.DLA_core = plan.dla_core
        engine = runtime.deserialize_cuda_engine(data)
        info = engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON
        )
        placement["engine_layers"] = inspector_layers(info)
    return BuiltEngine(data, None if cache is None else bytes(cache.serialize()), placement)


def parser_report(source: Path, errors: list[Any]) -> str:
    """One line per ONNX parser error: `FILE: node N (NAME, OP): DESCRIPTION` ("" for none: a
    refusal the parser only logged, e.g. a network that already has layers)."""
    lines = []
    for error in errors:
        where = f"node {error.node()}"
        name, op = error.node_name(), error.node_operator()
        if name or op:
            where += f" ({', '.join(x for x in (name, op) if x)})"
        lines.append(f"{source}: TensorRT ONNX parser: {where}: {error.desc()}")
    return "\n".join(lines)


def dla_placement(names: list[str], on_dla: list[bool]) -> dict[str, list]:
    """Which network layers `IBuilderConfig.can_run_on_DLA` accepts; the others fall back to
    the GPU (GPU_FALLBACK)."""
    return {
        "layers_on_dla": [n for n, ok in zip(names, on_dla, strict=True) if ok],
        "layers_on_gpu": [n for n, ok in zip(names, on_dla, strict=True) if not ok],
    }


def inspector_layers(info: str) -> list[dict[str, str]]:
    """Name and type of every engine layer from `get_engine_information(JSON)`: what the engine
    runs after fusion (DLA subgraphs appear as fused `{ForeignNode[...]}` layers in TensorRT's
    layer reports, NVIDIA/TensorRT#3143). Layers are plain names at
    `ProfilingVerbosity.LAYER_NAMES_ONLY` and objects at `DETAILED`."""
    layers = []
    for layer in json.loads(info).get("Layers", []):
        if isinstance(layer, dict):
            layers.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", "")})
        else:
            layers.append({"name": str(layer), "type": ""})
    return layers


# --- Loading engines (`engines.load`) ---------------------------------------------------------


def deserialize_engine(
    path: str | Path, dla_core: int | None = None, host_code_allowed: bool = False
) -> Any:
    """The engine (`ICudaEngine`) of the plan file `path`, on DLA core `dla_core` when given;
    `host_code_allowed` for a version-compatible plan that embeds its lean runtime."""
    trt = import_tensorrt()
    runtime = trt.Runtime(tensorrt_logger(trt))
    if dla_core is not None:
        runtime.DLA_core = dla_core
    if host_code_allowed:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise UserError(f"{path}: TensorRT could not deserialize the engine: {logged_reason()}")
    return engine


# --- Running engines (the runtime's TensorRT runner, `scan_deploy.runtime.backends`) ---------
# TensorRT 10.x and 11.x: `ICudaEngine.num_io_tensors/get_tensor_name/get_tensor_mode/
# get_tensor_dtype/num_optimization_profiles/get_tensor_profile_shape/create_execution_context`,
# `trt.nptype`, `IExecutionContext.set_optimization_profile_async/set_input_shape/
# get_tensor_shape/set_tensor_address/execute_async_v3` (no binding indices: gone since 10.0).


@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor of an engine: its name, direction and numpy dtype name."""

    name: str
    is_input: bool
    dtype: str


def engine_tensors(engine: Any, path: str | Path = "engine") -> list[EngineTensor]:
    """The engine's I/O tensors, in the engine's order; a UserError for a type numpy cannot hold
    (`trt.nptype` refuses BF16, FP8, INT4...)."""
    import numpy as np

    trt = import_tensorrt()
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        trt_type = engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(trt.nptype(trt_type)).name
        except TypeError:
            raise UserError(
                f"{path}: tensor {name!r} is {trt_type.name}, which numpy cannot hold "
                "(rebuild the engine from this bundle's graphs)"
            ) from None
        tensors.append(EngineTensor(name, is_input, dtype))
    return tensors


def engine_profiles(engine: Any, inputs: list[str]) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """(min, opt, max) shapes of every input, per optimization profile."""
    return [
        {
            name: tuple(
                tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, k)
            )
            for name in inputs
        }
        for k in range(engine.num_optimization_profiles)
    ]


def create_execution_context(engine: Any, path: str | Path = "engine") -> Any:
    context = engine.create_execution_context()
    if context is None:
        raise UserError(
            f"{path}: TensorRT could not create an execution context (out of GPU memory?)"
        )
    return context


def set_optimization_profile(context: Any, index: int, stream_handle: int) -> None:
    """`set_optimization_profile_async` returns True or raises RuntimeError (pyCore.cpp)."""
    try:
        context.set_optimization_profile_async(index, stream_handle)
    except RuntimeError as exc:
        raise UserError(
            f"TensorRT refused to switch to optimization profile {index}: {exc}"
        ) from None


def set_input_shape(context: Any, name: str, shape: Shape) -> None:
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise UserError(
            f"TensorRT refused the shape {tuple(shape)} of input {name!r}: {logged_reason()}"
        )


def tensor_shape(context: Any, name: str) -> Shape:
    """The shape of an I/O tensor under the input shapes set (-1 where unknown)."""
    return tuple(int(d) for d in context.get_tensor_shape(name))


def set_tensor_address(context: Any, name: str, address: int) -> None:
    if not context.set_tensor_address(name, int(address)):
        raise UserError(
            f"TensorRT refused the device address of tensor {name!r}: {logged_reason()}"
        )


def execute_async(context: Any, stream_handle: int) -> None:
    """Enqueue the engine on the stream (`execute_async_v3`)."""
    if not context.execute_async_v3(stream_handle):
        raise UserError(f"TensorRT could not enqueue the engine: {logged_reason()}")
