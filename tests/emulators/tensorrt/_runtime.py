"""`trt.Runtime`, `ICudaEngine`, `IExecutionContext`: deserialization refuses a plan of another
TensorRT or device as TensorRT does; an execution context checks shapes against the active
profile and addresses before it enqueues; the enqueued run reads the inputs from emulated device
memory, computes with ONNX Runtime on the plan's ONNX graph and writes the outputs back, when
the stream is synchronized.

Log texts quoted with a source below are TensorRT's (observed, version-dependent); the others are
the emulator's own wording in TensorRT's style: scan-deploy only passes them on."""

from __future__ import annotations

from typing import Any

import emulated_device
import numpy as np

from . import _logging, _plan
from ._enums import DataType, ExecutionContextAllocationStrategy, TensorIOMode
from ._errors import NotEmulated
from ._network import IOTensor
from ._types import Dims, IHostMemory, buffer_bytes, nptype, to_dims
from ._version import VERSION

# Version-compatible plans run on a later TensorRT of the same major, and across majors 10 -> 11
# only (docs.nvidia.com/deeplearning/tensorrt/11.4.1/getting-started/support-matrix.html).
CROSS_MAJOR = {(10, 11)}
ENQUEUE = "IExecutionContext::enqueueV3: Error Code"
SET_SHAPE = (
    "IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter check failed"
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


class Runtime:
    """`trt.Runtime(logger)` — C11:1836."""

    def __init__(self, logger: Any) -> None:
        self.logger = _logging.check_logger(logger, "Runtime")
        self.engine_host_code_allowed = False  # DOC@v10.16:2001
        self._dla_core = -1

    @property
    def DLA_core(self) -> int:  # noqa: N802
        return self._dla_core

    @DLA_core.setter
    def DLA_core(self, value: int) -> None:  # noqa: N802
        pass  # no DLA on the emulated device (as IBuilderConfig.DLA_core: NI3:8964-8974)

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        """ICudaEngine, or **None** with an E log (never raises) — DOC@v11.1:1857-1863, C3:163-166:
        not a plan (`Error Code 1: Serialization`); another TensorRT (`Error Code 6: API Usage
        Error (The engine plan file is not compatible with this version of TensorRT, expecting
        library version X got Y ...)`) unless version-compatible (then embedding the lean runtime
        needs `engine_host_code_allowed` — DOC@v10.16:2001, sampleEngines.cpp@v10.16:137-140);
        another GPU (`Error Code 6: API Usage Error (The engine plan file is generated on an
        incompatible device, expecting compute 8.9 got compute 8.6, please rebuild.)`,
        github.com/deepinsight/insightface/issues/2882) unless hardware-compatible. `None`
        (a failed build) is a TypeError (github.com/NVIDIA/TensorRT/issues/2362)."""
        data = buffer_bytes(serialized_engine, "deserialize_cuda_engine")
        parsed = _plan.read(_plan.PLAN_MAGIC, data)
        if parsed is None:
            return self._refuse(
                "1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed."
                "Magic tag does not match)"
            )
        header, model = parsed
        message = self._incompatibility(header)
        if message is not None:
            return self._refuse(message)
        return ICudaEngine(header, model, self.logger)

    def _refuse(self, message: str) -> None:
        _logging.error(self.logger, f"IRuntime::deserializeCudaEngine: Error Code {message}")
        return None

    def _incompatibility(self, header: dict[str, Any]) -> str | None:
        flags = set(header["flags"])
        lean_runtime = "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags
        if header["tensorrt"] != VERSION:
            built, running = _version(header["tensorrt"]), _version(VERSION)
            if "EXCLUDE_LEAN_RUNTIME" in flags:
                raise NotEmulated("a version-compatible plan without its lean runtime")
            compatible = lean_runtime and (
                running >= built
                if built[0] == running[0]
                else (built[0], running[0]) in CROSS_MAJOR
            )
            if not compatible:
                return (
                    "6: API Usage Error (The engine plan file is not compatible with this version "
                    f"of TensorRT, expecting library version {VERSION} got {header['tensorrt']}, "
                    "please rebuild.)"
                )
        if lean_runtime and not self.engine_host_code_allowed:
            raise NotEmulated("a lean-runtime plan with engine_host_code_allowed False (log text)")
        props = emulated_device.properties()
        level = header["hardware_compatibility_level"]
        if level == "AMPERE_PLUS":
            if props.major < 8:
                raise NotEmulated("an AMPERE_PLUS plan on a pre-Ampere device (log text)")
        elif header["compute_capability"] != props.compute_capability:
            return (
                "6: API Usage Error (The engine plan file is generated on an incompatible device, "
                f"expecting compute {props.compute_capability} got compute "
                f"{header['compute_capability']}, please rebuild.)"
            )
        return None


class ICudaEngine:
    def __init__(self, header: dict[str, Any], model: bytes, logger: Any) -> None:
        self._header, self._model, self.logger = header, model, logger
        self._inputs = {t["name"]: IOTensor.from_json(t) for t in header["inputs"]}
        self._outputs = {t["name"]: IOTensor.from_json(t) for t in header["outputs"]}
        self._names = [*self._inputs, *self._outputs]
        self._profiles = [
            {name: tuple(tuple(b) for b in bounds) for name, bounds in p.items()}
            for p in header["profiles"]
        ]
        self._session: Any = None

    @property
    def num_io_tensors(self) -> int:
        """C3:170-175"""
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        """C3:170-175; an out-of-range index: UNCONFIRMED, not emulated."""
        if not 0 <= index < len(self._names):
            raise NotEmulated(f"get_tensor_name({index}) out of range")
        return self._names[index]

    def get_tensor_mode(self, name: str) -> Any:
        """INPUT/OUTPUT; NONE for an unknown name — RT3:2664-2673, C3:1149-1152."""
        if name in self._inputs:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self._outputs else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> Any:
        """The tensor's DataType; FLOAT for an unknown name — RT3:2566-2576."""
        tensor = self._tensor(name)
        return DataType.FLOAT if tensor is None else DataType[tensor.dtype]

    def get_tensor_shape(self, name: str) -> Dims:
        """-1 for dynamic dims; Dims{-1} for an unknown name — RT3:2551-2561, S11:299-300."""
        tensor = self._tensor(name)
        return Dims.invalid() if tensor is None else Dims(tensor.trt_dims)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        """[min, opt, max] of an input in profile `profile_index`; an output, an unknown name or
        a bad index gives Dims{-1} for each — C3:177-184, RT3:2970-2984, S11:299-304."""
        if name not in self._inputs or not 0 <= profile_index < len(self._profiles):
            return [Dims.invalid()] * 3
        return [Dims(b) for b in self._profiles[profile_index][name]]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_execution_context(
        self, strategy: Any = ExecutionContextAllocationStrategy.STATIC
    ) -> IExecutionContext:
        """A context on profile 0 — C3:1165-1167, RT3:2606-2621."""
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        """C3:1160"""
        return IHostMemory(_plan.write(_plan.PLAN_MAGIC, self._header, self._model))

    def _tensor(self, name: str) -> IOTensor | None:
        return self._inputs.get(name) or self._outputs.get(name)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph on ONNX Runtime (the emulator's stand-in for TensorRT's kernels)."""
        if self._session is None:
            import onnxruntime

            self._session = onnxruntime.InferenceSession(
                self._model, providers=["CPUExecutionProvider"]
            )
        names = list(self._outputs)
        return dict(zip(names, self._session.run(names, inputs), strict=True))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.active_optimization_profile = 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        """True; an invalid index raises RuntimeError — C3:326-332, C11:336-342. (The emulator
        then forgets the input shapes: set them again for the new profile.)"""
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.active_optimization_profile = profile_index
        self._shapes.clear()
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        """True. **False** with an E log (no exception) for an unknown or non-input name, a
        wrong static dim or a shape outside the active profile; more than 8 dims: RuntimeError
        — RT3:3732-3745, C3:142-160; log texts: github.com/yuvraj108c/ComfyUI-Upscaler-Tensorrt/
        issues/14."""
        dims = to_dims(shape).as_tuple()
        tensor = self.engine._inputs.get(name)
        if tensor is None:
            return self._fail(f"{SET_SHAPE}, condition: {name!r} is not an input tensor.)")
        network = tensor.trt_dims
        if len(dims) != len(network):
            return self._fail(f"{SET_SHAPE}, condition: engineDims.nbDims == dims.nbDims )")
        for expected, size in zip(network, dims, strict=True):
            if expected != -1 and expected != size:
                return self._fail(
                    f"{SET_SHAPE}, condition: engineDims.d[i] == dims.d[i] Static dimension "
                    "mismatch while setting input shape.)"
                )
        low, _, high = self.engine._profiles[self.active_optimization_profile][name]
        if not all(a <= d <= b for a, d, b in zip(low, dims, high, strict=True)):
            return self._fail(
                f"{SET_SHAPE}, condition: satisfyProfile Runtime dimension does not satisfy any "
                "optimization profile.)"
            )
        self._shapes[name] = dims
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        """An input's shape as set (else the engine's, -1 where dynamic); an output's from the
        input shapes, -1 while one it depends on is unset; Dims{-1} for an unknown name —
        RT3:3750-3782."""
        if name in self.engine._inputs:
            return Dims(self._shapes.get(name, self.engine._inputs[name].trt_dims))
        if name in self.engine._outputs:
            return Dims(self._output_shape(self.engine._outputs[name]))
        return Dims.invalid()

    def infer_shapes(self) -> list[str]:
        """[] when every input shape is set, else the names still unset — C3:94-109,
        DOC@v11.1:536-550."""
        return [name for name in self.engine._inputs if name not in self._shapes]

    @property
    def all_binding_shapes_specified(self) -> bool:
        """C3:1077, C11:1336"""
        return not self.infer_shapes()

    def set_tensor_address(self, name: str, memory: int) -> bool:
        """True; False for an unknown name (the log text is UNCONFIRMED) — C3:116-119,
        RT3:3974-4009."""
        if self.engine._tensor(name) is None:
            return self._fail(f"IExecutionContext::setTensorAddress: no tensor named {name!r}")
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        """True when enqueued on the stream; **False** with an E log when an input shape or an I/O
        address is unset (github.com/hamdiboukamcha/Yolo-V11-cpp-TensorRT/issues/6); stream 0
        logs the default-stream warning (github.com/comfyanonymous/ComfyUI_TensorRT/issues/94)
        — C3:111-114, S3:165, S11:467-469. The run happens when the stream is synchronized: it
        reads the inputs from device memory and writes the outputs (an address outside device
        memory is cudaErrorIllegalAddress then)."""
        handle = int(stream_handle)
        missing = self.infer_shapes()
        if missing:
            return self._fail(
                f"{ENQUEUE} 3: API Usage Error (Parameter check failed, condition: "
                f"allInputDimensionsSpecified(routine). Input shape of {missing[0]} is not set.)"
            )
        for name in self.engine._names:
            if name not in self._addresses:
                kind = "input" if name in self.engine._inputs else "output"
                return self._fail(
                    f"{ENQUEUE} 3: API Usage Error (Parameter check failed, condition: "
                    "mContext.profileObliviousBindings.at(profileObliviousIndex) != nullptr. "
                    f"Address is not set for {kind} tensor {name}. Call setInputTensorAddress or "
                    "setTensorAddress before enqueue/execute.)"
                )
        outputs = {name: self._output_shape(t) for name, t in self.engine._outputs.items()}
        unknown = [name for name, shape in outputs.items() if -1 in shape]
        if unknown:
            return self._fail(
                f"{ENQUEUE} 7: Internal Error (the inputs disagree on a dim of {unknown[0]}: "
                f"{self._shapes})"
            )
        if handle == 0:
            _logging.warning(
                self.engine.logger,
                "Using default stream in enqueueV3() may lead to performance issues due to "
                "additional calls to cudaStreamSynchronize() by TensorRT to ensure correct "
                "synchronization. Please use non-default stream instead.",
            )
        device = emulated_device.device()
        shapes, addresses = dict(self._shapes), dict(self._addresses)
        with device.lock:
            if handle not in device.streams:
                raise NotEmulated(f"execute_async_v3 on an unknown stream {handle:#x}")
            device.enqueue(handle, lambda: self._run(shapes, outputs, addresses))
        return True

    def _run(
        self,
        shapes: dict[str, tuple[int, ...]],
        outputs: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> None:
        device = emulated_device.device()
        feeds = {}
        for name, shape in shapes.items():
            dtype = np.dtype(nptype(DataType[self.engine._inputs[name].dtype]))
            view = device.device_view(addresses[name], _nbytes(shape, dtype))
            feeds[name] = np.frombuffer(view, dtype).reshape(shape).copy()
        try:
            results = self.engine.run(feeds)
        except Exception as exc:  # e.g. an index out of range: a real kernel faults
            raise emulated_device.CudaFault("cudaErrorIllegalAddress", str(exc)) from None
        for name, value in results.items():
            dtype = np.dtype(nptype(DataType[self.engine._outputs[name].dtype]))
            if value.shape != outputs[name] or value.dtype != dtype:
                raise AssertionError(
                    f"emulator: {name} came out {value.dtype}{value.shape}, the engine declares "
                    f"{dtype}{outputs[name]} (the graph's output dims are wrong)"
                )
            device.device_view(addresses[name], value.nbytes)[:] = value.tobytes()

    def _output_shape(self, tensor: IOTensor) -> tuple[int, ...]:
        """Static dims as built; a symbolic dim takes the size the inputs give it (-1 when
        none does, or when two inputs give it different sizes)."""
        sizes: dict[str, set[int]] = {}
        for name, shape in self._shapes.items():
            for dim, size in zip(self.engine._inputs[name].dims, shape, strict=True):
                if isinstance(dim, str):
                    sizes.setdefault(dim, set()).add(size)
        result = []
        for dim in tensor.dims:
            if isinstance(dim, int):
                result.append(dim)
            else:
                found = sizes.get(dim, set())
                result.append(next(iter(found)) if len(found) == 1 else -1)
        return tuple(result)

    def _fail(self, message: str) -> bool:
        _logging.error(self.engine.logger, message)
        return False


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
