"""ONNX Runtime engines, end to end on the CPU: optimized models that load and reproduce the
source graphs, their sidecars and loader checks, and the provider options for GPU providers."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scan_deploy.export.build_engine import BuildOptions, build_engines
from scan_deploy.export.engine_profiles import InputRange, Profile
from scan_deploy.export.ort_engine import (
    check_provider,
    load_session,
    session_providers,
    tensorrt_ep_options,
)
from scan_deploy.export.verify import generated_inputs, session

from scan_deploy.bundle import GRAPHS, load_bundle
from scan_deploy.cuda_device import DeviceInfo, cpu_device
from scan_deploy.errors import UserError

from .tiny_bundle import make_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("ort") / "bundle")
    bundle = load_bundle(path)
    rows = build_engines(bundle, BuildOptions(backend="onnxruntime", provider="cpu"))
    return bundle, {row["graph"]: row for row in rows}


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
    source = {g: session(str(bundle.graph_path(g))) for g in GRAPHS}
    engines = {g: load_session(rows[g]["file"], bundle, precision="fp32") for g in GRAPHS}
    features, tokens, lengths = _inputs(bundle)
    expected = _run_all(source, features, tokens, lengths)
    actual = _run_all(engines, features, tokens, lengths)
    assert len(actual) == 7
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert expected[-1].shape == (6, 6) and np.isfinite(expected[-1]).all()


def test_files_names_and_sidecar(built):
    bundle, rows = built
    row = rows["scorer"]
    engine = Path(row["file"])
    assert engine.parent == bundle.path / "engines"
    version = ".".join(ort.__version__.split(".")[:3])
    sha12 = bundle.manifest["graphs"]["scorer"]["sha256"][:12]
    assert engine.name.startswith(f"scorer.fp32.ort{version}.")
    assert engine.name.endswith(f".cpu.{sha12}.onnx")
    sidecar = json.loads(engine.with_suffix(".json").read_text())
    assert sidecar["backend"] == "onnxruntime" and sidecar["provider"] == "cpu"
    assert sidecar["backend_version"] == ort.__version__
    assert sidecar["device"]["name"] == cpu_device().name
    assert sidecar["device"]["compute_capability"] is None
    assert sidecar["source"] == {
        "file": "scorer.onnx",
        "sha256": bundle.manifest["graphs"]["scorer"]["sha256"],
    }
    assert sidecar["vocab"]["words_sha256"] == bundle.vocab.sha256()
    assert sidecar["engine"]["size"] == engine.stat().st_size == row["size"]
    assert sidecar["build"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert sidecar["build"]["session"]["providers"] == [["CPUExecutionProvider", {}]]
    assert sidecar["profiles"] == []
    # nothing else is left in engines/: three models, three sidecars, no staging folder
    names = sorted(p.name for p in (bundle.path / "engines").iterdir())
    assert len(names) == 6 and not any(n.startswith(".") for n in names)


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


def test_unavailable_provider_names_onnxruntime_gpu():
    with pytest.raises(UserError) as info:
        check_provider("cuda", ["CPUExecutionProvider"])
    text = str(info.value)
    assert "--provider cuda: onnxruntime" in text and "no CUDAExecutionProvider" in text
    assert text.endswith("pip install onnxruntime-gpu") and "\n" not in text
    with pytest.raises(
        UserError, match="no TensorrtExecutionProvider .*onnxruntime-gpu and TensorRT"
    ):
        check_provider("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert check_provider("cpu") == "CPUExecutionProvider"


def test_tensorrt_provider_options_keep_the_graph_precision():
    profile = Profile(
        {
            "tokens": InputRange((1, 1), (8, 7), (8, 7)),
            "lengths": InputRange((1,), (8,), (8,)),
        }
    )
    options = BuildOptions(backend="onnxruntime", provider="tensorrt", workspace_mib=512)
    ep = tensorrt_ep_options([profile], options)
    # The caches are not recorded: load_session keys them by the running versions.
    assert ep == {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
        "trt_profile_min_shapes": "tokens:1x1,lengths:1",
        "trt_profile_opt_shapes": "tokens:8x7,lengths:8",
        "trt_profile_max_shapes": "tokens:8x7,lengths:8",
        "trt_max_workspace_size": 512 << 20,
    }
    assert [p[0] for p in session_providers("tensorrt", ep)] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(UserError, match="give one optimization profile"):
        tensorrt_ep_options([profile, profile], options)


ORIN = DeviceInfo("Orin", "8.7", 8 << 30)


@pytest.fixture
def tensorrt_artifacts(tmp_path, monkeypatch):
    """build-engine --backend onnxruntime --provider tensorrt as on a Jetson (the provider and
    the GPU stand-ins; the optimization itself runs on the CPU, as it does there), and the
    provider list load_session creates its session with (captured, not run)."""
    from scan_deploy.export import ort_engine

    monkeypatch.setattr(ort_engine, "check_provider", lambda provider, available=None: provider)
    monkeypatch.setattr(ort_engine, "provider_device", lambda provider: ORIN)
    monkeypatch.setattr(ort_engine, "tensorrt_version", lambda: "10.3.0.30")
    captured = {}

    def fake_session(ort_module, model, options, providers):
        captured.update(model=model, providers=providers, level=options.graph_optimization_level)
        return "session"

    monkeypatch.setattr(ort_engine, "session_with_caches", fake_session)
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
    from scan_deploy.export import ort_engine

    bundle, rows, captured = tensorrt_artifacts
    sidecar_file = Path(rows["scorer"]["sidecar"])
    sidecar = json.loads(sidecar_file.read_text())
    sidecar["build"]["session"]["providers"][0][1].update(
        trt_engine_cache_enable=True,
        trt_engine_cache_path="scorer.old.trt_cache",
        trt_timing_cache_path="scorer.old.trt_cache",
    )
    sidecar_file.write_text(json.dumps(sidecar))
    monkeypatch.setattr(ort_engine, "tensorrt_version", lambda: None)  # TensorRT unknown
    load_session(rows["scorer"]["file"], bundle)
    trt = captured["providers"][0][1]
    assert ".old." not in trt["trt_engine_cache_path"]
    assert Path(trt["trt_engine_cache_path"]).name.startswith("scorer.fp32.ort")
    assert "-trt.sm87.trtep." in trt["trt_engine_cache_path"]
    assert Path(trt["trt_timing_cache_path"]).name == "timing.trt.sm87.trt_cache"
