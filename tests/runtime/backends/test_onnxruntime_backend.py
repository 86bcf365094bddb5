"""The ONNX Runtime backend on the CPU: the runners reproduce the bundle's graphs run directly,
provider choice and fallback, threads, build-engine artifacts (used when they validate, skipped
with a warning when stale), precision variants, and concurrent runs."""

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.onnxruntime_backend import choose_providers

from scan_deploy.bundle import MANIFEST, load_bundle, sha256_file
from scan_deploy.choices import Graph
from scan_deploy.errors import UserError

from .conftest import copy_bundle, encoder_inputs, run_pipeline

ort = pytest.importorskip("onnxruntime")

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def direct_pipeline(bundle, features, tokens, lengths, precision="fp32"):
    """The bundle's graphs in plain CPU sessions, chained as the runtime chains them."""
    sessions = {
        g: ort.InferenceSession(
            str(bundle.graph_path(g, precision)), providers=["CPUExecutionProvider"]
        )
        for g in Graph
    }
    image = sessions["image_encoder"].run(None, {"features": features})
    text = sessions["text_encoder"].run(None, {"tokens": tokens, "lengths": lengths})
    scorer = sessions["scorer"].run(
        None,
        {"regions": image[0], "region_gram": image[1], "words": text[0], "lengths": lengths},
    )
    return {"image_encoder": image, "text_encoder": text, "scorer": scorer}


def assert_same(actual, expected, atol=1e-6):
    for graph in Graph:
        assert len(actual[graph]) == len(expected[graph])
        for got, want in zip(actual[graph], expected[graph], strict=True):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_runners_equal_the_fp32_graphs_run_directly(tiny):
    backend = open_backend(tiny.bundle)
    assert backend.name == "onnxruntime (CPUExecutionProvider)"
    assert backend.precision == "fp32"
    inputs = encoder_inputs(tiny.bundle)
    actual = run_pipeline(backend, *inputs)
    assert_same(actual, direct_pipeline(tiny.bundle, *inputs))
    names = [[v["name"] for v in backend.runner(g).outputs] for g in Graph]
    assert names == [
        ["regions", "region_gram", "global"],
        ["words", "caption_gram", "global"],
        ["similarity"],
    ]
    assert actual["scorer"][0].shape == (6, 6)
    assert backend.runner("scorer") is backend.runner("scorer")  # one session per graph


def test_choose_providers_prefers_tensorrt_then_cuda_then_cpu(caplog):
    caplog.set_level(logging.INFO, "scan_deploy.runtime")
    assert choose_providers(None, ALL) == ["tensorrt", "cuda", "cpu"]
    assert choose_providers(["cuda"], ALL) == ["cuda", "cpu"]
    assert choose_providers(["cpu", "cuda"], ALL) == ["cpu", "cuda"]
    assert choose_providers("tensorrt", ALL) == ["tensorrt", "cpu"]
    assert not caplog.records
    assert choose_providers(None, ALL[1:]) == ["cuda", "cpu"]
    assert choose_providers(None, ["CPUExecutionProvider"]) == ["cpu"]
    first, second = caplog.records  # the default falling back is news, not a warning
    assert (first.levelno, second.levelno) == (logging.INFO, logging.INFO)
    assert second.getMessage() == (
        "onnxruntime has no TensorrtExecutionProvider, CUDAExecutionProvider "
        "(it has CPUExecutionProvider): using CPUExecutionProvider"
    )
    with pytest.raises(UserError, match=r"^providers: got 'rocm', expected one of cpu, cuda, tens"):
        choose_providers(["rocm"], ALL)


def test_requested_cuda_falls_back_to_cpu_with_a_warning(tiny, caplog):
    caplog.set_level(logging.WARNING, "scan_deploy.runtime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    backend = open_backend(tiny.bundle, providers=["cuda"])
    assert backend.name == "onnxruntime (CPUExecutionProvider)"
    (record,) = [r for r in caplog.records if r.name == "scan_deploy.runtime"]
    assert record.levelno == logging.WARNING
    assert "CUDAExecutionProvider" in record.getMessage()
    assert "using CPUExecutionProvider" in record.getMessage()
    runner = backend.runner("image_encoder")
    assert runner.session.get_providers() == ["CPUExecutionProvider"]


def test_threads_set_intra_op_threads(tiny):
    backend = open_backend(tiny.bundle, threads=1)
    session = backend.runner("text_encoder").session
    assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(UserError, match="threads: expected an integer >= 0"):
        open_backend(tiny.bundle, threads=-1)


def test_build_engine_artifact_used_when_it_validates(tiny, tmp_path, caplog):
    from scan_deploy.engines.build import BuildOptions, build_engines

    path = copy_bundle(tiny.bundle, tmp_path / "bundle")
    bundle = load_bundle(path)
    rows = build_engines(bundle, BuildOptions(backend="onnxruntime", provider="cpu"))
    files = {row["graph"]: row["file"] for row in rows}
    backend = open_backend(bundle, threads=1)
    inputs = encoder_inputs(bundle)
    for graph in Graph:
        runner = backend.runner(graph)
        assert str(runner.source) == files[graph]
        assert runner.session.get_session_options().intra_op_num_threads == 1
    assert_same(run_pipeline(backend, *inputs), direct_pipeline(bundle, *inputs), atol=1e-5)

    # A changed artifact fails its sidecar check: skipped with a warning, the graph runs instead.
    with open(files["scorer"], "ab") as handle:
        handle.write(b"\0")
    caplog.set_level(logging.WARNING, "scan_deploy.runtime")
    runner = open_backend(bundle).runner("scorer")
    assert runner.source == bundle.graph_path("scorer")
    (record,) = [r for r in caplog.records if r.name == "scan_deploy.runtime"]
    assert "ignoring an onnxruntime artifact" in record.getMessage()
    assert "sha256" in record.getMessage()


def test_precision_variants_and_a_missing_one(tiny, tmp_path):
    from ...export.tiny_bundle import add_variant

    path = copy_bundle(tiny.bundle, tmp_path / "bundle")
    add_variant(path, "fp16")
    bundle = load_bundle(path)
    backend = open_backend(bundle, precision="fp16")
    assert backend.precision == "fp16"
    assert backend.runner("scorer").source.name == "scorer.fp16.onnx"
    inputs = encoder_inputs(bundle)
    assert_same(run_pipeline(backend, *inputs), direct_pipeline(bundle, *inputs, "fp16"))
    with pytest.raises(UserError, match=r"no int8 graphs \(run: scan-deploy calibrate"):
        open_backend(bundle, precision="int8")


def _replace_graph(bundle, target, graph, content: bytes, edit=lambda entry: None):
    """A copy of `bundle` whose `graph` file holds `content`, its manifest sha256 updated (so
    only opening the graph can tell); `edit` may change the manifest entry too."""
    path = copy_bundle(bundle, target)
    (path / f"{graph}.onnx").write_bytes(content)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["graphs"][graph]["sha256"] = sha256_file(path / f"{graph}.onnx")
    edit(manifest["graphs"][graph])
    (path / MANIFEST).write_text(json.dumps(manifest))
    return load_bundle(path)


def test_a_graph_onnxruntime_cannot_load_is_one_line_naming_it(tiny, tmp_path):
    bundle = _replace_graph(tiny.bundle, tmp_path / "b", "text_encoder", b"not a model" * 9)
    backend = open_backend(bundle)
    backend.runner("image_encoder")  # the intact graphs still open
    with pytest.raises(UserError) as err:
        backend.runner("text_encoder")
    message = str(err.value)
    assert message.startswith(f"{bundle.path / 'text_encoder.onnx'}: ONNX Runtime cannot load")
    assert "INVALID_PROTOBUF" in message and message.endswith(": re-export the bundle")
    assert "\n" not in message


def test_another_graph_in_place_of_one_is_refused(tiny, tmp_path):
    scorer = tiny.bundle.graph_path("scorer").read_bytes()
    bundle = _replace_graph(tiny.bundle, tmp_path / "b", "image_encoder", scorer)
    with pytest.raises(UserError) as err:
        open_backend(bundle).runner("image_encoder")
    assert str(err.value) == (
        f"{bundle.path / 'image_encoder.onnx'}: inputs: the graph has regions float32[?, ?, 8], "
        "region_gram float32[?, ?, ?], words float32[?, ?, 8], lengths int64[?], the manifest's "
        "image_encoder has features float32[?, ?, 10]: re-export the bundle"
    )


def test_a_graph_whose_outputs_are_not_the_manifests_is_refused(tiny, tmp_path):
    graph = tiny.bundle.graph_path("image_encoder").read_bytes()

    def wider(entry):
        entry["outputs"][2]["shape"] = ["batch", 9]

    bundle = _replace_graph(tiny.bundle, tmp_path / "b", "image_encoder", graph, wider)
    with pytest.raises(UserError, match=r"image_encoder\.onnx: outputs: .*global float32\[\?, 8\], "
                       r"the manifest's image_encoder has .*global float32\[\?, 9\]"):  # fmt: skip
        open_backend(bundle).runner("image_encoder")


def test_a_runner_serves_threads_concurrently(tiny):
    runner = open_backend(tiny.bundle).runner("text_encoder")
    batches = [encoder_inputs(tiny.bundle, batch=3 + k, seed=k) for k in range(4)]
    expected = [runner.run({"tokens": t, "lengths": n}) for _, t, n in batches]
    results = [None] * len(batches)

    def work(k):
        _, tokens, lengths = batches[k]
        for _ in range(5):
            results[k] = runner.run({"tokens": tokens, "lengths": lengths})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


# The TensorRT execution provider's caches (scan_deploy.engines.ort_cache). No GPU here: these
# check the provider options the sessions are created with, not their execution.


def test_gpu_tag_falls_back_without_a_cuda_binding(monkeypatch):
    from scan_deploy.engines import cuda_device
    from scan_deploy.runtime.backends.onnxruntime_backend import gpu_tag

    def no_binding(index=None):
        raise UserError(cuda_device.INSTALL_HINT)

    monkeypatch.setattr(cuda_device, "current_device", no_binding)
    assert gpu_tag() == "gpu"
    orin = cuda_device.DeviceInfo("Orin", "8.7")
    monkeypatch.setattr(cuda_device, "current_device", lambda index=None: orin)
    assert gpu_tag() == "sm87"


@pytest.fixture
def tensorrt_available(monkeypatch):
    """onnxruntime as onnxruntime-gpu with TensorRT would present itself: every provider
    available; sessions record the providers they were asked for, then run on the CPU."""
    from scan_deploy.runtime.backends import onnxruntime_backend as backend

    monkeypatch.setattr(backend, "gpu_tag", lambda: "sm87")
    monkeypatch.setattr(backend, "tensorrt_version", lambda: "10.3.0.30")
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    real = ort.InferenceSession
    calls = []

    def session(model, options=None, providers=None, **kwargs):
        calls.append((model, providers))
        return real(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    return calls


def test_tensorrt_sessions_get_an_engine_cache_and_a_timing_cache(
    tiny, tmp_path, tensorrt_available, caplog
):
    path = copy_bundle(tiny.bundle, tmp_path / "bundle")
    bundle = load_bundle(path)
    backend = open_backend(bundle, providers=["tensorrt", "cuda"])
    assert backend.name == "onnxruntime (TensorrtExecutionProvider)"
    caplog.set_level(logging.WARNING, "scan_deploy.runtime")
    runner = backend.runner("scorer")
    assert runner.source == bundle.graph_path("scorer")
    ((model, providers),) = tensorrt_available
    assert model == str(bundle.graph_path("scorer"))
    names = [name for name, _ in providers]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = providers[0][1]
    version = ".".join(ort.__version__.split(".")[:3])
    sha12 = bundle.manifest["graphs"]["scorer"]["sha256"][:12]
    engines = path / "engines"
    assert trt == {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(
            engines / f"scorer.fp32.ort{version}-trt10.3.0.sm87.trtep.{sha12}.trt_cache"
        ),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(engines / "timing.trt10.3.0.sm87.trt_cache"),
    }
    assert providers[1][1] == providers[2][1] == {}
    assert (
        Path(trt["trt_engine_cache_path"]).is_dir() and Path(trt["trt_timing_cache_path"]).is_dir()
    )
    # (the stand-in session runs on the CPU, which the backend reports)
    assert "could not use TensorrtExecutionProvider" in caplog.text

    backend.runner("text_encoder")
    text_trt = tensorrt_available[1][1][0][1]
    assert "text_encoder.fp32." in text_trt["trt_engine_cache_path"]
    assert text_trt["trt_timing_cache_path"] == trt["trt_timing_cache_path"]


def test_without_tensorrt_no_provider_gets_cache_options(tiny, tensorrt_available):
    open_backend(tiny.bundle, providers=["cuda"]).runner("image_encoder")
    ((_, providers),) = tensorrt_available
    assert providers == [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]


def test_a_cache_folder_that_cannot_be_made_is_a_warning(
    tiny, tmp_path, tensorrt_available, caplog
):
    path = copy_bundle(tiny.bundle, tmp_path / "bundle")
    (path / "engines").write_text("a file where the engines folder would be")
    caplog.set_level(logging.WARNING, "scan_deploy.runtime")
    open_backend(load_bundle(path), providers=["tensorrt"]).runner("scorer")
    ((_, providers),) = tensorrt_available
    assert providers[0] == (
        "TensorrtExecutionProvider",
        {"trt_fp16_enable": False, "trt_int8_enable": False},
    )
    assert "cannot create the TensorRT cache folder" in caplog.text
    assert "engines are rebuilt by every process" in caplog.text


def test_the_int8_scorer_needs_integer_dot_products():
    """Without VNNI / dotprod ONNX Runtime's u8s8 GEMM adds product pairs in saturating 16
    bits: the int8 scorer is refused there (auto falls back to the float scorer)."""
    from scan_deploy.runtime.backends.onnxruntime_backend import integer_dot_products

    assert integer_dot_products("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n")
    assert integer_dot_products("flags : avx2 avx_vnni")
    assert integer_dot_products("Features : fp asimd evtstrm asimddp")
    assert not integer_dot_products("flags : fpu sse2 avx2 fma avx512f")
    assert not integer_dot_products("")
