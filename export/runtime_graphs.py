"""The small ONNX graphs the runtime ships as package data (it cannot import onnx to build
them), by file name: `python -m scan_deploy.export.runtime_graphs runtime/graphs` rewrites them,
and a test checks the shipped files (`scan_deploy.runtime.dequantize`) against what this module
builds."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper
from scan_deploy.export.graph_builder import DEFAULT_OPSET, with_oldest_ir_version

from scan_deploy.int8_rows import INT8_ZERO_POINT


def cast_float16() -> onnx.ModelProto:
    """values float16 (elements,) → float32: the gallery's float16 dequantization (the runtime
    flattens blocks of any shape)."""
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT16, ["elements"])
    return _one_node("cast_float16", "Cast", [values], ["elements"], to=TensorProto.FLOAT)


def dequantize_int8() -> onnx.ModelProto:
    """values int8 (rows, columns) × scale float32 (rows,) → float32: the gallery's per-row int8
    dequantization (the runtime flattens every axis but the last into rows)."""
    values = helper.make_tensor_value_info("values", TensorProto.INT8, ["rows", "columns"])
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["rows"])
    return _one_node(
        "dequantize_int8", "DequantizeLinear", [values, scale], ["rows", "columns"], axis=0
    )


def dequantize_uint8() -> onnx.ModelProto:
    """codes uint8 (rows, columns) × scale float32 (rows,) → float32 (codes − 128) · scale: an
    int8 gallery's stored codes (`runtime/dequantize.py`). DequantizeLinear's per-row zero point
    has the scale's shape, so the graph expands the constant 128 to it."""
    values = helper.make_tensor_value_info("values", TensorProto.UINT8, ["rows", "columns"])
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["rows"])
    zero = helper.make_tensor("zero_point_value", TensorProto.UINT8, [], [INT8_ZERO_POINT])
    nodes = [
        helper.make_node("Constant", [], ["code_of_zero"], value=zero),
        helper.make_node("Shape", ["scale"], ["rows"]),
        helper.make_node("Expand", ["code_of_zero", "rows"], ["zero_point"]),
        helper.make_node(
            "DequantizeLinear", ["values", "scale", "zero_point"], ["float32"], axis=0
        ),
    ]
    output = helper.make_tensor_value_info("float32", TensorProto.FLOAT, ["rows", "columns"])
    return _checked(
        helper.make_model(
            helper.make_graph(nodes, "dequantize_uint8", [values, scale], [output]),
            producer_name="scan-deploy",
            opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
        )
    )


def _one_node(
    name: str, op_type: str, inputs: list, output_shape: list, **attrs
) -> onnx.ModelProto:
    """A graph of one node whose output is `float32`."""
    node = helper.make_node(op_type, [i.name for i in inputs], ["float32"], name="float32", **attrs)
    output = helper.make_tensor_value_info("float32", TensorProto.FLOAT, output_shape)
    model = helper.make_model(
        helper.make_graph([node], name, inputs, [output]),
        producer_name="scan-deploy",
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
    )
    return _checked(model)


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return with_oldest_ir_version(model)


RUNTIME_GRAPHS = {
    "cast_float16.onnx": cast_float16,
    "dequantize_int8.onnx": dequantize_int8,
    "dequantize_uint8.onnx": dequantize_uint8,
}


def write_runtime_graphs(folder: Path) -> list[Path]:
    """Write every runtime graph into `folder` (the runtime's `graphs/`); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in RUNTIME_GRAPHS.items():
        onnx.save(build(), folder / name)
        written.append(folder / name)
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m scan_deploy.export.runtime_graphs FOLDER (runtime/graphs)")
    for path in write_runtime_graphs(Path(sys.argv[1])):
        print(path)
