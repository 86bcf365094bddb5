"""The TensorRT module without TensorRT: the missing-package error, and the pure helpers that
turn parser errors, DLA placement and engine-inspector JSON into reports. Building and loading
engines needs TensorRT and a GPU and is not run here."""

import json
import sys
from types import SimpleNamespace

import pytest

from scan_deploy import tensorrt_api
from scan_deploy.errors import UserError


def test_missing_tensorrt_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails
    with pytest.raises(UserError) as info:
        tensorrt_api.version()
    text = str(info.value)
    assert "\n" not in text
    assert "pip install tensorrt" in text and "python3-libnvinfer" in text


def test_load_engine_checks_the_sidecar_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="e.json: file not found, expected an engine sidecar"):
        tensorrt_api.load_engine(tmp_path / "e.engine", bundle=None)


def _error(node, name, op, desc):
    return SimpleNamespace(
        node=lambda: node, node_name=lambda: name, node_operator=lambda: op, desc=lambda: desc
    )


def test_parser_errors_are_one_line_each(tmp_path):
    report = tensorrt_api.parser_report(
        tmp_path / "scorer.onnx",
        [
            _error(4, "ReduceL2_4", "ReduceL2", "axes must be an initializer"),
            _error(-1, "", "", "Unsupported model IR version"),
        ],
    )
    assert report.splitlines() == [
        f"{tmp_path / 'scorer.onnx'}: TensorRT ONNX parser: node 4 (ReduceL2_4, ReduceL2): "
        "axes must be an initializer",
        f"{tmp_path / 'scorer.onnx'}: TensorRT ONNX parser: node -1: Unsupported model IR version",
    ]
    assert "failed without an error message" in tensorrt_api.parser_report(tmp_path, [])


def test_dla_placement_splits_layers_by_can_run_on_dla():
    placement = tensorrt_api.dla_placement(["fc", "gather", "relu"], [True, False, True])
    assert placement == {"layers_on_dla": ["fc", "relu"], "layers_on_gpu": ["gather"]}


@pytest.mark.parametrize(
    "info",
    [
        # TensorRT 10.x, ProfilingVerbosity.DETAILED
        {
            "Layers": [
                {"Name": "fc + relu", "LayerType": "MatrixMultiply"},
                {"Name": "gather", "LayerType": "Gather"},
            ],
            "Bindings": ["features", "regions"],
        },
        # TensorRT 11.x: I/O Tensors replace Bindings
        {
            "Layers": [
                {"Name": "fc + relu", "LayerType": "MatrixMultiply"},
                {"Name": "gather", "LayerType": "Gather"},
            ],
            "I/O Tensors": [{"Name": "features", "IOMode": "Input"}],
        },
    ],
)
def test_inspector_layers_read_both_json_schemas(info):
    assert tensorrt_api.inspector_layers(json.dumps(info)) == [
        {"name": "fc + relu", "type": "MatrixMultiply"},
        {"name": "gather", "type": "Gather"},
    ]


def test_inspector_layers_at_names_only_verbosity():
    info = json.dumps({"Layers": ["fc", "relu"], "Bindings": []})
    assert tensorrt_api.inspector_layers(info) == [
        {"name": "fc", "type": ""},
        {"name": "relu", "type": ""},
    ]
