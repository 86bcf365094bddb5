"""The small ONNX graphs the runtime ships as package data (it cannot import onnx to build
them): `python -m scan_deploy.export.runtime_graphs` rewrites them, and a test checks the
shipped files against what this module builds."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper
from scan_deploy.export.graph_builder import DEFAULT_OPSET, with_oldest_ir_version
from scan_deploy.runtime.dequantize import CAST_FLOAT16


def cast_float16() -> onnx.ModelProto:
    """values float16 (elements,) → float32: the gallery's float16 dequantization (the runtime
    flattens blocks of any shape)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["values"], ["float32"], name="float32", to=TensorProto.FLOAT)],
        "cast_float16",
        [helper.make_tensor_value_info("values", TensorProto.FLOAT16, ["elements"])],
        [helper.make_tensor_value_info("float32", TensorProto.FLOAT, ["elements"])],
    )
    model = helper.make_model(
        graph,
        producer_name="scan-deploy",
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return with_oldest_ir_version(model)


RUNTIME_GRAPHS = {CAST_FLOAT16: cast_float16}


def write_runtime_graphs() -> list[Path]:
    for path, build in RUNTIME_GRAPHS.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), path)
    return list(RUNTIME_GRAPHS)


if __name__ == "__main__":
    for written in write_runtime_graphs():
        print(written)
