"""The TensorRT API emulator itself (tests/emulators, a test double): it refuses what TensorRT
refuses, as NVIDIA's sources document it, for each emulated version. These tests use the
emulated API directly, as the documentation describes it, not through scan-deploy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from scan_deploy.bundle import load_bundle

from ..export.tiny_bundle import make_bundle
from .tensorrt_emulator import VERSIONS, emulated_tensorrt


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> bytes:
    """The tiny bundle's text encoder (tokens int64 (batch, words), lengths int64 (batch);
    batch 1..8, words 1..7)."""
    bundle = load_bundle(make_bundle(tmp_path_factory.mktemp("emulator") / "bundle"))
    return Path(bundle.graph_path("text_encoder")).read_bytes()


def _capture(trt):
    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []

        def log(self, severity, msg) -> None:
            self.messages.append((int(severity), msg))

        @property
        def errors(self) -> list[str]:
            return [msg for severity, msg in self.messages if severity <= 1]

    return Capture()


def _network(trt, logger, model: bytes):
    builder = trt.Builder(logger)
    flags = (
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if trt.__version__[:3] == "10."
        else 0
    )
    network = builder.create_network(flags)
    assert trt.OnnxParser(network, logger).parse(model)
    return builder, network


def _profile(builder, tokens_max=(8, 7)):
    profile = builder.create_optimization_profile()
    profile.set_shape("tokens", (1, 1), (4, 5), tokens_max)
    profile.set_shape("lengths", (1,), (4,), tokens_max[:1])
    return profile


def _build(trt, logger, model: bytes, flags=()) -> bytes:
    builder, network = _network(trt, logger, model)
    config = builder.create_builder_config()
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    assert config.add_optimization_profile(_profile(builder)) == 0
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, logger.errors
    return bytes(serialized)


@pytest.mark.parametrize("version", ["10.3", "10.16"])
def test_tensorrt_10_has_the_flags_11_removed(version):
    with emulated_tensorrt(version) as trt:
        assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
        assert int(trt.BuilderFlag.VERSION_COMPATIBLE) == 13
        for name in ("FP16", "INT8", "BF16"):
            assert hasattr(trt.BuilderFlag, name)
        assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
        assert hasattr(trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY") == (
            version == "10.16"
        )  # since 10.9


def test_tensorrt_11_removed_precision_flags_and_explicit_batch():
    with emulated_tensorrt("11.1") as trt:
        assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
        assert int(trt.BuilderFlag.VERSION_COMPATIBLE) == 12
        for name in ("FP16", "INT8", "BF16", "FP8", "INT4", "OBEY_PRECISION_CONSTRAINTS"):
            with pytest.raises(AttributeError):
                getattr(trt.BuilderFlag, name)
        with pytest.raises(AttributeError):
            trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH  # noqa: B018


@pytest.mark.parametrize(("version", "flag"), [("10.3", "FP16"), ("10.16", "INT8")])
def test_a_precision_flag_on_a_strongly_typed_network_builds_nothing(text_encoder, version, flag):
    with emulated_tensorrt(version) as trt:
        logger = _capture(trt)
        builder, network = _network(trt, logger, text_encoder)
        config = builder.create_builder_config()
        config.set_flag(getattr(trt.BuilderFlag, flag))
        config.add_optimization_profile(_profile(builder))
        assert builder.build_serialized_network(network, config) is None
        (error,) = logger.errors
        assert f"condition: !config.getFlag(BuilderFlag::k{flag})" in error


def test_dynamic_inputs_need_a_profile_that_names_each_and_fits_static_dims(text_encoder):
    with emulated_tensorrt("10.3") as trt:
        logger = _capture(trt)
        builder, network = _network(trt, logger, text_encoder)
        config = builder.create_builder_config()
        assert builder.build_serialized_network(network, config) is None
        assert "no optimization profile has been defined" in logger.errors[-1]
        profile = builder.create_optimization_profile()
        profile.set_shape("tokens", (1, 1), (4, 5), (8, 7))
        config.add_optimization_profile(profile)
        assert builder.build_serialized_network(network, config) is None
        assert "lengths: dynamic input is missing dimensions in profile 0" in logger.errors[-1]
        with pytest.raises(RuntimeError, match="Shape provided for opt is inconsistent"):
            profile.set_shape("lengths", (1,), (4, 1), (8,))


def test_a_plan_from_another_version_or_device_does_not_deserialize(text_encoder):
    with emulated_tensorrt("10.3", compute_capability="8.7") as trt:
        plain = _build(trt, _capture(trt), text_encoder)
        compatible = _build(trt, _capture(trt), text_encoder, ["VERSION_COMPATIBLE"])
    with emulated_tensorrt("10.3", compute_capability="9.0") as trt:
        logger = _capture(trt)
        assert trt.Runtime(logger).deserialize_cuda_engine(plain) is None
        assert "incompatible device, expecting compute 9.0 got compute 8.7" in logger.errors[-1]
    for version in ("10.16", "11.1"):
        with emulated_tensorrt(version, compute_capability="8.7") as trt:
            logger = _capture(trt)
            runtime = trt.Runtime(logger)
            assert runtime.deserialize_cuda_engine(plain) is None
            assert logger.errors[-1].startswith("IRuntime::deserializeCudaEngine: Error Code 6:")
            assert f"expecting library version {trt.__version__} got 10.3.0" in logger.errors[-1]
            runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime
            assert runtime.deserialize_cuda_engine(compatible) is not None
            assert runtime.deserialize_cuda_engine(b"not a plan") is None
            assert "Magic tag does not match" in logger.errors[-1]
            with pytest.raises(TypeError, match="incompatible function arguments"):
                runtime.deserialize_cuda_engine(None)  # what a failed build returns


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_introspection(text_encoder, version):
    with emulated_tensorrt(version) as trt:
        logger = _capture(trt)
        engine = trt.Runtime(logger).deserialize_cuda_engine(_build(trt, logger, text_encoder))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert names == ["tokens", "lengths", "words", "caption_gram", "global"]
        assert [engine.get_tensor_mode(n) for n in names[:3]] == [
            trt.TensorIOMode.INPUT, trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT
        ]  # fmt: skip
        assert trt.nptype(engine.get_tensor_dtype("tokens")) is np.int64
        assert engine.get_tensor_shape("tokens") == (-1, -1)
        assert engine.get_tensor_profile_shape("tokens", 0) == [(1, 1), (4, 5), (8, 7)]
        assert engine.num_optimization_profiles == 1
        assert engine.get_tensor_mode("nope") == trt.TensorIOMode.NONE
        assert engine.get_tensor_dtype("nope") == trt.DataType.FLOAT
        with pytest.raises(ValueError):
            len(engine.get_tensor_shape("nope"))  # Dims{-1}
        with pytest.raises(TypeError, match="equivalent numpy datatype"):
            trt.nptype(trt.DataType.BF16)


def _cudart():
    from cuda.bindings import runtime as cudart

    return cudart


def _value(result):
    err, *values = result
    assert err == 0, err
    return values[0] if values else None


def test_context_refuses_what_tensorrt_refuses_and_runs_on_synchronize(text_encoder):
    with emulated_tensorrt("10.16") as trt:
        logger = _capture(trt)
        engine = trt.Runtime(logger).deserialize_cuda_engine(_build(trt, logger, text_encoder))
        context = engine.create_execution_context()
        assert not context.set_input_shape("tokens", (9, 3))  # batch beyond the profile
        assert "satisfyProfile Runtime dimension does not satisfy" in logger.errors[-1]
        assert not context.set_input_shape("tokens", (2, 3, 1))
        assert not context.set_input_shape("words", (2, 3))  # an output
        with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
            context.set_optimization_profile_async(1, 0)
        cudart = _cudart()
        stream = _value(cudart.cudaStreamCreate())
        assert not context.execute_async_v3(int(stream))
        assert "allInputDimensionsSpecified" in logger.errors[-1]
        tokens = np.array([[1, 4, 5], [2, 3, 0]], np.int64)
        lengths = np.array([3, 2], np.int64)
        assert context.set_input_shape("tokens", tokens.shape)
        assert context.set_input_shape("lengths", lengths.shape)
        assert context.get_tensor_shape("caption_gram") == (2, 3, 3)
        assert context.infer_shapes() == [] and context.all_binding_shapes_specified
        pointers, outputs = {}, {}
        for name in ("tokens", "lengths", "words", "caption_gram", "global"):
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            array = np.zeros(tuple(context.get_tensor_shape(name)), dtype)
            pointers[name] = _value(cudart.cudaMalloc(array.nbytes))
            outputs[name] = array
            if name != "global":
                assert context.set_tensor_address(name, pointers[name])
        assert not context.execute_async_v3(int(stream))
        assert "Address is not set for output tensor global" in logger.errors[-1]
        assert context.set_tensor_address("global", pointers["global"])
        assert not context.set_tensor_address("nope", 256)
        host = {"tokens": tokens, "lengths": lengths}
        for name, value in host.items():
            _value(cudart.cudaMemcpyAsync(pointers[name], value.ctypes.data, value.nbytes,
                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))  # fmt: skip
        assert context.execute_async_v3(int(stream))
        out = outputs["global"]
        _value(cudart.cudaMemcpyAsync(out.ctypes.data, pointers["global"], out.nbytes,
               cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))  # fmt: skip
        assert not out.any()  # nothing ran yet: the copies wait for the synchronize
        _value(cudart.cudaStreamSynchronize(stream))
        expected = onnxruntime.InferenceSession(text_encoder).run(["global"], host)[0]
        np.testing.assert_array_equal(out, expected)


def test_a_buffer_too_small_is_an_illegal_address_and_sticks(text_encoder):
    with emulated_tensorrt("11.1") as trt:
        logger = _capture(trt)
        engine = trt.Runtime(logger).deserialize_cuda_engine(_build(trt, logger, text_encoder))
        context = engine.create_execution_context()
        cudart = _cudart()
        stream = _value(cudart.cudaStreamCreate())
        context.set_input_shape("tokens", (8, 7))
        context.set_input_shape("lengths", (8,))
        small = _value(cudart.cudaMalloc(16))  # 2 int64 tokens where 56 are read
        for name in ("tokens", "lengths", "words", "caption_gram", "global"):
            context.set_tensor_address(name, small)
        assert context.execute_async_v3(int(stream))  # enqueued: addresses are not checked yet
        (err,) = cudart.cudaStreamSynchronize(stream)
        assert err == cudart.cudaError_t.cudaErrorIllegalAddress
        assert cudart.cudaMalloc(16)[0] == cudart.cudaError_t.cudaErrorIllegalAddress  # sticky


def test_the_default_logger_prints_to_stdout(capsys):
    with emulated_tensorrt("10.3") as trt:
        logger = trt.Logger(trt.Logger.WARNING)
        logger.log(trt.ILogger.ERROR, "shown")
        logger.log(trt.ILogger.INFO, "dropped")
    out = capsys.readouterr().out
    assert "[TRT] [E] shown" in out and "dropped" not in out
