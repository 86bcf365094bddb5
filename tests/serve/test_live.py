"""`serve` switches to each new generation of its gallery (append, delete, compact) without a
restart: answers equal a retriever opened on that generation; a request keeps the snapshot it
started on, which is closed when its last user is done; a generation that cannot be opened
leaves the server on the one it has."""

import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from scan_deploy.runtime.backends import open_backend  # noqa: E402
from scan_deploy.runtime.generations import (  # noqa: E402
    CURRENT,
    append_gallery,
    compact_gallery,
    delete_items,
)
from scan_deploy.runtime.indexer import index_gallery  # noqa: E402
from scan_deploy.runtime.retriever import Retriever  # noqa: E402
from scan_deploy.serve.app import ServeSettings, create_app  # noqa: E402
from scan_deploy.serve.live import LiveGallery  # noqa: E402

from scan_deploy.bundle import load_bundle  # noqa: E402
from scan_deploy.errors import UserError  # noqa: E402
from scan_deploy.precomp import load_split  # noqa: E402

SETTINGS = ServeSettings(max_wait=0.001, watch=0.05)


@pytest.fixture
def gallery(trained, tmp_path):
    """(bundle, gallery of the test split's first 300 images, folder with the last 100 as
    `rest_ims.npy` / `rest_caps.txt` / `rest_ids.txt`, test split)."""
    data, _, bundle_path = trained
    bundle, split = load_bundle(bundle_path), load_split(data, "test")
    features = np.asarray(split.images)
    for name, rows in (("first", slice(0, 300)), ("rest", slice(300, 400))):
        np.save(tmp_path / f"{name}_ims.npy", features[rows])
        ids = "".join(f"{n}\n" for n in range(400)[rows])
        (tmp_path / f"{name}_ids.txt").write_text(ids)
        lines = split.captions[rows.start * 5 : rows.stop * 5]
        (tmp_path / f"{name}_caps.txt").write_text("".join(c + "\n" for c in lines))
    with open_backend(bundle) as backend:
        index_gallery(bundle, backend, tmp_path / "first_ims.npy", tmp_path / "first_caps.txt",
                      tmp_path / "gallery", dtype="fp32", shard_size=128)  # fmt: skip
    return bundle, tmp_path / "gallery", tmp_path, split


def _ids(client, queries, k=5):
    response = client.post("/v1/search/text", json={"queries": queries, "k": k})
    assert response.status_code == 200, response.text
    return [[hit["id"] for hit in result["hits"]] for result in response.json()["results"]]


def _expected(gallery, queries, k=5):
    with Retriever.open(None, gallery) as fresh:
        return [[hit.id for hit in hits] for hits in fresh.search_text(queries, k=k)]


def _wait_for(client, generation):
    deadline = time.monotonic() + 20
    while client.get("/readyz").json()["generation"] != generation:
        assert time.monotonic() < deadline, f"generation {generation} was not served in 20 s"
        time.sleep(0.02)


def test_serve_follows_append_delete_and_compact(gallery):
    bundle, root, folder, split = gallery
    queries = split.captions[5 * 300 : 5 * 320 : 5]  # of images 300..319: appended later
    with (
        Retriever.open(bundle, root) as retriever,
        TestClient(create_app(retriever, SETTINGS, gallery=root)) as client,
    ):
        assert client.get("/readyz").json()["generation"] == 0
        assert _ids(client, queries) == _expected(root, queries)
        with open_backend(bundle) as backend:
            append_gallery(bundle, backend, root, folder / "rest_ims.npy", folder / "rest_caps.txt")
        _wait_for(client, 1)
        grown = _ids(client, queries)
        assert grown == _expected(root, queries)
        assert any(int(image) >= 300 for hits in grown for image in hits)
        gone = grown[0][0]
        delete_items(root, [gone])
        _wait_for(client, 2)
        shrunk = _ids(client, queries)
        assert shrunk == _expected(root, queries) and shrunk[0] == grown[0][1:] + shrunk[0][4:]
        assert all(gone not in hits for hits in shrunk)
        refused = client.post("/v1/explain", json={"text": queries[0], "id": gone})
        assert refused.status_code == 404  # gone from every route
        assert refused.json()["error"]["message"] == f"image {gone!r}: not in the gallery"
        compact_gallery(root)
        _wait_for(client, 3)
        assert _ids(client, queries) == shrunk
        ready = client.get("/readyz").json()
        assert ready["galleries"] == {"images": 399, "captions": 1995}


def test_a_generation_that_cannot_be_opened_keeps_the_one_serving(gallery, caplog):
    bundle, root, _, split = gallery
    with (
        Retriever.open(bundle, root) as retriever,
        TestClient(create_app(retriever, SETTINGS, gallery=root)) as client,
    ):
        before = _ids(client, split.captions[:3])
        (root / CURRENT).write_text('{"format_version": 1, "generation": 1, "path": "nowhere"}')
        deadline = time.monotonic() + 20
        while "staying on generation 0" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _ids(client, split.captions[:3]) == before
        assert client.get("/readyz").json()["generation"] == 0


def test_a_snapshot_in_use_is_closed_by_its_last_user(gallery, monkeypatch):
    """A replaced generation is closed once unused; the first (whose backend the later ones
    share) only releases its galleries; the generation served is the one the retriever opened,
    even when a writer made a newer one current before the server started."""
    bundle, root, folder, _ = gallery
    closed = []
    monkeypatch.setattr(Retriever, "close", lambda self: closed.append(("all", self)))
    monkeypatch.setattr(Retriever, "close_galleries", lambda self: closed.append(("kept", self)))
    first = Retriever.open(bundle, root)
    with open_backend(bundle) as backend:
        append_gallery(bundle, backend, root, folder / "rest_ims.npy", folder / "rest_caps.txt")
    live = LiveGallery(root, first)
    assert live.generation == 0  # what `first` opened, not what is current now
    assert live.refresh() and live.generation == 1
    _eventually(lambda: closed == [("kept", first)])  # released in a thread of its own
    with live.using() as second:
        delete_items(root, ["0"])
        assert live.refresh() and live.generation == 2
        time.sleep(0.1)
        assert len(closed) == 1  # generation 1 is still in use
        assert second.retriever.galleries["images"].count == 400
    _eventually(lambda: closed[1:] == [("all", second.retriever)])
    assert not live.refresh()  # nothing newer
    with live.using() as third:
        live.close()  # in use: released when its user is done
        time.sleep(0.1)
        assert len(closed) == 2
    _eventually(lambda: closed[2:] == [("all", third.retriever)])
    assert not live.refresh()  # closed: never switches again


def _eventually(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within 10 s"
        time.sleep(0.01)


def test_a_sharded_gallery_is_not_watched(gallery):
    bundle, root, _, _ = gallery
    with Retriever.open(bundle, root) as retriever, pytest.raises(UserError, match="not watched"):
        create_app(retriever, SETTINGS, sharded=object(), gallery=root)
