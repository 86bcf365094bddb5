"""The gallery's optional FAISS index of the `global` first stage (`index --first-stage global`):
written with the gallery, recorded and verified by its manifest, memory-mapped, and searched by
the shortlist; galleries of format 1 (`faiss_index`) still open."""

import json

import numpy as np
import pytest
from scan_deploy.runtime import inner_product
from scan_deploy.runtime.first_stage import global_shortlist as shortlist
from scan_deploy.runtime.gallery import open_gallery
from scan_deploy.runtime.gallery_writer import GalleryWriter
from scan_deploy.runtime.retriever import Retriever
from scan_deploy.runtime.search import Queries

from scan_deploy.choices import FirstStage
from scan_deploy.errors import UserError
from tests.runtime.engines import needs_faiss
from tests.runtime.test_gallery import COUNT, D, fake_bundle, write

FAISS_INDEX = "global.faiss"


def queries(count: int = 4, seed: int = 3) -> Queries:
    pooled = np.random.default_rng(seed).standard_normal((count, D)).astype(np.float32)
    return Queries({"global": pooled / np.linalg.norm(pooled, axis=1, keepdims=True)})


@needs_faiss
@pytest.mark.parametrize("kind", ["images", "captions"])
def test_index_holds_every_item_in_gallery_order(tmp_path, kind):
    path, items, manifest = write(tmp_path, kind, "int8", first_stages={"global": None})
    record = manifest["first_stages"]["global"]
    assert record["file"] == FAISS_INDEX and record["vectors"] == COUNT and record["dim"] == D
    assert record["factory"] == "SQfp16" and record["type"] == "IndexScalarQuantizer"
    gallery = open_gallery(path)
    index = gallery.stage_index(FirstStage.GLOBAL)
    assert index.ntotal == COUNT and gallery.stage_index(FirstStage.GLOBAL) is index  # once
    q = queries()
    scores, got = index.search(q.arrays["global"], COUNT)
    fp16_products = q.arrays["global"] @ items["global"].astype(np.float16).astype(np.float32).T
    np.testing.assert_array_equal(got, np.argsort(-fp16_products, axis=1))
    np.testing.assert_allclose(scores, -np.sort(-fp16_products, axis=1), atol=1e-6)


@needs_faiss
def test_shortlist_uses_the_index_with_faiss_and_the_globals_with_numpy(tmp_path):
    path, items, _ = write(tmp_path, "images", "fp16", first_stages={"global": None})
    gallery = open_gallery(path)
    q = queries(6)
    exact = np.argsort(-(q.arrays["global"] @ items["global"].T), axis=1)[:, :5]
    np.testing.assert_array_equal(shortlist(q, gallery, 5, "numpy"), exact)
    np.testing.assert_array_equal(shortlist(q, gallery, 5, "faiss"), exact)
    assert FirstStage.GLOBAL in gallery._indexes  # the faiss engine went through the index
    assert shortlist(q, gallery, 50, "faiss").shape == (6, COUNT)  # capped at the gallery size


@needs_faiss
def test_retriever_warns_when_the_index_cannot_be_used(tmp_path, monkeypatch, caplog):
    path, _, _ = write(tmp_path, "images", "fp16", name="g/images", first_stages={"global": None})
    backend = object()
    monkeypatch.setattr("scan_deploy.runtime.retriever.open_backend", lambda *a, **k: backend)
    monkeypatch.setattr(Retriever, "__init__", lambda self, *args: setattr(self, "_owned", []))
    bundle = fake_bundle(tmp_path)
    monkeypatch.setattr("scan_deploy.runtime.gallery.Gallery.check_bundle", lambda *a: None)
    Retriever.open(bundle, tmp_path / "g")
    assert "FAISS index" not in caplog.text
    monkeypatch.setattr(inner_product, "_faiss", lambda: None)
    Retriever.open(bundle, tmp_path / "g")
    assert "unused FAISS index in" in caplog.text and "faiss is not installed" in caplog.text


@needs_faiss
def test_an_index_that_is_not_ours_is_refused_when_opened(tmp_path):
    """Without `verify` the sha256 is not read: opening the index checks what it is."""
    import faiss

    path, items, manifest = write(tmp_path, "images", "fp16", first_stages={"global": None})
    index_file = path / FAISS_INDEX
    size = index_file.stat().st_size
    index_file.write_bytes(b"\0" * size)  # same size, garbage
    with pytest.raises(UserError, match=r"global.faiss: not a readable FAISS index: re-run"):
        open_gallery(path, verify=False).stage_index(FirstStage.GLOBAL)
    other = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    other.add(items["global"])
    faiss.write_index(other, str(index_file))
    manifest["first_stages"]["global"]["bytes"] = index_file.stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"is an L2 IndexScalarQuantizer of 11 × 8, expected an "):
        open_gallery(path, verify=False).stage_index(FirstStage.GLOBAL)


def test_gallery_without_index_has_none(tmp_path):
    path, _, manifest = write(tmp_path, "images", "fp32")
    gallery = open_gallery(path)
    assert manifest["first_stages"] == {} and gallery.stage_index(FirstStage.GLOBAL) is None


def test_index_needs_faiss_and_writes_nothing_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(inner_product, "_faiss", lambda: None)
    with pytest.raises(UserError, match=r"faiss is not installed: pip install 'scan-deploy\[faiss"):
        GalleryWriter(
            tmp_path / "g", "images", fake_bundle(tmp_path), first_stages={"global": None}
        )
    assert not (tmp_path / "g").exists()


@needs_faiss
def test_a_format_1_gallery_opens_with_its_index_as_the_global_stage(tmp_path):
    """Format 1 recorded its one float16 index of the globals as `faiss_index`."""
    path, items, manifest = write(tmp_path, "images", "fp16", first_stages={"global": None})
    record = manifest.pop("first_stages")["global"]
    (path / FAISS_INDEX).rename(path / "shortlist.faiss")
    old = {"file": "shortlist.faiss", "type": "faiss IndexScalarQuantizer QT_fp16 "}
    old.update(count=COUNT, dim=D, bytes=record["bytes"], sha256=record["sha256"])
    (path / "manifest.json").write_text(
        json.dumps({**manifest, "format_version": 1, "faiss_index": old})
    )
    gallery = open_gallery(path)
    assert gallery.first_stages[FirstStage.GLOBAL]["factory"] == "SQfp16"
    q = queries(6)
    exact = np.argsort(-(q.arrays["global"] @ items["global"].T), axis=1)[:, :5]
    np.testing.assert_array_equal(shortlist(q, gallery, 5, "faiss"), exact)
    manifest["format_version"] = 5
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"format_version: got 5, expected one of 1, 2, 3, 4"):
        open_gallery(path)
