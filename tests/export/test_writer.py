"""`export_bundle`: parity checks before writing, the manifest (with the weights digest), and the
bundle loader's checks."""

import json

import pytest
import torch
from scan_deploy.export.verify import session
from scan_deploy.export.writer import ParityError, ShapeRanges, export_bundle

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import Checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary
from scan_deploy.weights import weights_digest

RANGES = ShapeRanges.create(max_batch=8, regions=5, max_words=7)


def _checkpoint(tmp_path, **overrides) -> Checkpoint:
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(12))], threshold=1)
    config = ModelConfig(vocab_size=len(vocab), img_dim=10, embed_size=8, word_dim=6, **overrides)
    torch.manual_seed(0)
    return Checkpoint(SCAN(config).eval(), vocab, tmp_path / "ckpt", {"epoch": 1})


@pytest.mark.parametrize("overrides", [{}, {"cross_attn": "i2t", "bi_gru": True}])
def test_bundle_has_graphs_manifest_and_parity_report(tmp_path, overrides):
    ckpt = _checkpoint(tmp_path, **overrides)
    manifest = export_bundle(ckpt, tmp_path / "bundle", 17, RANGES)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.config == ckpt.config and bundle.vocab == ckpt.vocab
    assert manifest == json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["shape_ranges"]["batch"] == {"min": 1, "opt": 8, "max": 8}
    text = manifest["graphs"]["text_encoder"]
    assert text["inputs"] == [
        {"name": "tokens", "dtype": "int64", "shape": ["batch", "words"]},
        {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
    ]
    assert [o["name"] for o in manifest["graphs"]["scorer"]["outputs"]] == ["similarity"]
    assert {row["batch"] for row in manifest["export_parity"]} == {1, 8}
    assert all(row["max_abs"] <= row["tolerance"] for row in manifest["export_parity"])
    checked = {(row["graph"], row["output"]) for row in manifest["export_parity"]}
    assert {("explain", "attention"), ("explain", "similarity")} <= checked
    explain = manifest["explain"]
    assert explain["file"] == "explain.onnx" and "explain" not in manifest["graphs"]
    assert [o["name"] for o in explain["outputs"]] == ["similarity", "attention"]
    # the written scorer runs on its own
    scorer = session(str(bundle.graph_path("scorer")))
    assert [i.name for i in scorer.get_inputs()][:1] == ["regions"]


def test_refuses_non_empty_output_without_force(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_bundle(ckpt, tmp_path / "bundle", 17, RANGES)
    with pytest.raises(UserError, match="not a bundle folder"):  # --force replaces bundles only
        export_bundle(ckpt, tmp_path / "bundle", 17, RANGES, force=True)
    (tmp_path / "bundle" / "keep.txt").unlink()
    export_bundle(ckpt, tmp_path / "bundle", 17, RANGES)
    (tmp_path / "bundle" / "keep.txt").write_text("x")
    export_bundle(ckpt, tmp_path / "bundle", 17, RANGES, force=True)
    assert not (tmp_path / "bundle" / "keep.txt").exists()


def test_mismatch_aborts_without_writing(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    import scan_deploy.export.writer as writer

    real = writer.build_graphs

    def tampered(model, opset):
        graphs = real(model, opset)
        with torch.no_grad():
            model.img_enc.fc.bias.add_(0.5)  # the reference now differs from the graphs
        return graphs

    monkeypatch.setattr(writer, "build_graphs", tampered)
    with pytest.raises(ParityError, match="image_encoder: regions: ONNX Runtime differs"):
        export_bundle(ckpt, tmp_path / "bundle", 17, RANGES)
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_loader_names_corrupted_truncated_or_missing_files(tmp_path):
    export_bundle(_checkpoint(tmp_path), tmp_path / "bundle", 17, RANGES)
    scorer = tmp_path / "bundle" / "scorer.onnx"
    data = scorer.read_bytes()
    scorer.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"scorer.onnx: sha256: .*re-export"):
        load_bundle(tmp_path / "bundle")
    scorer.unlink()
    with pytest.raises(UserError, match="scorer.onnx: missing"):
        load_bundle(tmp_path / "bundle")
    with pytest.raises(UserError, match="manifest.json: file not found, expected the manifest"):
        load_bundle(tmp_path)


def test_loader_checks_manifest_fields(tmp_path):
    export_bundle(_checkpoint(tmp_path), tmp_path / "bundle", 17, RANGES)
    path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["vocab_size"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json: vocab: has 16 words, the model expects 99"):
        load_bundle(tmp_path / "bundle")
    manifest["format_version"] = 7
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format_version: got 7, expected 1"):
        load_bundle(tmp_path / "bundle")


def test_shape_ranges_are_validated():
    with pytest.raises(UserError, match="min <= opt <= max"):
        ShapeRanges.create(max_batch=0, regions=36, max_words=10)
    for words in (2, 1, 0):  # <start> and <end> take two tokens
        with pytest.raises(UserError, match=f"^max_words: got {words}, expected at least 3 "):
            ShapeRanges.create(max_batch=8, regions=36, max_words=words)
    assert (RANGES.regions.min, RANGES.regions.opt, RANGES.regions.max) == (5, 5, 5)
    assert (RANGES.words.min, RANGES.words.opt, RANGES.words.max) == (1, 7, 7)


def test_manifest_records_the_weights_digest(tmp_path):
    ckpt = _checkpoint(tmp_path)
    manifest = export_bundle(ckpt, tmp_path / "bundle", 17, RANGES)
    state = ckpt.model.state_dict()
    assert manifest["weights"] == {"sha256": weights_digest(state)}
    assert weights_digest(dict(reversed(state.items()))) == manifest["weights"]["sha256"]
    bias = state["img_enc.fc.bias"]
    changed = {**state, "img_enc.fc.bias": bias + 1}
    assert weights_digest(changed) != manifest["weights"]["sha256"]
