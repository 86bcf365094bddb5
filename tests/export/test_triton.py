"""The Triton model repository: every config.pbtxt parsed by tritonclient's own ModelConfig
protobuf and checked against the manifest; the models are the bundle's files (ONNX) or the
engines build-engine made (TensorRT, on the emulator); refusals in one line."""

import hashlib
import json

import pytest

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (the dev extra) missing"
)
from google.protobuf import text_format  # noqa: E402
from scan_deploy.export.triton import export_triton  # noqa: E402

from scan_deploy.bundle import load_bundle  # noqa: E402
from scan_deploy.errors import UserError  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.export.tiny_bundle import add_variant, make_bundle  # noqa: E402

TYPES = model_config_pb2.DataType


def parsed(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("triton") / "bundle")
    add_variant(path, "fp16")
    return load_bundle(path)


def test_the_repository_parses_and_matches_the_manifest(bundle, tmp_path):
    repo = tmp_path / "repo"
    export_triton(bundle, repo, precision="fp16")
    image = parsed(repo / "scan_image_encoder" / "config.pbtxt")
    assert image.platform == "onnxruntime_onnx" and image.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in image.input] == [
        ("features", TYPES.TYPE_FP32, [5, 10])  # (batch, regions=5 fixed, img_dim 10)
    ]
    assert [(o.name, list(o.dims)) for o in image.output] == [
        ("regions", [5, 8]),
        ("region_gram", [5, 5]),
        ("global", [8]),
    ]
    assert image.dynamic_batching.max_queue_delay_microseconds == 100
    text = parsed(repo / "scan_text_encoder" / "config.pbtxt")
    tokens, lengths = text.input
    assert (tokens.name, tokens.data_type, list(tokens.dims)) == ("tokens", TYPES.TYPE_INT64, [-1])
    assert list(lengths.dims) == [1] and list(lengths.reshape.shape) == []  # (batch,) per item
    scorer = parsed(repo / "scan_scorer" / "config.pbtxt")
    assert scorer.max_batch_size == 0 and not scorer.HasField("dynamic_batching")
    assert {i.name: list(i.dims) for i in scorer.input} == {
        "regions": [-1, 5, 8],
        "words": [-1, -1, 8],
        "lengths": [-1],
        "region_gram": [-1, 5, 5],
    }
    for graph in ("image_encoder", "text_encoder", "scorer"):
        model = repo / f"scan_{graph}" / "1" / "model.onnx"
        assert sha(model) == bundle.graph(graph, "fp16")["sha256"]


def test_the_ensemble_wires_both_encoders(bundle, tmp_path):
    repo = tmp_path / "repo"
    export_triton(bundle, repo)
    ensemble = parsed(repo / "scan_encoders" / "config.pbtxt")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 8
    assert [i.name for i in ensemble.input] == ["features", "tokens", "lengths"]
    outputs = [o.name for o in ensemble.output]
    assert outputs == ["regions", "region_gram", "image_global", "words", "caption_gram",
                       "text_global"]  # fmt: skip
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["scan_image_encoder", "scan_text_encoder"]
    assert dict(steps[1].output_map) == {
        "words": "words",
        "caption_gram": "caption_gram",
        "global": "text_global",
    }
    for step in steps:  # every model a step names is in the repository, with a version
        assert (repo / step.model_name / "1").is_dir()
        names = {i.name for i in parsed(repo / step.model_name / "config.pbtxt").input}
        assert set(step.input_map) == names
    assert (repo / "scan_encoders" / "1").is_dir()
    marker = json.loads((repo / "scan_encoders" / "scan_deploy.json").read_text())
    assert marker["bundle"] == str(bundle.path) and marker["backend"] == "onnxruntime"


def test_tensorrt_models_are_the_engines(bundle, tmp_path):
    from tests.runtime.tensorrt_emulator import emulated_tensorrt

    with emulated_tensorrt("10.3"):
        assert run_cli("build-engine", bundle.path, "--json").returncode == 0
    repo = tmp_path / "repo"
    export_triton(bundle, repo, backend="tensorrt")
    for graph in ("image_encoder", "text_encoder", "scorer"):
        plan = repo / f"scan_{graph}" / "1" / "model.plan"
        (engine,) = (bundle.path / "engines").glob(f"{graph}.fp32.*.engine")
        assert sha(plan) == sha(engine)
        assert parsed(plan.parent.parent / "config.pbtxt").platform == "tensorrt_plan"


def test_refusals_are_one_line(bundle, tmp_path):
    with pytest.raises(UserError, match="no TensorRT int8 engine of image_encoder; build it"):
        export_triton(bundle, tmp_path / "a", backend="tensorrt", precision="int8")
    assert not (tmp_path / "a").exists()
    done = run_cli("export-triton", bundle.path, "--out", tmp_path / "b", "--precision", "int8")
    assert done.returncode == 2 and "the bundle has no int8 graphs" in done.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("not a repository")
    done = run_cli("export-triton", bundle.path, "--out", tmp_path / "c", "--force")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "c" / "mine.txt").exists()
    done = run_cli("export-triton", bundle.path, "--out", tmp_path / "d", "--backend", "torch")
    assert done.returncode == 2 and "not torch" in done.stderr
    done = run_cli("export-triton", bundle.path, "--out", tmp_path / "e")
    assert done.returncode == 0, done.stderr
    assert "scan_encoders" in done.stdout
