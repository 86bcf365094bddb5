"""Loading engines: finding them by their sidecars; ONNX Runtime artifacts end to end on the CPU
(optimized models that load and reproduce the source graphs, the loader's checks, the TensorRT
provider's caches keyed at load time); TensorRT engines on the TensorRT API emulator (a test
double: TensorRT itself is not run): the sidecar checked first, a plan TensorRT refuses,
version-compatible plans."""

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scan_deploy.engines import load
from scan_deploy.engines.build import BuildOptions, build_engines
from scan_deploy.engines.cuda_device import DeviceInfo
from scan_deploy.engines.load import find_engines, load_engine, load_session
from scan_deploy.engines.sidecar import sidecar_path
from scan_deploy.export.verify import generated_inputs, session

from scan_deploy.bundle import Bundle, load_bundle
from scan_deploy.choices import Graph
from scan_deploy.errors import UserError

from ..export.tiny_bundle import make_bundle
from ..runtime.tensorrt_emulator import emulated_tensorrt
from .conftest import engine_files


def _inputs(bundle):
    config = bundle.config
    features, tokens, lengths = generated_inputs(config.vocab_size, config.img_dim, 6, 5, 7, 3)
    return features, tokens, lengths


def _run_all(sessions, features, tokens, lengths):
    image = sessions["image_encoder"].run(None, {"features": features})
    text = sessions["text_encoder"].run(None, {"tokens": tokens, "lengths": lengths})
    scorer = sessions["scorer"].run(
        None,
        {"regions": image[0], "region_gram": image[1], "words": text[0], "lengths": lengths},
    )
    return [*image, *text, *scorer]


def test_optimized_models_reproduce_the_source_graphs(built):
    bundle, rows = built
    source = {g: session(str(bundle.graph_path(g))) for g in Graph}
    engines = {g: load_session(rows[g]["file"], bundle, precision="fp32") for g in Graph}
    features, tokens, lengths = _inputs(bundle)
    expected = _run_all(source, features, tokens, lengths)
    actual = _run_all(engines, features, tokens, lengths)
    assert len(actual) == 7
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert expected[-1].shape == (6, 6) and np.isfinite(expected[-1]).all()


def test_loader_refuses_a_stale_or_tampered_engine(built):
    bundle, rows = built
    path = rows["text_encoder"]["file"]
    with pytest.raises(UserError, match="precision: is a fp32 engine, fp16 was requested"):
        load_session(path, bundle, precision="fp16")
    sidecar_file = Path(path).with_suffix(".json")
    original = sidecar_file.read_text()
    try:
        sidecar = json.loads(original)
        sidecar["backend_version"] = "1.0.0"
        sidecar_file.write_text(json.dumps(sidecar))
        with pytest.raises(UserError) as info:
            load_session(path, bundle)
        text = str(info.value)
        assert f"built with onnxruntime 1.0.0, running {ort.__version__}" in text
        assert "rebuild it: scan-deploy build-engine" in text
        assert "--backend onnxruntime --precision fp32 --graph text_encoder --provider cpu" in text
    finally:
        sidecar_file.write_text(original)
    engine = Path(path)
    data = engine.read_bytes()
    try:
        engine.write_bytes(data[:-1])
        with pytest.raises(UserError, match="sha256: .*file changed or truncated"):
            load_session(path, bundle)
    finally:
        engine.write_bytes(data)


@pytest.mark.parametrize(
    ("session", "message"),
    [
        (None, r"build.session: expected an object"),
        (
            {"graph_optimization_level": "ORT_FASTEST", "providers": []},
            r"build.session.graph_optimization_level: got 'ORT_FASTEST'",
        ),
        (
            {"graph_optimization_level": "ORT_DISABLE_ALL", "providers": ["CPUExecutionProvider"]},
            r"build.session.providers: expected a list of \[name, options\] pairs",
        ),
    ],
)
def test_loader_refuses_a_malformed_session_in_one_line(built, session, message):
    bundle, rows = built
    path = rows["image_encoder"]["file"]
    sidecar_file = Path(path).with_suffix(".json")
    original = sidecar_file.read_text()
    try:
        sidecar = json.loads(original)
        sidecar["build"]["session"] = session
        sidecar_file.write_text(json.dumps(sidecar))
        with pytest.raises(UserError, match=message) as info:
            load_session(path, bundle)
        assert str(info.value).startswith(f"{sidecar_file}: ") and "\n" not in str(info.value)
    finally:
        sidecar_file.write_text(original)


ORIN = DeviceInfo("Orin", "8.7", 8 << 30)


@pytest.fixture
def tensorrt_artifacts(tmp_path, monkeypatch):
    """build-engine --backend onnxruntime --provider tensorrt as on a Jetson (the provider and
    the GPU stand-ins; the optimization itself runs on the CPU, as it does there), and the
    provider list load_session creates its session with (captured, not run)."""
    from scan_deploy.engines import build

    for module in (build, load):
        monkeypatch.setattr(module, "check_provider", lambda provider, available=None: provider)
        monkeypatch.setattr(module, "provider_device", lambda provider: ORIN)
    monkeypatch.setattr(load, "tensorrt_version", lambda: "10.3.0.30")
    captured = {}

    def fake_session(ort_module, model, options, providers):
        captured.update(model=model, providers=providers, level=options.graph_optimization_level)
        return "session"

    monkeypatch.setattr(load, "session_with_caches", fake_session)
    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    rows = build_engines(bundle, BuildOptions(backend="onnxruntime", provider="tensorrt"))
    return bundle, {row["graph"]: row for row in rows}, captured


def test_tensorrt_artifact_sessions_get_caches_keyed_like_sidecars(tensorrt_artifacts):
    bundle, rows, captured = tensorrt_artifacts
    row = rows["text_encoder"]
    sidecar = json.loads(Path(row["sidecar"]).read_text())
    ((name, recorded), *_) = sidecar["build"]["session"]["providers"]
    assert name == "TensorrtExecutionProvider"
    assert not {k for k in recorded if "cache" in k}  # keyed at load time, never recorded
    assert recorded["trt_profile_max_shapes"] == "tokens:8x7,lengths:8"  # the manifest's ranges

    assert load_session(row["file"], bundle, precision="fp32") == "session"
    assert captured["model"] == row["file"]
    assert captured["level"] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (trt_name, trt), (cuda_name, cuda), (cpu_name, cpu) = captured["providers"]
    assert (trt_name, cuda_name, cpu_name) == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert cuda == cpu == {}
    engines = bundle.path / "engines"
    version = ".".join(ort.__version__.split(".")[:3])
    sha12 = bundle.manifest["graphs"]["text_encoder"]["sha256"][:12]
    stem = f"text_encoder.fp32.ort{version}-trt10.3.0.sm87.trtep.{sha12}"
    assert trt == {
        **recorded,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engines / f"{stem}.trt_cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(engines / "timing.trt10.3.0.sm87.trt_cache"),
    }
    assert Path(trt["trt_engine_cache_path"]).is_dir()  # ONNX Runtime makes only the last level
    assert Path(trt["trt_timing_cache_path"]).is_dir()


def test_cache_paths_of_an_older_sidecar_are_replaced(tensorrt_artifacts, monkeypatch):
    bundle, rows, captured = tensorrt_artifacts
    sidecar_file = Path(rows["scorer"]["sidecar"])
    sidecar = json.loads(sidecar_file.read_text())
    sidecar["build"]["session"]["providers"][0][1].update(
        trt_engine_cache_enable=True,
        trt_engine_cache_path="scorer.old.trt_cache",
        trt_timing_cache_path="scorer.old.trt_cache",
    )
    sidecar_file.write_text(json.dumps(sidecar))
    monkeypatch.setattr(load, "tensorrt_version", lambda: None)  # TensorRT unknown
    load_session(rows["scorer"]["file"], bundle)
    trt = captured["providers"][0][1]
    assert ".old." not in trt["trt_engine_cache_path"]
    assert Path(trt["trt_engine_cache_path"]).name.startswith("scorer.fp32.ort")
    assert "-trt.sm87.trtep." in trt["trt_engine_cache_path"]
    assert Path(trt["trt_timing_cache_path"]).name == "timing.trt.sm87.trt_cache"


def _sidecar(graph, precision, backend, provider=None):
    return {
        "format_version": 1,
        "backend": backend,
        "backend_version": "10.3.0",
        "provider": provider,
        "device": {"name": "GPU", "compute_capability": "8.7"},
        "precision": precision,
        "graph": graph,
        "profiles": [],
        "source": {"sha256": "0" * 64},
        "engine": {"sha256": "0" * 64, "file": f"{graph}.{precision}.{backend}.engine"},
        "vocab": {"words_sha256": "0" * 64},
        "build": {},
    }


def test_find_engines_matches_sidecars_newest_first(built, tmp_path, caplog):
    tiny = built[0]
    bundle = Bundle(tmp_path, tiny.manifest, tiny.config, tiny.vocab)
    assert find_engines(bundle, "tensorrt", "scorer", "fp16") == []  # no engines/ folder
    engines = tmp_path / "engines"
    engines.mkdir()
    sidecars = {
        "old.json": _sidecar("scorer", "fp16", "tensorrt"),
        "new.json": _sidecar("scorer", "fp16", "tensorrt"),
        "other-graph.json": _sidecar("image_encoder", "fp16", "tensorrt"),
        "other-precision.json": _sidecar("scorer", "int8", "tensorrt"),
        "ort-cpu.json": _sidecar("scorer", "fp16", "onnxruntime", "cpu"),
        "ort-cuda.json": _sidecar("scorer", "fp16", "onnxruntime", "cuda"),
    }
    sidecars["new.json"]["engine"]["file"] = "new.engine"
    for k, (name, sidecar) in enumerate(sidecars.items()):
        (engines / name).write_text(json.dumps(sidecar))
        os.utime(engines / name, (1000 + k, 1000 + k))
    (engines / "broken.json").write_text('{"format_version": 1}')
    caplog.set_level(logging.WARNING, "scan_deploy.engines")
    found = find_engines(bundle, "tensorrt", "scorer", "fp16")
    assert [path.name for path, _ in found] == ["new.engine", "scorer.fp16.tensorrt.engine"]
    assert all(path.parent == engines for path, _ in found)
    assert "broken.json: backend: missing from the engine sidecar" in caplog.records[0].message
    cuda = find_engines(bundle, "onnxruntime", "scorer", "fp16", provider="cuda")
    assert [sidecar["provider"] for _, sidecar in cuda] == ["cuda"]


# --- TensorRT, on the TensorRT API emulator (tests/emulators: a test double) --------------------


def test_load_engine_checks_the_sidecar_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="e.json: file not found, expected an engine sidecar"):
        load_engine(tmp_path / "e.engine", bundle=None)


def test_a_plan_tensorrt_cannot_deserialize_is_one_line_with_its_reason(tiny, tmp_path):
    """A 10.3 plan whose sidecar claims 10.16 (the sidecar check passes): TensorRT's own refusal,
    logged by TensorRT, ends the error."""
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    with emulated_tensorrt("10.3"):
        engine = engine_files(bundle, graphs=("scorer",))["scorer"]
    sidecar = sidecar_path(engine)
    sidecar.write_text(sidecar.read_text().replace('"10.3.0"', '"10.16.0"'))
    with emulated_tensorrt("10.16"), pytest.raises(UserError) as info:
        load_engine(engine, load_bundle(bundle))
    assert str(info.value) == (
        f"{engine}: TensorRT could not deserialize the engine: IRuntime::deserializeCudaEngine: "
        "Error Code 6: API Usage Error (The engine plan file is not compatible with this version "
        "of TensorRT, expecting library version 10.16.0 got 10.3.0, please rebuild.)"
    )


@pytest.mark.parametrize("running", ["10.16", "11.1"])
def test_version_compatible_engines_load_on_later_tensorrt(tiny, tmp_path, running):
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    with emulated_tensorrt("10.3"):
        engine = engine_files(bundle, graphs=("image_encoder",), version_compatible=True)
    with emulated_tensorrt(running):
        loaded = load_engine(engine["image_encoder"], load_bundle(bundle))
        assert loaded.num_io_tensors == 4
    with emulated_tensorrt("10.16"):
        newer = engine_files(bundle, graphs=("image_encoder",), version_compatible=True)
    with emulated_tensorrt("10.3"), pytest.raises(UserError, match="built with tensorrt 10.16.0"):
        load_engine(newer["image_encoder"], load_bundle(bundle))
