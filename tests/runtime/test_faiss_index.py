"""The gallery's optional FAISS shortlist index (`index --faiss-index`): written with the
gallery, recorded and verified by its manifest, memory-mapped, and searched by the shortlist."""

import json

import numpy as np
import pytest
from scan_deploy.runtime import inner_product
from scan_deploy.runtime.gallery import FAISS_INDEX, GalleryWriter, open_gallery
from scan_deploy.runtime.retriever import Retriever
from scan_deploy.runtime.search import Queries, shortlist

from scan_deploy.errors import UserError
from tests.runtime.engines import needs_faiss
from tests.runtime.test_gallery import COUNT, D, fake_bundle, write


def queries(count: int = 4, seed: int = 3) -> Queries:
    pooled = np.random.default_rng(seed).standard_normal((count, D)).astype(np.float32)
    return Queries({"global": pooled / np.linalg.norm(pooled, axis=1, keepdims=True)})


@needs_faiss
@pytest.mark.parametrize("kind", ["images", "captions"])
def test_index_holds_every_item_in_gallery_order(tmp_path, kind):
    path, items, manifest = write(tmp_path, kind, "int8", faiss_index=True)
    record = manifest["faiss_index"]
    assert record["file"] == FAISS_INDEX and record["count"] == COUNT and record["dim"] == D
    gallery = open_gallery(path)
    index = gallery.faiss_index()
    assert index.ntotal == COUNT and gallery.faiss_index() is index  # opened once
    q = queries()
    scores, got = index.search(q.arrays["global"], COUNT)
    fp16_products = q.arrays["global"] @ items["global"].astype(np.float16).astype(np.float32).T
    np.testing.assert_array_equal(got, np.argsort(-fp16_products, axis=1))
    np.testing.assert_allclose(scores, -np.sort(-fp16_products, axis=1), atol=1e-6)


@needs_faiss
def test_shortlist_uses_the_index_with_faiss_and_the_globals_with_numpy(tmp_path):
    path, items, _ = write(tmp_path, "images", "fp16", faiss_index=True)
    gallery = open_gallery(path)
    q = queries(6)
    exact = np.argsort(-(q.arrays["global"] @ items["global"].T), axis=1)[:, :5]
    np.testing.assert_array_equal(shortlist(q, gallery, 5, "numpy"), exact)
    np.testing.assert_array_equal(shortlist(q, gallery, 5, "faiss"), exact)
    assert gallery._faiss is not None  # the faiss engine went through the index
    assert shortlist(q, gallery, 50, "faiss").shape == (6, COUNT)  # capped at the gallery size


@needs_faiss
def test_retriever_warns_when_the_index_cannot_be_used(tmp_path, monkeypatch, caplog):
    path, _, _ = write(tmp_path, "images", "fp16", name="g/images", faiss_index=True)
    backend = object()
    monkeypatch.setattr("scan_deploy.runtime.retriever.open_backend", lambda *a, **k: backend)
    monkeypatch.setattr(Retriever, "__init__", lambda self, *args: None)
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

    path, items, manifest = write(tmp_path, "images", "fp16", faiss_index=True)
    index_file = path / FAISS_INDEX
    size = index_file.stat().st_size
    index_file.write_bytes(b"\0" * size)  # same size, garbage
    with pytest.raises(UserError, match=r"shortlist.faiss: not a readable FAISS index: re-run"):
        open_gallery(path, verify=False).faiss_index()
    other = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    other.add(items["global"])
    faiss.write_index(other, str(index_file))
    manifest["faiss_index"]["bytes"] = index_file.stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"is IndexScalarQuantizer of 11 × 8, expected a float16 "):
        open_gallery(path, verify=False).faiss_index()


def test_gallery_without_index_has_none(tmp_path):
    path, _, manifest = write(tmp_path, "images", "fp32")
    assert manifest["faiss_index"] is None and open_gallery(path).faiss_index() is None


def test_index_needs_faiss_and_writes_nothing_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(inner_product, "_faiss", lambda: None)
    with pytest.raises(UserError, match=r"faiss is not installed: pip install 'scan-deploy\[faiss"):
        GalleryWriter(tmp_path / "g", "images", fake_bundle(tmp_path), faiss_index=True)
    assert not (tmp_path / "g").exists()


@needs_faiss
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m, p: m["faiss_index"].update(count=3), r"faiss_index.count: got 3, expected 11"),
        (lambda m, p: m["faiss_index"].update(count=11.0), r"faiss_index.count: got 11.0"),
        (lambda m, p: m["faiss_index"].update(file="../x"), r"faiss_index.file: got '../x'"),
        (lambda m, p: m["faiss_index"].update(bytes=5), r"shortlist.faiss: size: is \d+ bytes"),
        (lambda m, p: m["faiss_index"].update(dim=4), r"faiss_index.dim: got 4, expected 8"),
        (lambda m, p: m["faiss_index"].update(type="HNSW"), r"faiss_index.type: got 'HNSW'"),
        (lambda m, p: m.update(faiss_index=[]), r"faiss_index: expected an object, got a list"),
        (lambda m, p: (p / FAISS_INDEX).unlink(), r"shortlist.faiss: missing"),
        (
            lambda m, p: (p / FAISS_INDEX).write_bytes((p / FAISS_INDEX).read_bytes()[:-1] + b"x"),
            r"shortlist.faiss: sha256: is \w{12}…, the manifest expects \w{12}… \(file changed",
        ),
    ],
)
def test_a_bad_index_is_refused_in_one_line(tmp_path, change, message):
    path, _, manifest = write(tmp_path, "images", "int8", faiss_index=True)
    change(manifest, path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message) as caught:
        open_gallery(path)
    assert "\n" not in str(caught.value)
