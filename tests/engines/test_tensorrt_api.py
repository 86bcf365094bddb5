"""The TensorRT module: the missing-package error, the pure helpers that turn parser errors, DLA
placement and engine-inspector JSON into reports, and building, loading and running engines on the
TensorRT API emulator (a test double: TensorRT itself is not run here; DLA is not emulated)."""

import json
import shutil
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
from scan_deploy.engines import tensorrt_api
from scan_deploy.engines.build import BuildOptions, make_plan
from scan_deploy.engines.load import load_engine

from scan_deploy.bundle import load_bundle
from scan_deploy.errors import UserError

from ..runtime.tensorrt_emulator import VERSIONS, emulated_tensorrt
from .conftest import engine_files


def test_missing_tensorrt_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails
    with pytest.raises(UserError) as info:
        tensorrt_api.version()
    text = str(info.value)
    assert "\n" not in text
    assert "pip install tensorrt" in text and "python3-libnvinfer" in text


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
    assert tensorrt_api.parser_report(tmp_path, []) == ""


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


# --- On the TensorRT API emulator (tests/emulators: a test double, TensorRT itself not run) ---


@pytest.mark.parametrize("version", VERSIONS)
def test_engines_build_and_load_on_each_version(tiny, tmp_path, version):
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    with emulated_tensorrt(version) as trt:
        engine = load_engine(engine_files(bundle)["text_encoder"], load_bundle(bundle))
        tensors = tensorrt_api.engine_tensors(engine)
        assert [(t.name, t.is_input, t.dtype) for t in tensors] == [
            ("tokens", True, "int64"),
            ("lengths", True, "int64"),
            ("words", False, "float32"),
            ("caption_gram", False, "float32"),
            ("global", False, "float32"),
        ]
        assert tensorrt_api.engine_profiles(engine, ["tokens", "lengths"]) == [
            {"tokens": ((1, 1), (8, 7), (8, 7)), "lengths": ((1,), (8,), (8,))}
        ]
        context = tensorrt_api.create_execution_context(engine)
        with pytest.raises(UserError) as info:
            tensorrt_api.set_input_shape(context, "tokens", (9, 3))
        assert str(info.value).startswith(
            "TensorRT refused the shape (9, 3) of input 'tokens': IExecutionContext::setInputShape"
        )
        assert "satisfyProfile" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(UserError, match="could not enqueue the engine: .*allInputDimensions"):
            tensorrt_api.execute_async(context, 0)
        with pytest.raises(UserError, match="refused to switch to optimization profile 3: Err"):
            tensorrt_api.set_optimization_profile(context, 3, 0)
        assert trt.EMULATED


def test_a_graph_the_parser_refuses_names_the_file(tiny, tmp_path):
    bundle = load_bundle(tiny)
    garbage = tmp_path / "scorer.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    plan = replace(make_plan(bundle, "scorer", BuildOptions(), "10.3.0"), source=garbage)
    with emulated_tensorrt("10.3"), pytest.raises(UserError) as info:
        tensorrt_api.build_engine(plan)
    assert str(info.value).startswith(f"{garbage}: TensorRT ONNX parser: node -1: Assertion failed")


def test_tensorrt_messages_go_to_the_log_not_stdout(caplog, capsys):
    with emulated_tensorrt("11.1") as trt:
        logger = tensorrt_api.tensorrt_logger(trt)
        logger.log(trt.ILogger.WARNING, "two\nlines")
        logger.log(trt.ILogger.ERROR, "the reason")
        logger.log(trt.ILogger.INFO, "chatter")
        assert tensorrt_api.logged_reason() == "the reason"
        assert tensorrt_api.logged_reason() == "TensorRT logged no reason"
    assert "TensorRT: two lines" in caplog.text
    assert capsys.readouterr().out == ""
