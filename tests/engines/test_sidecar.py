"""Engine sidecars: reading, naming, and refusing an engine on every kind of mismatch."""

import hashlib
import json
import shlex

import pytest
from scan_deploy.engines.cuda_device import DeviceInfo
from scan_deploy.engines.sidecar import (
    check_engine_file,
    check_sidecar,
    engine_stem,
    read_sidecar,
    rebuild_command,
    sidecar_path,
    version_tuple,
)

from scan_deploy.bundle import Bundle
from scan_deploy.errors import UserError

FP32 = "a" * 64
FP16 = "b" * 64
WORDS = "c" * 64
ORIN = DeviceInfo("Orin", "8.7", 1 << 34)


def _bundle(tmp_path) -> Bundle:
    manifest = {
        "graphs": {"scorer": {"file": "scorer.onnx", "sha256": FP32}},
        "variants": {"fp16": {"graphs": {"scorer": {"file": "scorer.fp16.onnx", "sha256": FP16}}}},
        "vocab": {"words_sha256": WORDS},
    }
    return Bundle(tmp_path / "bundle", manifest, None, None)


def _sidecar(**build) -> dict:
    return {
        "format_version": 1,
        "backend": "tensorrt",
        "backend_version": "10.3.0",
        "provider": None,
        "device": {"name": "Orin", "compute_capability": "8.7", "sm": "sm87"},
        "precision": "fp16",
        "graph": "scorer",
        "profiles": [],
        "source": {"file": "scorer.fp16.onnx", "sha256": FP16},
        "engine": {"file": "e.engine", "sha256": hashlib.sha256(b"plan").hexdigest(), "size": 4},
        "vocab": {"words_sha256": WORDS},
        "build": {"cli": ["--dla-core", "0"], **build},
    }


def _check(tmp_path, sidecar, version="10.3.0", device=ORIN, precision="fp16"):
    check_sidecar(
        sidecar,
        tmp_path / "e.engine",
        _bundle(tmp_path),
        backend="tensorrt",
        backend_version=version,
        device=device,
        precision=precision,
    )


def test_names_key_every_fact_an_engine_depends_on():
    stem = engine_stem("scorer", "fp16", "trt10.3.0", "sm87", "dla0", FP16)
    assert stem == "scorer.fp16.trt10.3.0.sm87.dla0.bbbbbbbbbbbb"
    assert sidecar_path(f"/b/engines/{stem}.engine").name == f"{stem}.json"
    assert sidecar_path("/b/engines/x.cpu.onnx").name == "x.cpu.json"


def test_version_tuple():
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert version_tuple("1.32.0+cpu") == (1, 32, 0)
    assert version_tuple("11.4.1") > version_tuple("10.16.0")


def test_matching_engine_passes(tmp_path):
    _check(tmp_path, _sidecar())


def test_rebuild_command_reproduces_the_build(tmp_path):
    command = rebuild_command(tmp_path / "my bundle", _sidecar())
    assert shlex.split(command) == [
        "scan-deploy",
        "build-engine",
        str(tmp_path / "my bundle"),
        "--backend",
        "tensorrt",
        "--precision",
        "fp16",
        "--graph",
        "scorer",
        "--dla-core",
        "0",
    ]


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        ({"backend": "onnxruntime"}, {}, r"backend: is a onnxruntime engine, not tensorrt"),
        ({}, {"precision": "int8"}, r"precision: is a fp16 engine, int8 was requested"),
        (
            {"source": {"file": "scorer.fp16.onnx", "sha256": "d" * 64}},
            {},
            r"source.sha256: built from dddddddddddd…, the bundle's scorer.fp16.onnx is bbbb",
        ),
        ({"vocab": {"words_sha256": "e" * 64}}, {}, r"vocab.words_sha256: built for another"),
        ({}, {"version": "10.4.0"}, r"backend_version: built with tensorrt 10.3.0, running 10.4.0"),
        (
            {},
            {"device": DeviceInfo("H200", "9.0")},
            r"device.compute_capability: built for 8.7 \(Orin\), running on 9.0 \(H200\)",
        ),
        (
            {},
            {"device": DeviceInfo("Orin Nano", "8.7")},
            r"device.name: built on Orin, running on Orin Nano",
        ),
    ],
)
def test_each_mismatch_is_refused_with_the_rebuild_command(tmp_path, change, kwargs, message):
    sidecar = {**_sidecar(), **change}
    with pytest.raises(UserError, match=message) as info:
        _check(tmp_path, sidecar, **kwargs)
    text = str(info.value)
    assert text.startswith(str(tmp_path / "e.engine"))
    assert "\n" not in text
    if "backend:" not in text and "precision:" not in text:
        assert "rebuild it: scan-deploy build-engine" in text and "--dla-core 0" in text


def test_version_compatible_engines_run_on_later_tensorrt_only(tmp_path):
    sidecar = _sidecar(version_compatible=True)
    _check(tmp_path, sidecar, version="10.16.1")
    _check(tmp_path, sidecar, version="11.4.1")
    with pytest.raises(UserError, match="built with tensorrt 10.3.0, running 10.2.0"):
        _check(tmp_path, sidecar, version="10.2.0")
    # across majors only 10 -> 11 is supported (TensorRT 11.4.1 support matrix)
    with pytest.raises(UserError, match="built with tensorrt 10.3.0, running 12.0.0"):
        _check(tmp_path, sidecar, version="12.0.0")
    eleven = {**sidecar, "backend_version": "11.1.0"}
    _check(tmp_path, eleven, version="11.4.1")
    for running in ("12.0.0", "11.0.0", "10.16.1"):
        with pytest.raises(UserError, match=f"built with tensorrt 11.1.0, running {running}"):
            _check(tmp_path, eleven, version=running)
    # without the embedded lean runtime, only the building version can load it here
    with pytest.raises(UserError, match="running 10.16.1"):
        _check(tmp_path, _sidecar(version_compatible=True, exclude_lean_runtime=True), "10.16.1")


def test_hardware_compatible_engines_run_on_any_ampere_or_later_gpu(tmp_path):
    sidecar = _sidecar(hardware_compatibility_level="AMPERE_PLUS")
    _check(tmp_path, sidecar, device=DeviceInfo("NVIDIA H200", "9.0"))
    _check(tmp_path, sidecar, device=DeviceInfo("NVIDIA A10", "8.6"))
    with pytest.raises(UserError, match="is a AMPERE_PLUS engine, Tesla T4 has compute cap"):
        _check(tmp_path, sidecar, device=DeviceInfo("Tesla T4", "7.5"))


def test_cpu_engines_compare_the_cpu_model(tmp_path):
    sidecar = _sidecar()
    sidecar["device"] = {"name": "AMD EPYC 9654", "compute_capability": None}
    _check(tmp_path, sidecar, device=DeviceInfo("AMD EPYC 9654", None))
    with pytest.raises(UserError, match="device.name: built on AMD EPYC 9654, running on Neo"):
        _check(tmp_path, sidecar, device=DeviceInfo("Neoverse-V2", None))


def test_engine_file_must_match_its_sidecar(tmp_path):
    engine = tmp_path / "e.engine"
    with pytest.raises(UserError, match="e.engine: missing"):
        check_engine_file(engine, _sidecar())
    engine.write_bytes(b"plan")
    check_engine_file(engine, _sidecar())
    engine.write_bytes(b"pla")
    with pytest.raises(UserError, match="e.engine: sha256: .*file changed or truncated"):
        check_engine_file(engine, _sidecar())


def test_read_sidecar_checks_version_and_fields(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps(_sidecar()))
    assert read_sidecar(path)["graph"] == "scorer"
    path.write_text(json.dumps({**_sidecar(), "format_version": 2}))
    with pytest.raises(UserError, match="e.json: format_version: got 2, expected 1"):
        read_sidecar(path)
    broken = _sidecar()
    del broken["device"]
    path.write_text(json.dumps(broken))
    with pytest.raises(UserError, match="e.json: device: missing from the engine sidecar"):
        read_sidecar(path)
    with pytest.raises(UserError, match="file not found, expected an engine sidecar"):
        read_sidecar(tmp_path / "none.json")


def test_unknown_graph_is_a_one_line_error_naming_the_sidecar(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({**_sidecar(), "graph": "decoder"}))
    with pytest.raises(UserError, match=r"e.json: graph: got 'decoder', expected one of image_"):
        read_sidecar(path)
    # a known graph this bundle lacks (the test bundle has only the scorer)
    with pytest.raises(UserError) as info:
        _check(tmp_path, {**_sidecar(), "graph": "text_encoder"})
    assert str(info.value).startswith(f"{tmp_path / 'e.json'}: graph: 'text_encoder' is not a ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "Orin"}, r"device: expected an object, got a string"),
        ({"backend_version": 10}, r"backend_version: expected a string, got an integer"),
        ({"backend": "tflite"}, r"backend: got 'tflite', expected one of tensorrt, onnxruntime"),
        ({"precision": "bf16"}, r"precision: got 'bf16', expected one of fp32"),
        ({"source": {"file": "scorer.fp16.onnx"}}, r"source.sha256: missing from the engine"),
        ({"engine": {"sha256": None}}, r"engine.sha256: expected a string, got null"),
        ({"vocab": []}, r"vocab: expected an object, got a list"),
        ({"build": {"cli": "--dla-core 0"}}, r"build.cli: expected a list, got a string"),
        ({"build": {"cli": ["--dla-core", 0]}}, r"build.cli: expected a list of strings"),
        ({"build": {"dla_core": True}}, r"build.dla_core: expected an integer or null, got a b"),
        (
            {"build": {"hardware_compatibility_level": "TURING"}},
            r"build.hardware_compatibility_level: got 'TURING', expected one of AMPERE_PLUS",
        ),
        ({"provider": ["cpu"]}, r"provider: expected a string or null, got a list"),
    ],
)
def test_malformed_sidecars_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({**_sidecar(), **change}))
    for check in (lambda: read_sidecar(path), lambda: _check(tmp_path, {**_sidecar(), **change})):
        with pytest.raises(UserError, match=message) as info:
            check()
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
