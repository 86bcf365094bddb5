"""The graphs the runtime ships are the ones `export/runtime_graphs.py` builds."""

import onnx
import pytest
from scan_deploy.export.runtime_graphs import RUNTIME_GRAPHS, write_runtime_graphs
from scan_deploy.runtime.dequantize import (
    CAST_FLOAT16,
    DEQUANTIZE_INT8,
    DEQUANTIZE_UINT8,
    GRAPHS_DIR,
)


def test_the_runtime_ships_every_graph_by_its_name():
    graphs = (CAST_FLOAT16, DEQUANTIZE_INT8, DEQUANTIZE_UINT8)
    assert {graph.name for graph in graphs} == set(RUNTIME_GRAPHS)
    assert {graph.parent for graph in graphs} == {GRAPHS_DIR}


@pytest.mark.parametrize("name", list(RUNTIME_GRAPHS))
def test_shipped_graph_is_the_built_one(name):
    shipped = onnx.load(GRAPHS_DIR / name)
    built = RUNTIME_GRAPHS[name]()
    assert shipped.graph == built.graph
    assert list(shipped.opset_import) == list(built.opset_import)
    assert shipped.ir_version == built.ir_version <= 10  # TensorRT 10's parser reads IR ≤ 10
    onnx.checker.check_model(shipped, full_check=True)


def test_write_runtime_graphs_rewrites_the_same_bytes(tmp_path):
    written = write_runtime_graphs(tmp_path / "graphs")
    assert [path.name for path in written] == list(RUNTIME_GRAPHS)
    for path in written:
        assert path.read_bytes() == (GRAPHS_DIR / path.name).read_bytes()
