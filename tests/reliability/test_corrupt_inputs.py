"""Corrupt and hostile inputs to `index`, `query` and `export`, run as a user runs them (a
subprocess): a flipped byte or negative sizes in an .npy header, NaN/Inf or enormous features, a
bundle graph replaced by garbage or by another graph (its manifest sha256 updated, so only
opening it can tell), manifest fields of the wrong type, features of the wrong shape, a
checkpoint config.json that does not match its weights. Each is exit code 2, one `error:` line
naming the file, and nothing written. Long
captions are read as their first words (one warning) and a UTF-8 byte order mark is dropped
(from captions and from a queries file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scan_deploy.bundle import MANIFEST, sha256_file
from tests.cli_runner import run_cli

pytest.importorskip("onnxruntime")

CAPTIONS = [" ".join(f"w{(i + j) % 12}" for j in range(4)) for i in range(6)]  # 6 tokens each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """tests/export/tiny_bundle.py's bundle (R=5, img_dim=10, at most 7 tokens), 6 images with
    one caption each, and their gallery."""
    pytest.importorskip("torch")
    from scan_deploy.runtime.backends import open_backend
    from scan_deploy.runtime.indexer import index_gallery

    from scan_deploy.bundle import load_bundle
    from tests.export.tiny_bundle import make_bundle

    root = tmp_path_factory.mktemp("reliability")
    bundle = load_bundle(make_bundle(root / "bundle"))
    np.save(root / "ims.npy", np.random.default_rng(0).random((6, 5, 10), dtype=np.float32))
    (root / "caps.txt").write_text("".join(c + "\n" for c in CAPTIONS))
    index_gallery(bundle, open_backend(bundle), root / "ims.npy", root / "caps.txt",
                  root / "gallery", dtype="fp32")  # fmt: skip
    return {"root": root, "bundle": root / "bundle", "ims": root / "ims.npy",
            "caps": root / "caps.txt", "gallery": root / "gallery"}  # fmt: skip


def one_line_error(done, *names: object) -> str:
    """The single `error:` line of a command that exited with 2; it names every one of `names`."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def empty_folder(tmp_path: Path) -> Path:
    """`--out` for a command that must write nothing: a gallery in a folder of its own."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "g"


def assert_nothing_written(out: Path) -> None:
    assert list(out.parent.iterdir()) == []  # neither the gallery nor a temporary folder


def break_npy_header(source: Path, target: Path) -> Path:
    """A copy of `source` with one flipped bit in its header ('<f4' -> ',f4'): numpy's header
    parser raises SyntaxError (a traceback before)."""
    data = bytearray(source.read_bytes())
    data[data.index(b"'descr': '") + len(b"'descr': '")] = ord(",")
    target.write_bytes(bytes(data))
    return target


def replace_graph(tiny: dict[str, Path], target: Path, graph: str, content: bytes) -> Path:
    """A copy of the bundle whose `graph` file holds `content`, the manifest sha256 updated."""
    shutil.copytree(tiny["bundle"], target)
    (target / f"{graph}.onnx").write_bytes(content)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["graphs"][graph]["sha256"] = sha256_file(target / f"{graph}.onnx")
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


# --- 1. a flipped byte in an .npy header ------------------------------------------------------


def test_index_features_with_a_corrupt_header(tiny, tmp_path):
    features = break_npy_header(tiny["ims"], tmp_path / "ims.npy")
    out = empty_folder(tmp_path)
    done = run_cli("index", tiny["bundle"], "--features", features, "--out", out)
    one_line_error(done, f"{features}: format: not a readable .npy file")
    assert_nothing_written(out)


def test_query_image_features_with_a_corrupt_header(tiny, tmp_path):
    features = break_npy_header(tiny["ims"], tmp_path / "q.npy")
    done = run_cli("query", tiny["gallery"], "--image-features", features)
    one_line_error(done, f"{features}: format: not a readable .npy file")


def test_features_whose_header_has_negative_sizes(tiny, tmp_path):
    """(1, -1, -1) float32 needs as many bytes as the file holds: np.memmap's traceback before."""
    data = tiny["ims"].read_bytes().replace(b"(6, 5, 10)", b"(1,-1, -1)")
    features = tmp_path / "ims.npy"
    features.write_bytes(data[: len(data) - 6 * 5 * 10 * 4 + 4])
    out = empty_folder(tmp_path)
    done = run_cli("index", tiny["bundle"], "--features", features, "--out", out)
    one_line_error(done, f"{features}: shape: got (1, -1, -1), expected sizes >= 0")
    assert_nothing_written(out)
    done = run_cli("query", tiny["gallery"], "--image-features", features)
    one_line_error(done, f"{features}: shape: got (1, -1, -1), expected sizes >= 0")


def test_query_a_gallery_shard_with_a_corrupt_header(tiny, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny["gallery"], gallery)
    shard = break_npy_header(*(2 * [gallery / "images" / "shard-00000" / "region_gram.npy"]))
    manifest = json.loads((gallery / "images" / MANIFEST).read_text())
    manifest["shards"][0]["files"]["region_gram"]["sha256"] = sha256_file(shard)
    (gallery / "images" / MANIFEST).write_text(json.dumps(manifest))
    done = run_cli("query", gallery, "w1 w2")
    one_line_error(done, f"{shard}: format: not a readable .npy file", "re-run scan-deploy index")


@pytest.mark.parametrize(("path", "found"), [(None, "null"), (7, "an integer")])
def test_query_a_gallery_whose_bundle_path_is_not_a_string(tiny, tmp_path, path, found):
    """Without --bundle, query opens the recorded bundle: a TypeError traceback before."""
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny["gallery"], gallery)
    manifest = json.loads((gallery / "images" / MANIFEST).read_text())
    manifest["bundle"]["path"] = path
    (gallery / "images" / MANIFEST).write_text(json.dumps(manifest))
    done = run_cli("query", gallery, "w1 w2")
    expected = f"{gallery / 'images' / MANIFEST}: bundle.path: expected a string, got {found}"
    one_line_error(done, expected)


# --- 2. non-finite and enormous features ------------------------------------------------------


def test_non_finite_features_name_the_file_and_the_first_bad_image(tiny, tmp_path):
    features = np.load(tiny["ims"])
    features[3, 1, 2], features[5, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "ims.npy", features)
    out = empty_folder(tmp_path)
    expected = f"{tmp_path / 'ims.npy'}: features: image 3 has NaN or Inf values"
    one_line_error(run_cli("index", tiny["bundle"], "--features", tmp_path / "ims.npy",
                           "--out", out), expected)  # fmt: skip
    assert_nothing_written(out)
    done = run_cli("query", tiny["gallery"], "--image-features", tmp_path / "ims.npy")
    one_line_error(done, expected)


def test_features_beyond_the_models_scale_are_refused(tiny, tmp_path):
    """×1e30 overflows the L2 norm of every region: an all-zero gallery, written silently before."""
    np.save(tmp_path / "ims.npy", np.load(tiny["ims"]) * np.float32(1e30))
    out = empty_folder(tmp_path)
    done = run_cli("index", tiny["bundle"], "--features", tmp_path / "ims.npy", "--out", out)
    one_line_error(
        done, f"{tmp_path / 'ims.npy'}: image 0: the image encoder's output is zero or NaN/Inf"
    )
    assert_nothing_written(out)


def test_image_queries_beyond_the_models_scale_are_refused(tiny, tmp_path):
    """The query of a ×1e30 image: hits scored against zeros, printed silently before."""
    features = np.load(tiny["ims"])
    features[4] *= np.float32(1e30)
    np.save(tmp_path / "big.npy", features)
    done = run_cli("query", tiny["gallery"], "--image-features", tmp_path / "big.npy", "-k", 3)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert lines[0].startswith(
        f"error: {tmp_path / 'big.npy'}: image 4: the image encoder's output is zero or NaN/Inf"
    ), lines[0]
    assert done.stdout == ""


# --- 3. a bundle graph replaced (its manifest sha256 updated) ----------------------------------


def test_index_with_a_garbage_graph(tiny, tmp_path):
    bundle = replace_graph(tiny, tmp_path / "bundle", "text_encoder", b"not a model" * 9)
    out = empty_folder(tmp_path)
    done = run_cli("index", bundle, "--features", tiny["ims"], "--captions", tiny["caps"],
                   "--out", out)  # fmt: skip
    one_line_error(done, f"{bundle / 'text_encoder.onnx'}: ONNX Runtime cannot load the graph")
    assert_nothing_written(out)


def test_index_with_another_graph_in_place_of_one(tiny, tmp_path):
    scorer = (tiny["bundle"] / "scorer.onnx").read_bytes()
    bundle = replace_graph(tiny, tmp_path / "bundle", "image_encoder", scorer)
    out = empty_folder(tmp_path)
    done = run_cli("index", bundle, "--features", tiny["ims"], "--out", out)
    one_line_error(done, f"{bundle / 'image_encoder.onnx'}: inputs: the graph has regions")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shape_ranges", {}, "shape_ranges.batch: expected an object, got null"),
        ("vocab", {"file": "vocab.json"}, "vocab.sha256: expected a string, got null"),
    ],
)
def test_index_with_a_manifest_field_of_the_wrong_type(tiny, tmp_path, field, value, message):
    """KeyError tracebacks before."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest[field] = value
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    out = empty_folder(tmp_path)
    done = run_cli("index", bundle, "--features", tiny["ims"], "--out", out)
    one_line_error(done, f"{bundle / MANIFEST}: {message}")
    assert_nothing_written(out)


@pytest.mark.parametrize("words", [2, "x"])
def test_index_with_a_word_limit_no_caption_fits(tiny, tmp_path, words):
    """words.max 2 (<start> and <end> alone) was accepted; "x" a ValueError traceback."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["shape_ranges"]["words"] = {"min": 1, "opt": 2, "max": words}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    out = empty_folder(tmp_path)
    done = run_cli("index", bundle, "--features", tiny["ims"], "--captions", tiny["caps"],
                   "--out", out)  # fmt: skip
    expected = "got 2, expected at least 3" if words == 2 else "expected an integer, got a string"
    one_line_error(done, f"{bundle / MANIFEST}: shape_ranges.words.max: {expected}")
    assert_nothing_written(out)


def test_query_with_a_garbage_graph(tiny, tmp_path):
    """Indexing images alone never opens the text encoder; the text query does."""
    bundle = replace_graph(tiny, tmp_path / "bundle", "text_encoder", b"not a model" * 9)
    gallery = tmp_path / "gallery"
    assert run_cli("index", bundle, "--features", tiny["ims"], "--out", gallery).returncode == 0
    done = run_cli("query", gallery, "w1 w2")
    one_line_error(done, f"{bundle / 'text_encoder.onnx'}: ONNX Runtime cannot load the graph")


# --- 4. captions and queries longer than the bundle's word limit ------------------------------


def test_a_long_caption_is_read_as_its_first_words(tiny, tmp_path):
    """The bundle takes 7 tokens: <start>, 5 words, <end>. One 1000-word caption padded every
    caption of its shard to 1002 tokens: the gallery's files took 12.2 MB, now 13.8 KB."""
    long = " ".join(f"w{j % 12}" for j in range(1000))
    (tmp_path / "caps.txt").write_text("\n".join([*CAPTIONS[:2], long, *CAPTIONS[3:]]))
    gallery = tmp_path / "gallery"
    done = run_cli("index", tiny["bundle"], "--features", tiny["ims"],
                   "--captions", tmp_path / "caps.txt", "--out", gallery)  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = "warning: 1 of 6 captions longer than the engine's limit of 7 tokens: each read as "
    assert [line for line in done.stderr.splitlines() if "warning" in line] == [
        warning + "its first 5 words"
    ]
    words = np.load(gallery / "captions" / "shard-00000" / "words.npy", mmap_mode="r")
    assert words.shape == (6, 7, 8)
    size = sum(f.stat().st_size for f in gallery.rglob("*") if f.is_file())
    assert size < 20_000, size  # 13,808 bytes; 6,490 are texts.json, the long text twice
    answers = {}
    for query in (long, "w0 w1 w2 w3 w4"):
        done = run_cli("query", gallery, query, "-k", 3, "--json")
        assert done.returncode == 0, done.stderr
        answers[query] = json.loads(done.stdout)["hits"]
    assert answers[long] == answers["w0 w1 w2 w3 w4"]
    assert answers[long][0]["id"] == "2"  # the image of the long caption


# --- 5. a UTF-8 byte order mark ---------------------------------------------------------------


def test_a_byte_order_mark_is_not_part_of_the_first_caption(tiny, tmp_path):
    (tmp_path / "caps.txt").write_text("".join(c + "\n" for c in CAPTIONS), encoding="utf-8-sig")
    gallery = tmp_path / "gallery"
    done = run_cli("index", tiny["bundle"], "--features", tiny["ims"],
                   "--captions", tmp_path / "caps.txt", "--out", gallery)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((gallery / "captions" / "texts.json").read_text()) == CAPTIONS


def test_a_byte_order_mark_is_not_part_of_the_first_query(tiny, tmp_path):
    answers = []
    for name, encoding in (("plain.txt", "utf-8"), ("bom.txt", "utf-8-sig")):
        (tmp_path / name).write_text("".join(c + "\n" for c in CAPTIONS), encoding=encoding)
        done = run_cli("query", tiny["gallery"], "--queries-file", tmp_path / name, "-k", 3,
                       "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers.append([json.loads(line) for line in done.stdout.splitlines()])
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert [a["query"] for a in answers[1]] == CAPTIONS
    assert answers[1] == answers[0]


# --- 6. features of another shape than the bundle's -------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((6, 5, 9), "img_dim: the model expects 10 features per region, the data in"),
        ((6, 4, 10), "shape: has 4 regions per image, the bundle takes 5 (re-export with "),
    ],
)
def test_index_features_of_another_shape(tiny, tmp_path, shape, message):
    np.save(tmp_path / "ims.npy", np.ones(shape, np.float32))
    out = empty_folder(tmp_path)
    done = run_cli("index", tiny["bundle"], "--features", tmp_path / "ims.npy", "--out", out)
    one_line_error(done, message)
    assert_nothing_written(out)


def test_index_features_of_an_image_without_regions(tiny, tmp_path):
    """A padded region is an all-zero row; an image of only such rows has no regions."""
    features = np.ones((6, 5, 10), np.float32)
    features[3] = 0
    np.save(tmp_path / "ims.npy", features)
    out = empty_folder(tmp_path)
    done = run_cli("index", tiny["bundle"], "--features", tmp_path / "ims.npy", "--out", out)
    one_line_error(done, "features: image 3 has no regions (all its features are zero)")
    assert_nothing_written(out)


# --- 7. a checkpoint whose config.json does not match its weights ------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_layers", 100000, "num_layers: is 100000 but model.safetensors has no "),
        ("embed_size", 10**9, "embed_size: is 1000000000 but model.safetensors has img_enc."),
    ],
)
def test_export_a_checkpoint_whose_config_does_not_match_its_weights(
    tmp_path, field, value, message
):
    """SCAN(config) was built first: 100000 GRU layers hung, 1e9 ran out of memory."""
    from scan_deploy.checkpoint import save_checkpoint
    from scan_deploy.config import ModelConfig
    from scan_deploy.model import SCAN
    from scan_deploy.vocab import Vocabulary

    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(12))], threshold=1)
    model = SCAN(ModelConfig(vocab_size=len(vocab), img_dim=10, embed_size=8, word_dim=6))
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, field: value}))
    out = empty_folder(tmp_path)
    done = run_cli("export", tmp_path / "ckpt", "--out", out)
    one_line_error(done, f"{tmp_path / 'ckpt' / 'config.json'}: {message}")
    assert_nothing_written(out)
