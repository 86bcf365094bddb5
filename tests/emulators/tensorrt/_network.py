"""`INetworkDefinition` (as filled by the ONNX parser) and `trt.OnnxParser`.

The emulated network is the ONNX graph itself: its inputs and outputs (names, types, dims) are
what TensorRT's parser would declare, and the graph is kept to be run by ONNX Runtime. Operator
support is NOT checked (the parser sources for 10.3/11.x are not public; `scan-deploy check`
lints that): a graph ONNX Runtime cannot load is refused as the parser refuses a bad graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto

from . import _logging
from ._enums import ErrorCode
from ._errors import NotEmulated

# ONNX element type -> TensorRT DataType (I/O types a strongly typed network keeps as written).
_ONNX_TYPES = {
    TensorProto.FLOAT: "FLOAT",
    TensorProto.FLOAT16: "HALF",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
}


@dataclass(frozen=True)
class IOTensor:
    """A network input or output: dims are ints (static) or names (symbolic, -1 in TensorRT)."""

    name: str
    dtype: str  # DataType member name
    dims: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IOTensor:
        return cls(data["name"], data["dtype"], tuple(data["dims"]))

    @property
    def trt_dims(self) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.dims)


class INetworkDefinition:
    """`builder.create_network(flags)` — C3:1510, C11:1787. Strongly typed when created with
    STRONGLY_TYPED (10.x) or always (11.x: the flag is deprecated, ignored) — NI11:11462-11481."""

    def __init__(self, strongly_typed: bool) -> None:
        self.strongly_typed = strongly_typed
        self.model: bytes | None = None  # the parsed ONNX graph
        self.io_inputs: list[IOTensor] = []
        self.io_outputs: list[IOTensor] = []


class ParserError:
    """`parser.get_error(i)`: code(), desc(), node() (-1: not node-specific), node_name(),
    node_operator(), file(), line(), func(); `str()` as `In node N with name: X and operator: Y
    (func): CODE: desc`, without the node part for MODEL_DESERIALIZE_FAILED — O3:153-185,
    O11:128-169, Status.hpp:218-300."""

    def __init__(self, code: Any, desc: str, func: str = "parse") -> None:
        self._code, self._desc, self._func = code, desc, func

    def code(self) -> Any:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return -1

    def node_name(self) -> str:
        return ""

    def node_operator(self) -> str:
        return ""

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def func(self) -> str:
        return self._func

    def __str__(self) -> str:
        return f"({self._func}): {self._code.name}: {self._desc}"


class OnnxParser:
    """`trt.OnnxParser(network, logger)` — O3:121-123, O11:174-180."""

    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        if not isinstance(network, INetworkDefinition):
            raise TypeError("OnnxParser(): incompatible constructor arguments")
        self._network = network
        self._logger = _logging.check_logger(logger, "OnnxParser")
        self._errors: list[ParserError] = []

    def parse(self, model: Any, path: str | None = None) -> bool:
        """True, the network filled from the graph. False: undecodable protobuf (one
        MODEL_DESERIALIZE_FAILED error, not logged — MI:552-574); a network that already has
        layers (logged E, num_errors stays 0 — MI:576-590)."""
        if self._network.model is not None:
            _logging.error(self._logger, "Parse was called with a non-empty network definition")
            return False
        data = bytes(memoryview(model))
        try:
            proto = onnx.load_model_from_string(data)
        except Exception:  # protobuf's DecodeError
            proto = None
        if proto is None or not proto.graph.output:
            self._errors.append(
                ParserError(
                    ErrorCode.MODEL_DESERIALIZE_FAILED,
                    'Assertion failed: (model->ParseFromCodedStream(&codedInput)) && "Failed to '
                    'parse the ONNX model."',
                )
            )
            return False
        initializers = {init.name for init in proto.graph.initializer}
        try:
            inputs = [_io(v) for v in proto.graph.input if v.name not in initializers]
            outputs = [_io(v) for v in proto.graph.output]
        except ValueError as exc:
            self._errors.append(ParserError(ErrorCode.UNSUPPORTED_GRAPH, str(exc)))
            return False
        self._network.model = data
        self._network.io_inputs, self._network.io_outputs = inputs, outputs
        return True

    @property
    def num_errors(self) -> int:
        """O3:137"""
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        """Out of range is undefined behaviour (only an assert) — ModelImporter.hpp:83-87."""
        if not 0 <= index < len(self._errors):
            raise NotEmulated(f"get_error({index}) with {len(self._errors)} errors: undefined")
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()


def _io(value: onnx.ValueInfoProto) -> IOTensor:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_TYPES:
        name = TensorProto.DataType.Name(tensor.elem_type)
        raise ValueError(f"{value.name}: TensorRT has no {name} I/O type")
    dims: list[int | str] = []
    for k, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:  # named or unknown: dynamic (an unnamed one never matches another)
            dims.append(dim.dim_param or f"?{value.name}:{k}")
    return IOTensor(value.name, _ONNX_TYPES[tensor.elem_type], tuple(dims))
