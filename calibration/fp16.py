"""FP16 mixed-precision graphs: FP16 compute, FP32 inputs and outputs, chosen nodes kept in FP32.

A rewrite of our own rather than onnxconverter-common's `convert_float_to_float16`, which on these
graphs emits duplicate Cast node names, mistypes the Cast after a GRU and would need a dependency:
- every node that computes on float tensors runs in FP16 unless it is named in `keep_fp32`;
- a Cast is inserted wherever a tensor crosses between FP32 and FP16 (one per tensor and type);
- float initializers and `Constant` values become FP16 copies for the FP16 nodes that read them,
  clamped to FP16's finite range (the scorer's -1e30 mask becomes -65504: exp of it is still 0)
  and with tiny magnitudes raised to FP16's smallest normal (the 1e-8 of `x / (|x| + eps)` would
  round to 0 and turn a zero vector into NaN);
- `Cast(to=FLOAT)` inside the FP16 region becomes `Cast(to=FLOAT16)`.
TensorRT builds such a graph strongly typed: the precision of every layer is the one written here.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


def float_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that compute on float tensors (the candidates for FP16)."""
    types = _elem_types(model)
    return [node for node in model.graph.node if _is_float_node(node, types)]


def to_fp16(model: onnx.ModelProto, keep_fp32: Collection[str] = ()) -> onnx.ModelProto:
    """An FP16 copy of `model` with FP32 I/O; nodes named in `keep_fp32` stay FP32."""
    types = _elem_types(model)
    initializers = {init.name: init for init in model.graph.initializer}
    half_nodes = {
        node.name
        for node in model.graph.node
        if _is_float_node(node, types) and node.name not in keep_fp32
    }
    home = {name: FLOAT for name, t in types.items() if t == FLOAT and name not in initializers}
    rewriter = _Rewriter(initializers, home)
    for node in model.graph.node:
        rewriter.add(node, HALF if node.name in half_nodes else FLOAT, types)
    outputs = [rewriter.expose(value) for value in model.graph.output]
    graph = helper.make_graph(
        rewriter.nodes,
        model.graph.name,
        list(model.graph.input),
        outputs,
        rewriter.initializers,
    )
    converted = helper.make_model(graph, opset_imports=list(model.opset_import))
    converted.producer_name = model.producer_name
    converted.ir_version = model.ir_version
    return converted


class _Rewriter:
    """Emits the converted nodes, tracking the type each float tensor has in the new graph."""

    def __init__(self, initializers: dict[str, onnx.TensorProto], home: dict[str, int]) -> None:
        self.source_initializers = initializers
        self.home = home  # float tensor name -> FLOAT or FLOAT16 in the new graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._made: dict[tuple[str, int], str] = {}

    def add(self, node: onnx.NodeProto, precision: int, types: dict[str, int]) -> None:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                new.input[i] = self._as(name, precision)
            elif name in self.source_initializers:
                new.input[i] = self._initializer(name, None)
        if precision == HALF:
            _retype_attributes(new)
        for name in node.output:
            if types.get(name) == FLOAT:
                self.home[name] = precision
        self.nodes.append(new)

    def expose(self, value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        """Graph outputs keep their FP32 type: an FP16 result gets a final Cast."""
        if self.home.get(value.name) == HALF:
            renamed = f"{value.name}_fp16"
            for node in self.nodes:
                node.output[:] = [renamed if o == value.name else o for o in node.output]
                node.input[:] = [renamed if i == value.name else i for i in node.input]
            self.home[renamed] = HALF
            self.nodes.append(
                helper.make_node(
                    "Cast", [renamed], [value.name], name=f"{value.name}_out", to=FLOAT
                )
            )
        return value

    def _as(self, name: str, precision: int) -> str:
        if name in self.source_initializers:
            return self._initializer(name, precision)
        if self.home[name] == precision:
            return name
        key = (name, precision)
        if key not in self._made:
            cast = f"{name}_to_{'fp16' if precision == HALF else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [cast], name=cast, to=precision))
            self._made[key] = cast
        return self._made[key]

    def _initializer(self, name: str, precision: int | None) -> str:
        """The initializer itself, or its FP16 copy (made once)."""
        key = (name, HALF if precision == HALF else 0)
        if key not in self._made:
            source = self.source_initializers[name]
            if precision == HALF:
                tensor = numpy_helper.from_array(_to_half(numpy_helper.to_array(source)))
                tensor.name = f"{name}_fp16"
            else:
                tensor = source
            self.initializers.append(tensor)
            self._made[key] = tensor.name
        return self._made[key]


def _retype_attributes(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
            attribute.i = HALF
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT:
            converted = numpy_helper.from_array(_to_half(numpy_helper.to_array(attribute.t)))
            attribute.t.CopyFrom(converted)


def _to_half(values: np.ndarray) -> np.ndarray:
    clipped = np.clip(values, -FP16_MAX, FP16_MAX)
    tiny = (clipped != 0) & (np.abs(clipped) < FP16_MIN_NORMAL)
    clipped = np.where(tiny, np.sign(clipped) * FP16_MIN_NORMAL, clipped)
    return clipped.astype(np.float16)


def _is_float_node(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    if node.op_type == "Cast":
        return any(a.name == "to" and a.i == FLOAT for a in node.attribute)
    return any(types.get(name) == FLOAT for name in [*node.input, *node.output] if name)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        types[value.name] = value.type.tensor_type.elem_type
    return types
