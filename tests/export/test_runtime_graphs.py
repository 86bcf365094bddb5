"""The graphs the runtime ships are the ones `export/runtime_graphs.py` builds."""

import onnx
import pytest
from scan_deploy.export.runtime_graphs import RUNTIME_GRAPHS, write_runtime_graphs


@pytest.mark.parametrize("path", list(RUNTIME_GRAPHS), ids=lambda p: p.name)
def test_shipped_graph_is_the_built_one(path):
    shipped = onnx.load(path)
    built = RUNTIME_GRAPHS[path]()
    assert shipped.graph == built.graph
    assert list(shipped.opset_import) == list(built.opset_import)
    assert shipped.ir_version == built.ir_version <= 10  # TensorRT 10's parser reads IR ≤ 10
    onnx.checker.check_model(shipped, full_check=True)


def test_write_runtime_graphs_rewrites_the_same_bytes(monkeypatch, tmp_path):
    targets = {tmp_path / "graphs" / path.name: build for path, build in RUNTIME_GRAPHS.items()}
    monkeypatch.setattr("scan_deploy.export.runtime_graphs.RUNTIME_GRAPHS", targets)
    written = write_runtime_graphs()
    for path, new in zip(RUNTIME_GRAPHS, written, strict=True):
        assert new.read_bytes() == path.read_bytes()
