"""The TensorRT backend: profile selection, the sizes the runtime takes from the engine, I/O
ordering from the manifest, output buffer sizing, engine discovery and its build-engine hint; the
runner on the TensorRT API emulator (a test double: TensorRT itself is not run here)."""

import importlib.util
import json
from dataclasses import dataclass

import numpy as np
import pytest
from scan_deploy.engines.build import BuildOptions, build_engines
from scan_deploy.engines.load import engine_candidates
from scan_deploy.engines.sidecar import build_engine_command
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.tensorrt_backend import (
    _nbytes,
    covers,
    io_order,
    profile_sizes,
    select_profile,
)

from scan_deploy.bundle import Bundle, DimSizes, load_bundle
from scan_deploy.errors import UserError

from ..tensorrt_emulator import emulated_tensorrt
from .conftest import copy_bundle, encoder_inputs

# Two profiles of the text encoder: short captions in small batches, and the full range.
SMALL = {"tokens": ((1, 1), (4, 8), (8, 16)), "lengths": ((1,), (4,), (8,))}
LARGE = {"tokens": ((1, 1), (32, 16), (64, 64)), "lengths": ((1,), (32,), (64,))}


def shapes(batch, words):
    return {"tokens": (batch, words), "lengths": (batch,)}


def test_covers_checks_every_dim_of_every_input():
    assert covers(SMALL, shapes(1, 1)) and covers(SMALL, shapes(8, 16))
    assert not covers(SMALL, shapes(9, 16))
    assert not covers(SMALL, shapes(8, 17))
    assert not covers(SMALL, {"tokens": (8, 16), "lengths": (9,)})
    assert not covers(SMALL, {"tokens": (8,), "lengths": (8,)})  # another rank


def test_select_profile_keeps_the_current_one_when_it_covers():
    profiles = [SMALL, LARGE]
    assert select_profile(profiles, shapes(4, 8)) == 0  # the first that covers
    assert select_profile(profiles, shapes(4, 8), current=1) == 1  # no switch needed
    assert select_profile(profiles, shapes(40, 8), current=0) == 1  # switch
    assert select_profile(profiles, shapes(40, 8), current=None) == 1
    assert select_profile(profiles, shapes(2, 2), current=7) == 0  # out-of-range current
    assert select_profile([LARGE], shapes(64, 64)) == 0


def test_select_profile_names_the_ranges_when_none_covers():
    with pytest.raises(UserError) as info:
        select_profile([SMALL, LARGE], shapes(65, 3), source="e/text.engine")
    assert str(info.value) == (
        "e/text.engine: input shapes tokens:65x3, lengths:65 are outside every optimization "
        "profile of the engine (tokens:1x1..8x16, lengths:1..8; tokens:1x1..64x64, "
        "lengths:1..64); rebuild it with --min-shapes/--max-shapes that cover them"
    )


@dataclass(frozen=True)
class Tensor:  # what tensorrt_api.engine_tensors returns
    name: str
    is_input: bool
    dtype: str = "float32"


ENTRY = {
    "inputs": [
        {"name": "regions"},
        {"name": "region_gram"},
        {"name": "words"},
        {"name": "lengths"},
    ],
    "outputs": [{"name": "similarity"}],
}


def test_io_order_follows_the_manifest_not_the_engine():
    tensors = [
        Tensor("lengths", True, "int64"),
        Tensor("similarity", False),
        Tensor("words", True),
        Tensor("regions", True),
        Tensor("region_gram", True),
    ]
    inputs, outputs = io_order("scorer", ENTRY, tensors)
    assert [t.name for t in inputs] == ["regions", "region_gram", "words", "lengths"]
    assert [t.name for t in outputs] == ["similarity"]
    assert inputs[3].dtype == "int64"


def test_io_order_refuses_an_engine_of_another_graph():
    tensors = [Tensor("features", True), Tensor("regions", False)]
    with pytest.raises(UserError, match=r"scorer: the engine's inputs are features, the bundle"):
        io_order("scorer", ENTRY, tensors)
    tensors = [Tensor(v["name"], True) for v in ENTRY["inputs"]] + [Tensor("scores", False)]
    with pytest.raises(UserError, match=r"engine's outputs are scores, .* has similarity"):
        io_order("scorer", ENTRY, tensors)


def test_output_sizes():
    assert _nbytes((3, 5, 8), "float32", "regions") == 480
    assert _nbytes((3, 5), "float16", "x") == 30
    assert _nbytes((0, 5), "float32", "x") == 0
    with pytest.raises(UserError, match=r"left the shape of output 'similarity' unknown"):
        _nbytes((-1, 4), "float32", "similarity")


def test_missing_engines_name_the_build_engine_command(tiny, tmp_path):
    bundle = Bundle(tmp_path / "my bundle", tiny.bundle.manifest, tiny.bundle.config, None)
    command = build_engine_command(bundle.path, "tensorrt", "fp16", "text_encoder")
    with pytest.raises(UserError) as info:
        engine_candidates(bundle, "text_encoder", "fp16")
    assert str(info.value) == (
        f"{tmp_path / 'my bundle' / 'engines'}: no TensorRT fp16 engine of text_encoder; "
        f"build it: {command}"
    )
    engines = tmp_path / "my bundle" / "engines"
    engines.mkdir(parents=True)
    sidecar = {
        "format_version": 1,
        "backend": "tensorrt",
        "backend_version": "10.3.0",
        "device": {"name": "Orin", "compute_capability": "8.7"},
        "precision": "fp16",
        "graph": "text_encoder",
        "profiles": [],
        "source": {"sha256": "0" * 64},
        "engine": {"sha256": "0" * 64, "file": "text_encoder.fp16.trt10.3.0.sm87.gpu.x.engine"},
        "vocab": {"words_sha256": "0" * 64},
        "build": {},
    }
    (engines / "text_encoder.fp16.trt10.3.0.sm87.gpu.x.json").write_text(json.dumps(sidecar))
    assert [p.name for p in engine_candidates(bundle, "text_encoder", "fp16")] == [
        "text_encoder.fp16.trt10.3.0.sm87.gpu.x.engine"
    ]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_without_tensorrt_opening_says_how_to_install_it(tiny):
    with pytest.raises(UserError, match=r"TensorRT is not installed: on x86_64 or SBSA run"):
        open_backend(tiny.bundle, "tensorrt")


def test_the_runtime_sizes_calls_to_the_largest_profile():
    inputs = [
        {"name": "tokens", "shape": ["batch", "words"]},
        {"name": "lengths", "shape": ["batch"]},
    ]
    assert profile_sizes(inputs, [SMALL, LARGE]) == {
        "batch": DimSizes(1, 32, 64),
        "words": DimSizes(1, 16, 64),
    }
    narrow = {"tokens": ((1, 1), (32, 16), (64, 64)), "lengths": ((2,), (16,), (32,))}
    assert profile_sizes(inputs, [narrow])["batch"] == DimSizes(2, 16, 32)  # the tightest


# --- On the TensorRT API emulator (tests/emulators: a test double, TensorRT itself not run) ---


def test_the_runner_switches_profiles_and_answers_as_onnx_runtime(tiny, tmp_path):
    bundle = load_bundle(copy_bundle(tiny.bundle, tmp_path / "bundle"))
    features, tokens, lengths = encoder_inputs(bundle, batch=8)
    two_profiles = BuildOptions(
        graphs=("text_encoder",),
        min_shapes=("tokens:1x1,lengths:1", "tokens:1x1,lengths:1"),
        opt_shapes=("tokens:2x7,lengths:2", "tokens:8x7,lengths:8"),
        max_shapes=("tokens:3x7,lengths:3", "tokens:8x7,lengths:8"),
    )
    expected = open_backend(bundle).runner("text_encoder")
    with emulated_tensorrt("10.3"):
        build_engines(bundle, two_profiles)
        backend = open_backend(bundle, "tensorrt")
        runner = backend.runner("text_encoder")
        assert backend.sizes("text_encoder") == {"batch": DimSizes(1, 8, 8), "words": (1, 7, 7)}
        for rows in (slice(0, 2), slice(0, 8), slice(3, 5), slice(0, 1)):
            feeds = {"tokens": tokens[rows], "lengths": lengths[rows]}
            for got, want in zip(runner.run(feeds), expected.run(feeds), strict=True):
                np.testing.assert_array_equal(got, want)
        assert runner._profile == 1  # kept: it covers the smaller batches too


def test_an_engine_of_another_tensorrt_or_gpu_is_skipped_for_one_that_fits(tiny, tmp_path):
    bundle = load_bundle(copy_bundle(tiny.bundle, tmp_path / "bundle"))
    for version in ("10.3", "10.16"):  # the 10.16 engine is the newer
        with emulated_tensorrt(version):
            build_engines(bundle, BuildOptions(graphs=("scorer",)))
    with emulated_tensorrt("10.3"):
        assert "trt10.3.0" in open_backend(bundle, "tensorrt").runner("scorer").source.name
    with emulated_tensorrt("11.1"), pytest.raises(UserError) as info:
        open_backend(bundle, "tensorrt").runner("scorer")
    assert "built with tensorrt 10.16.0, running 11.1.0 (rebuild it: scan-deploy" in str(info.value)
    with emulated_tensorrt("10.16", compute_capability="8.7"), pytest.raises(UserError) as info:
        open_backend(bundle, "tensorrt").runner("scorer")
    device = "Emulated GPU (test double)"
    assert f"compute_capability: built for 9.0 ({device}), running on 8.7" in str(info.value)
