"""The TensorRT module: the missing-package error, the pure helpers that turn parser errors, DLA
placement and engine-inspector JSON into reports, and building, loading and running engines on the
TensorRT API emulator (a test double: TensorRT itself is not run here; DLA is not emulated)."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from scan_deploy.export.build_engine import BuildOptions, build_engines, make_plan

from scan_deploy import tensorrt_api
from scan_deploy.bundle import load_bundle
from scan_deploy.engine_sidecar import sidecar_path
from scan_deploy.errors import UserError

from ..export.tiny_bundle import make_bundle
from ..runtime.tensorrt_emulator import VERSIONS, emulated_tensorrt


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


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("trt_api") / "bundle")


def _engines(bundle, **options) -> dict[str, Path]:
    """Build the bundle's engines on the emulated TensorRT in use: graph -> engine file."""
    rows = build_engines(load_bundle(bundle), BuildOptions(**options))
    return {row["graph"]: Path(row["file"]) for row in rows}


@pytest.mark.parametrize("version", VERSIONS)
def test_engines_build_and_load_on_each_version(tiny_bundle, tmp_path, version):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    with emulated_tensorrt(version) as trt:
        engine = tensorrt_api.load_engine(_engines(bundle)["text_encoder"], load_bundle(bundle))
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


def test_a_plan_tensorrt_cannot_deserialize_is_one_line_with_its_reason(tiny_bundle, tmp_path):
    """A 10.3 plan whose sidecar claims 10.16 (the sidecar check passes): TensorRT's own refusal,
    logged by TensorRT, ends the error."""
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    with emulated_tensorrt("10.3"):
        engine = _engines(bundle, graphs=("scorer",))["scorer"]
    sidecar = sidecar_path(engine)
    sidecar.write_text(sidecar.read_text().replace('"10.3.0"', '"10.16.0"'))
    with emulated_tensorrt("10.16"), pytest.raises(UserError) as info:
        tensorrt_api.load_engine(engine, load_bundle(bundle))
    assert str(info.value) == (
        f"{engine}: TensorRT could not deserialize the engine: IRuntime::deserializeCudaEngine: "
        "Error Code 6: API Usage Error (The engine plan file is not compatible with this version "
        "of TensorRT, expecting library version 10.16.0 got 10.3.0, please rebuild.)"
    )


@pytest.mark.parametrize("running", ["10.16", "11.1"])
def test_version_compatible_engines_load_on_later_tensorrt(tiny_bundle, tmp_path, running):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    with emulated_tensorrt("10.3"):
        engine = _engines(bundle, graphs=("image_encoder",), version_compatible=True)
    with emulated_tensorrt(running):
        loaded = tensorrt_api.load_engine(engine["image_encoder"], load_bundle(bundle))
        assert loaded.num_io_tensors == 4
    with emulated_tensorrt("10.16"):
        newer = _engines(bundle, graphs=("image_encoder",), version_compatible=True)
    with emulated_tensorrt("10.3"), pytest.raises(UserError, match="built with tensorrt 10.16.0"):
        tensorrt_api.load_engine(newer["image_encoder"], load_bundle(bundle))


def test_a_graph_the_parser_refuses_names_the_file(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
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
