"""The TensorRT backend's logic that runs without TensorRT: profile selection, I/O ordering from
the manifest, output buffer sizing, engine discovery and its build-engine hint. The runner
itself needs TensorRT and a GPU (its buffers are tested in tests/runtime/test_cuda_buffers.py)."""

import importlib.util
import json
from dataclasses import dataclass

import pytest
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.tensorrt_backend import (
    _nbytes,
    covers,
    engine_candidates,
    io_order,
    select_profile,
)

from scan_deploy.bundle import Bundle
from scan_deploy.engine_sidecar import build_engine_command
from scan_deploy.errors import UserError

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
        select_profile([SMALL, LARGE], shapes(65, 3))
    assert str(info.value) == (
        "input shapes tokens:65x3, lengths:65 are outside every optimization profile of the "
        "engine (tokens:1x1..8x16, lengths:1..8; tokens:1x1..64x64, lengths:1..64); rebuild it "
        "with --min-shapes/--max-shapes that cover them"
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
