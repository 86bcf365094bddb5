"""The TensorRT path end to end on the TensorRT API emulator (tests/emulators: a test double that
computes with ONNX Runtime; TensorRT itself is not run): `build-engine --backend tensorrt` ->
`index` -> `query` / `bench --backend tensorrt`, for fp32, fp16 and int8 graphs of a t2i and an
i2t bundle, on TensorRT 10.3, 10.16 and 11.1, answering exactly as the ONNX Runtime backend does;
the engine's profile sizes every call (the shape contract), and a shape outside it is refused
in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from scan_deploy.calibration.calibrate import _write_variant
from scan_deploy.calibration.data import image_feeds, scorer_feeds, text_feeds
from scan_deploy.calibration.fp16 import to_fp16
from scan_deploy.calibration.int8 import quantize
from scan_deploy.export.verify import session
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.base import CallSizes
from typer.testing import CliRunner

from scan_deploy import cli
from scan_deploy.bundle import load_bundle
from scan_deploy.choices import Graph
from scan_deploy.precomp import PrecompSplit
from tests.cli_runner import run_cli

from ..export.tiny_bundle import make_bundle
from .tensorrt_emulator import emulated_tensorrt
from .tiny_i2t import make_i2t_bundle

IMAGES = 24  # three blocks of the tiny bundles' batch of 8
WORDS = [f"w{i}" for i in range(12)]
QUERIES = ["w1 w2 w3", "w4", "w0 w5 w6 w7 w8 w9 w10 w11 w1 w2", "w11 w3 w3"]
# Every precision and direction, and each TensorRT version twice.
CASES = [
    ("t2i", "fp32", "10.3"),
    ("t2i", "fp16", "10.16"),
    ("t2i", "int8", "11.1"),
    ("i2t", "fp32", "11.1"),
    ("i2t", "fp16", "10.3"),
    ("i2t", "int8", "10.16"),
]


def _write_data(root: Path) -> dict[str, Path]:
    """Features of IMAGES images (R=5, 10 features; a third of 4 and a third of 3 regions,
    zero-padded: adaptive features), 5 captions each of 1 to 8 words (the longest beyond the
    bundles' 7 tokens), image queries (two padded) and text queries."""
    rng = np.random.default_rng(7)
    files = {name: root / name for name in ("ims.npy", "caps.txt", "q.npy", "queries.txt")}
    images = rng.random((IMAGES, 5, 10), dtype=np.float32)
    for i, image in enumerate(images):
        image[5 - i % 3 :] = 0
    np.save(files["ims.npy"], images)
    captions = [" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(IMAGES * 5)]
    files["caps.txt"].write_text("\n".join(captions) + "\n")
    np.save(
        files["q.npy"], images[:3] + rng.random((3, 5, 10), dtype=np.float32) * (images[:3] > 0)
    )
    files["queries.txt"].write_text("\n".join(QUERIES) + "\n")
    return files


def _add_variants(path: Path, data: dict[str, Path], scratch: Path) -> None:
    """Real fp16 (FP16 compute, FP32 I/O) and int8 (Q/DQ) variants, as `calibrate` writes
    them, without its accuracy gate (these models are untrained)."""
    bundle = load_bundle(path)
    graphs = {name: onnx.load(str(bundle.graph_path(name))) for name in Graph}
    _write_variant(bundle, "fp16", {n: to_fp16(g) for n, g in graphs.items()}, {})
    captions = data["caps.txt"].read_text().splitlines()
    split = PrecompSplit(np.load(data["ims.npy"]), captions, 5, data["ims.npy"])
    sessions = {name: session(graph) for name, graph in graphs.items()}
    t2i = bundle.config.cross_attn == "t2i"
    feeds = {
        "image_encoder": image_feeds(split),
        "text_encoder": text_feeds(split, bundle.vocab),
        "scorer": scorer_feeds(sessions, split, bundle.vocab, t2i),
    }
    int8 = {n: quantize(g, feeds[n], "max", scratch / f"{n}.json") for n, g in graphs.items()}
    _write_variant(load_bundle(path), "int8", int8, {})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The t2i and i2t tiny bundles with fp16 and int8 variants, and the data files."""
    root = tmp_path_factory.mktemp("tensorrt_e2e")
    data = _write_data(root)
    found = {
        "t2i": make_bundle(root / "t2i" / "bundle"),
        "i2t": make_i2t_bundle(root / "i2t")[0],
    }
    for direction, path in found.items():
        _add_variants(path, data, root / direction)
    return {**found, **data}


def _cli(*args: object) -> str:
    """Run a command in this process; its stdout."""
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def _hits(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _search(bundles: dict[str, Path], gallery: Path, backend: str, precision: str) -> list:
    """Text and image queries, exhaustive and re-ranked, on `backend`."""
    common = ("-k", 5, "--backend", backend, "--precision", precision, "--json")
    texts = ("--queries-file", bundles["queries.txt"], "--image-features", bundles["q.npy"])
    answers = _hits(_cli("query", gallery, *texts, *common))
    answers += _hits(_cli("query", gallery, *texts, "--shortlist", 12, *common))
    return answers


@pytest.mark.parametrize(("direction", "precision", "version"), CASES)
def test_build_index_query_bench_answer_as_onnx_runtime(
    bundles, tmp_path, direction, precision, version
):
    bundle = shutil.copytree(bundles[direction], tmp_path / "bundle")
    files = ("--features", bundles["ims.npy"], "--captions", bundles["caps.txt"])
    options = ("--precision", precision, "--dtype", "fp32")
    galleries = {backend: tmp_path / backend for backend in ("onnxruntime", "tensorrt")}
    _cli("index", bundle, *files, "--out", galleries["onnxruntime"], *options)
    expected = _search(bundles, galleries["onnxruntime"], "onnxruntime", precision)
    with emulated_tensorrt(version) as trt:
        rows = json.loads(_cli("build-engine", bundle, "--precision", precision, "--json"))
        _cli("index", bundle, *files, "--out", galleries["tensorrt"], *options,
             "--backend", "tensorrt")  # fmt: skip
        answers = _search(bundles, galleries["tensorrt"], "tensorrt", precision)
        report = json.loads(_cli("bench", galleries["tensorrt"], "--batch", 1, "--batch", 3,
                                 "--iterations", 1, "--warmup", 0, "--backend", "tensorrt",
                                 "--precision", precision, "--json"))  # fmt: skip
    assert [row["graph"] for row in rows] == list(Graph)
    assert {row["backend_version"] for row in rows} == {trt.__version__}
    assert answers == expected  # the same ranks, ids and float32 scores, bit for bit
    assert len(answers) == 2 * (len(QUERIES) + 3)
    assert report["backend"] == f"tensorrt {trt.__version__}"
    assert report["precision"] == precision
    assert [row["batch"] for row in report["batches"]] == [1, 3]
    for kind in ("images", "captions"):  # the galleries hold the same numbers
        for array in (galleries["onnxruntime"] / kind).glob("*/*.npy"):
            other = galleries["tensorrt"] / array.relative_to(galleries["onnxruntime"])
            np.testing.assert_array_equal(np.load(other), np.load(array), err_msg=str(array))


def test_a_cli_process_finds_the_emulator_through_pythonpath(bundles, tmp_path):
    bundle = shutil.copytree(bundles["t2i"], tmp_path / "bundle")
    gallery = tmp_path / "gallery"
    with emulated_tensorrt("11.1"):
        for args in (
            ("build-engine", bundle, "--json"),
            ("index", bundle, "--features", bundles["ims.npy"], "--out", gallery,
             "--backend", "tensorrt"),
        ):  # fmt: skip
            done = run_cli(*args)
            assert done.returncode == 0, done.stderr
        done = run_cli("query", gallery, QUERIES[0], "-k", 3, "--backend", "tensorrt", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["hits"]) == 3
    assert "[TRT]" not in done.stdout + done.stderr  # TensorRT's messages are ours to print


# The text encoder and the scorer built for captions of at most 5 tokens (the bundle: 7).
SHORT = [
    "--min-shapes", "tokens:1x1,words:1x1x8",
    "--opt-shapes", "tokens:8x5,words:8x5x8",
    "--max-shapes", "tokens:8x5,words:8x5x8",
]  # fmt: skip


def test_the_engines_profile_sizes_every_call(bundles, tmp_path, caplog):
    bundle = shutil.copytree(bundles["t2i"], tmp_path / "bundle")
    with emulated_tensorrt("10.3"):
        _cli("build-engine", bundle, *SHORT)
        backend = open_backend(load_bundle(bundle), "tensorrt")
        assert CallSizes.of(backend) == CallSizes(8, 8, 8, 8, max_tokens=5)
        assert CallSizes.of(open_backend(load_bundle(bundle))).max_tokens == 7  # the manifest's
        gallery = tmp_path / "gallery"
        _cli("index", bundle, "--features", bundles["ims.npy"], "--captions", bundles["caps.txt"],
             "--out", gallery, "--backend", "tensorrt")  # fmt: skip
        long, short = (
            _hits(_cli("query", gallery, text, "-k", 5, "--backend", "tensorrt", "--json"))[0]
            for text in ("w4 w5 w6 w7 w8 w9", "w4 w5 w6")  # 8 tokens: read as its first 3 words
        )
    assert long["hits"] == short["hits"]
    cut = (
        "1 of 1 queries longer than the engine's limit of 5 tokens: each read as its first 3 words"
    )
    assert cut in caplog.text


def test_a_shape_outside_the_profile_is_refused_in_one_line(bundles, tmp_path):
    """A caption gallery indexed on ONNX Runtime (words up to the bundle's 7 tokens) cannot be
    scored by a scorer engine built for 5: the image query names the engine and its ranges."""
    bundle = shutil.copytree(bundles["t2i"], tmp_path / "bundle")
    gallery = tmp_path / "gallery"
    _cli("index", bundle, "--features", bundles["ims.npy"], "--captions", bundles["caps.txt"],
         "--out", gallery)  # fmt: skip
    with emulated_tensorrt("10.16"):
        _cli("build-engine", bundle, *SHORT)
        done = run_cli("query", gallery, "--image-features", bundles["q.npy"], "--backend",
                       "tensorrt")  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {bundle / 'engines'}/scorer.fp32.trt10.16.0.sm90.gpu.")
    assert "words:8x7x8" in line and "are outside every optimization profile of the engine" in line
    assert "words:1x1x8..8x5x8" in line and "rebuild it with --min-shapes/--max-shapes" in line
