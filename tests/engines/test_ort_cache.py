"""The TensorRT execution provider's caches: keyed like the sidecars, TensorRT's version from
package metadata, and a stale cache as one line naming its folder. No GPU here: these check the
provider options sessions are created with, not their execution."""

import pytest
from scan_deploy.engines import ort_cache
from scan_deploy.engines.ort_cache import session_with_caches, tensorrt_cache_options

from scan_deploy.errors import UserError


def test_tensorrt_cache_options_are_keyed_like_sidecars(tmp_path):
    sha = "0123456789abcdef" * 4
    options = tensorrt_cache_options(tmp_path, "scorer", "fp16", sha, "sm87", "1.20.1", "10.3.0.30")
    assert options == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(
            tmp_path / "scorer.fp16.ort1.20.1-trt10.3.0.sm87.trtep.0123456789ab.trt_cache"
        ),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "timing.trt10.3.0.sm87.trt_cache"),
    }
    # Every key fact changes the engine cache; the timing cache is shared by graphs, precisions
    # and ONNX Runtime versions (kernel timings depend on TensorRT and the GPU only).
    variants = [
        ("text_encoder", "fp16", sha, "sm87", "1.20.1", "10.3.0.30"),
        ("scorer", "int8", sha, "sm87", "1.20.1", "10.3.0.30"),
        ("scorer", "fp16", "f" * 64, "sm87", "1.20.1", "10.3.0.30"),
        ("scorer", "fp16", sha, "sm90", "1.20.1", "10.3.0.30"),
        ("scorer", "fp16", sha, "sm87", "1.22.0", "10.3.0.30"),
        ("scorer", "fp16", sha, "sm87", "1.20.1", "10.9.0.34"),
    ]
    engine_paths = {tensorrt_cache_options(tmp_path, *v)["trt_engine_cache_path"] for v in variants}
    assert len(engine_paths | {options["trt_engine_cache_path"]}) == len(variants) + 1
    timing = {tensorrt_cache_options(tmp_path, *v)["trt_timing_cache_path"] for v in variants[:3]}
    assert timing == {options["trt_timing_cache_path"]}
    unknown = tensorrt_cache_options(tmp_path, "scorer", "fp16", sha, "gpu", "1.20.1", None)
    assert unknown["trt_engine_cache_path"].endswith(
        "scorer.fp16.ort1.20.1-trt.gpu.trtep.0123456789ab.trt_cache"
    )
    assert unknown["trt_timing_cache_path"].endswith("timing.trt.gpu.trt_cache")


def test_tensorrt_version_from_package_metadata_without_importing_it(monkeypatch):
    import sys
    from importlib import metadata

    installed = {"tensorrt-cu12": "10.9.0.34"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "version", version)
    assert ort_cache.tensorrt_version() == "10.9.0.34"
    installed["tensorrt"] = "10.3.0"  # the `tensorrt` distribution comes first
    assert ort_cache.tensorrt_version() == "10.3.0"
    installed.clear()
    assert ort_cache.tensorrt_version() is None
    assert "tensorrt" not in sys.modules
    assert ort_cache.version_tag("trt", "10.3.0.30") == "trt10.3.0"
    assert ort_cache.version_tag("ort", "1.32.0+cpu") == "ort1.32.0"
    assert ort_cache.version_tag("trt", None) == "trt"


def test_a_stale_engine_cache_is_one_line_naming_the_folder():
    from types import SimpleNamespace

    caches = {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/b/engines/x.trt_cache"}
    providers = [("TensorrtExecutionProvider", caches), ("CPUExecutionProvider", {})]

    def failing(message):
        def session(model, options, providers):
            raise RuntimeError(message)

        return SimpleNamespace(InferenceSession=session)

    stale = (
        "[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP could not deserialize engine from "
        "cache: /b/engines/x.trt_cache/TensorrtExecutionProvider_TRTKernel_graph_0_sm87.engine"
    )
    with pytest.raises(UserError) as err:
        session_with_caches(failing(stale), "m.onnx", None, providers)
    assert str(err.value) == (
        "/b/engines/x.trt_cache: TensorRT cannot load an engine cached there (built by another "
        "TensorRT version or for another GPU): delete this folder, the next run rebuilds it"
    )
    with pytest.raises(RuntimeError, match="out of memory"):  # anything else is not ours
        session_with_caches(failing("out of memory"), "m.onnx", None, providers)
    with pytest.raises(RuntimeError, match="could not deserialize"):  # no cache was asked for
        session_with_caches(failing(stale), "m.onnx", None, [("CPUExecutionProvider", {})])
