"""The HTTP API in process (FastAPI's TestClient): answers equal the retriever's, concurrent
requests batched, every error a one-line JSON message with its status, health, readiness,
metrics, the page and the OpenAPI schema."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from scan_deploy.runtime.backends import open_backend  # noqa: E402
from scan_deploy.runtime.indexer import index_gallery  # noqa: E402
from scan_deploy.runtime.retriever import Retriever  # noqa: E402
from scan_deploy.serve.app import ServeSettings, create_app  # noqa: E402

from scan_deploy.bundle import load_bundle  # noqa: E402
from scan_deploy.precomp import load_split  # noqa: E402


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """(retriever, test split) of the trained model's test split, indexed with its captions."""
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    gallery = tmp_path_factory.mktemp("served") / "gallery"
    index_gallery(bundle, open_backend(bundle), data / "test_ims.npy", data / "test_caps.txt",
                  gallery, dtype="fp32")  # fmt: skip
    with Retriever.open(bundle, gallery) as retriever:
        yield retriever, load_split(data, "test")


@pytest.fixture
def client(served):
    settings = ServeSettings(max_batch=64, max_wait=0.05, max_queue=64, max_queries=8)
    with TestClient(create_app(served[0], settings)) as client:
        yield client


def _npz() -> bytes:
    out = io.BytesIO()
    np.savez(out, features=np.ones((1, 8, 32)))
    return out.getvalue()


def _npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(array))
    return out.getvalue()


def test_text_search_answers_as_the_retriever(served, client):
    retriever, split = served
    queries = [split.captions[0], split.captions[57]]
    response = client.post("/v1/search/text", json={"queries": queries, "k": 3})
    assert response.status_code == 200
    expected = retriever.search_text(queries, k=3)
    for result, query, hits in zip(response.json()["results"], queries, expected, strict=True):
        assert result["query"] == query
        assert [h["id"] for h in result["hits"]] == [h.id for h in hits]
        assert [h["score"] for h in result["hits"]] == [h.score for h in hits]
        assert [h["rank"] for h in result["hits"]] == [1, 2, 3]
    short = client.post("/v1/search/text", json={"queries": queries[:1], "k": 3, "shortlist": 50})
    assert [h["id"] for h in short.json()["results"][0]["hits"]] == [
        h.id for h in retriever.search_text(queries[:1], k=3, shortlist=50)[0]
    ]


def test_image_search_takes_a_npy_body(served, client):
    retriever, split = served
    features = np.asarray(split.images[:2], np.float32)
    response = client.post("/v1/search/image?k=4", content=_npy(features))
    assert response.status_code == 200, response.text
    expected = retriever.search_image(features, k=4)
    got = [[h["id"] for h in r["hits"]] for r in response.json()["results"]]
    assert got == [[h.id for h in hits] for hits in expected]
    one = client.post("/v1/search/image?k=4", content=_npy(features[0]))  # (regions, img_dim)
    assert [h["id"] for h in one.json()["results"][0]["hits"]] == got[0]
    assert one.json()["results"][0]["hits"][0]["text"] == expected[0][0].text


def test_concurrent_requests_are_batched(served, client):
    retriever, split = served
    queries = [split.captions[5 * i] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda q: client.post("/v1/search/text", json={"queries": [q], "k": 2}), queries
            )
        )
    expected = retriever.search_text(queries, k=2)
    for response, hits in zip(responses, expected, strict=True):
        assert [h["id"] for h in response.json()["results"][0]["hits"]] == [h.id for h in hits]
    metrics = client.get("/metrics").text
    calls = _sample(metrics, 'scan_batch_queries_count{kind="text"}')
    total = _sample(metrics, 'scan_batch_queries_sum{kind="text"}')
    assert total == 16 and calls < 16  # fewer retriever calls than requests
    assert (
        _sample(metrics, 'scan_request_seconds_count{route="/v1/search/text",status="200"}') == 16
    )


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


TEXT, IMAGE = "/v1/search/text", "/v1/search/image"
JSON = {"content-type": "application/json"}
BAD = [
    ("post", TEXT, {"content": b"{not json", "headers": JSON}, 400, "body.1: malformed JSON"),
    ("post", TEXT, {"json": {"queries": []}}, 422, "body.queries: List should"),
    ("post", TEXT, {"json": {"queries": ["a"], "k": 0}}, 422, "body.k: Input"),
    ("post", TEXT, {"json": {"queries": ["a"], "k": 401}}, 422, "k: expected 1..400"),
    ("post", TEXT, {"json": {"queries": ["a"] * 9}}, 413, "9 queries in one request"),
    ("post", IMAGE, {"content": b"not npy"}, 400, "body: expected a .npy file"),
    ("post", IMAGE, {"content": _npz()}, 400, "body: expected a .npy file of region features, got"),
    (
        "post",
        IMAGE,
        {"content": _npy(np.ones((0, 8, 32)))},
        422,
        "body: expected (images, regions, 32) features, got (0, 8, 32)",
    ),
    (
        "post",
        IMAGE,
        {"content": _npy(np.ones((2, 8, 5)))},
        422,
        "body: expected (images, regions, 32) features, got (2, 8, 5)",
    ),
    (
        "post",
        IMAGE,
        {"content": _npy(np.ones((1, 9, 32)))},
        422,
        "image features: has 9 regions per image, the bundle takes 8",
    ),
    (
        "post",
        IMAGE,
        {"content": _npy(np.full((1, 8, 32), np.nan))},
        422,
        "image features: image 0 has NaN or Inf values",
    ),
    ("post", IMAGE + "?k=0", {"content": _npy(np.ones((1, 8, 32)))}, 422, "query.k: Input"),
    ("post", "/v1/explain", {"json": {"text": "a", "id": "no"}}, 404, "image 'no': not in the"),
    ("get", "/v1/images/..%5Csecret", {}, 404, "image '..\\\\secret': not in the gallery"),
    ("get", "/v1/images/3", {}, 404, "image '3': the gallery knows no file for it"),
    ("get", "/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), BAD)
def test_bad_requests_get_one_line_json_errors(client, method, path, kwargs, status, message):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["message"].startswith(message), error
    assert "\n" not in error["message"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    settings = ServeSettings(max_body=1000)
    with TestClient(create_app(served[0], settings)) as client:
        response = client.post("/v1/search/image", content=b"x" * 5000)
        assert response.status_code == 413
        assert "larger than the server's limit of 1000 bytes" in response.json()["error"]["message"]
        streamed = client.post("/v1/search/image", content=iter([b"x" * 600, b"x" * 600]))
        assert streamed.status_code == 413  # no Content-Length: counted as it arrives
        chunked_json = client.post(  # a JSON route: FastAPI reads the body itself
            "/v1/search/text", content=iter([b'{"queries": ["', b"a" * 1200, b'"]}'])
        )
        assert chunked_json.status_code == 413
        chunks = iter([b'{"queries": ', b'["a"], "k": 1}'])
        small = client.post("/v1/search/text", content=chunks, headers=JSON)
        assert small.status_code == 200, small.text  # a chunked body within the limit: whole
        metrics = client.get("/metrics").text
        assert _sample(metrics, 'scan_requests_refused_total{reason="body_too_large"}') == 3


def test_explain_gives_the_retrievers_attention(served, client):
    retriever, split = served
    hit = retriever.search_text([split.captions[0]], k=1)[0][0]
    response = client.post("/v1/explain", json={"text": split.captions[0], "id": hit.id})
    assert response.status_code == 200
    (expected,) = retriever.explain_text(split.captions[0], [hit])
    body = response.json()
    assert body["similarity"] == pytest.approx(hit.score, abs=1e-5)
    np.testing.assert_allclose(body["weights"], expected.weights, atol=1e-6)
    pytest.importorskip("matplotlib")
    picture = client.get("/v1/explain.png", params={"text": split.captions[0], "id": hit.id})
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")


def test_health_readiness_metrics_page_and_schema(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["galleries"] == {"images": 400, "captions": 2000}
    assert "scan_request_seconds_bucket" in client.get("/metrics").text
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'id="query"' in page.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/search/text", "/v1/search/image", "/v1/explain"} <= set(schema["paths"])
    json.dumps(schema)


def test_not_ready_outside_the_lifespan(served):
    app = create_app(served[0])
    client = TestClient(app)  # not entered: no lifespan, no batchers
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["message"] == "not ready"
