"""A small helper to emit ONNX graphs node by node, with constant initializers and reductions
written for the opset in use."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from scan_deploy.errors import UserError
from scan_deploy.scoring import EPS

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Unsqueeze/Squeeze/ReduceSum with axes as inputs, Softmax over one axis


class GraphBuilder:
    """Accumulates nodes and constant initializers of one graph with unique names."""

    def __init__(self, opset: int) -> None:
        if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
            raise UserError(
                f"opset: got {opset}, expected {MIN_OPSET}..{onnx.defs.onnx_opset_version()}"
            )
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs=1, **attrs):
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def output_as(self, value: str, name: str) -> None:
        """Expose `value` as the graph output called `name`."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=name))

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        """Reduce* with constant axes: an attribute before opset 18 (13 for ReduceSum), an input
        after."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(
                op_type, [x, self.const(np.array(axes, np.int64), "axes")], keepdims=keepdims
            )
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def softmax(self, x: str, axis: int, rank: int) -> str:
        """Softmax over `axis` of a rank-`rank` tensor. Over a non-last axis it is written out
        (exp(x - max) / sum): ONNX Runtime's CPU Softmax transposes for a non-last axis, which
        measured 25.6 ms against 3.1 ms written out on the t2i scorer's (32, 36, 128, 20)
        attention (benchmarks/bench_precision.py); TensorRT fuses either form."""
        if axis in (-1, rank - 1):
            return self.op("Softmax", [x], axis=axis)
        shifted = self.op("Sub", [x, self.reduce("ReduceMax", x, [axis], 1)])
        exp = self.op("Exp", [shifted])
        return self.op("Div", [exp, self.reduce("ReduceSum", exp, [axis], 1)])

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.const(np.array([axis], np.int64), "axes")])

    def slice(self, x: str, start: int, stop: int) -> str:
        """x[start:stop] of a 1-D tensor (used on shapes)."""
        starts = self.const(np.array([start], np.int64), "starts")
        return self.op("Slice", [x, starts, self.const(np.array([stop], np.int64), "ends")])

    def length_mask(self, padded: str, lengths: str) -> str:
        """(B, T) bool: position t of row b is before lengths[b]; T is axis 1 of `padded`."""
        shape = self.op("Shape", [padded])
        steps = self.op("Gather", [shape, self.const(np.array(1, np.int64))], axis=0)
        zero, one = self.const(np.array(0, np.int64)), self.const(np.array(1, np.int64))
        positions = self.op("Range", [zero, steps, one])
        return self.op("Less", [self.unsqueeze(positions, 0), self.unsqueeze(lengths, 1)])

    def nonzero_rows(self, x: str, keepdims: int = 0) -> str:
        """bool: the rows (last axis) of `x` that are not all zero: the regions that are not
        padding (`scan_deploy.scoring.region_mask`). Their L1 norm: one reduction, no |x| copy,
        and never 0 for a row with a non-zero value (it is at least the row's largest |x|)."""
        total = self.reduce("ReduceL1", x, [-1], keepdims)
        return self.op("Greater", [total, self.const(np.float32(0.0))])

    def l2norm(self, x: str) -> str:
        """x / (|x| + eps) over the last axis, as the reference `l2norm`."""
        norm = self.op("Sqrt", [self.reduce("ReduceSumSquare", x, [-1], 1)])
        return self.op("Div", [x, self.op("Add", [norm, self.const(np.float32(EPS), "eps")])])

    def gram(self, x: str) -> str:
        return self.op("MatMul", [x, self.op("Transpose", [x], perm=[0, 2, 1])], "gram")

    def model(self, inputs, outputs, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.producer_name = "scan-deploy"
        return with_oldest_ir_version(model)


def with_oldest_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Stamp the oldest IR version the model's opsets allow (opset 17: IR 8). `make_model` writes
    the installed onnx's newest IR (14 with onnx 1.2x), which older readers refuse: ONNX Runtime
    1.30 stops at IR 13, TensorRT 10's parser (onnx 1.16) at IR 10."""
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def value_info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def describe_value(value: onnx.ValueInfoProto) -> dict:
    """Name, numpy dtype name and shape (symbolic dims as names) of a graph input or output."""
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}
