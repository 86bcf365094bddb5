"""The HTTP API around a `Retriever` (FastAPI): search by text and by image features, explain a
hit, the gallery's image files, health, readiness, Prometheus metrics, and the results page.

    POST /v1/search/text    {"queries": [...], "k": 10, "shortlist": null} -> {"results": [...]}
    POST /v1/search/image   body: a .npy of region features (images, regions, img_dim) or
                            (regions, img_dim); ?k=10&shortlist= -> {"results": [...]}
    POST /v1/explain        {"text": ..., "id": IMAGE_ID} -> the attention behind the score
    GET  /v1/explain.png    ?text=...&id=... -> the attention picture (the plots extra)
    GET  /v1/images/{id}    the image file of a gallery image, when the gallery knows it
    GET  /healthz, /readyz, /metrics, /  (the page), /docs and /openapi.json (FastAPI's)

Every error is JSON `{"error": {"status": N, "message": "one line"}}`: 400 malformed JSON, 404
unknown id or file, 413 body or query count too large, 422 a value out of range (the runtime's
own one-line messages), 503 the queue is full (with Retry-After) or the server is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from scan_deploy.runtime.gallery import Gallery, Verify
from scan_deploy.runtime.retriever import Retriever
from scan_deploy.runtime.search import Hit
from scan_deploy.serve.batcher import Batcher, QueueFull
from scan_deploy.serve.body_limit import BodyLimit
from scan_deploy.serve.live import LiveGallery, Snapshot
from scan_deploy.serve.metrics import Metrics
from starlette.exceptions import HTTPException

from scan_deploy.errors import UserError


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32  # queries scored together
    max_wait: float = 0.005  # seconds a batch waits for more requests
    max_queue: int = 64  # requests waiting; beyond: 503
    max_queries: int = 64  # queries in one request; beyond: 413
    max_body: int = 16 << 20  # bytes of one request body; beyond: 413
    watch: float = 0.0  # seconds between looks for a new generation of the gallery (0: never)


class TextSearch(BaseModel):
    queries: list[str] = Field(min_length=1, description="Texts; the images of each are found.")
    k: int = Field(10, ge=1, description="Hits per query.")
    shortlist: int | None = Field(
        None, ge=1, description="Candidates of the first stage, re-ranked exactly (None: all)."
    )


class ExplainRequest(BaseModel):
    text: str = Field(min_length=1)
    id: str = Field(min_length=1, description="A gallery image's id.")


def create_app(
    retriever: Retriever,
    settings: ServeSettings | None = None,
    sharded=None,
    gallery: str | Path | None = None,
    verify: Verify = True,
) -> FastAPI:
    """The app; the retriever stays the caller's (closed by whoever opened it). `sharded`: a
    `runtime.ray_shards.ShardedRetriever` over the same gallery that answers the searches; the
    retriever then checks requests, explains and serves image files.
    `gallery`: the retriever's gallery folder, watched for new generations every
    `settings.watch` seconds (`serve.live`; not with `sharded`), each new one checked with
    `verify`."""
    settings = settings or ServeSettings()
    if sharded is not None and settings.watch:
        raise UserError("a gallery sharded over Ray actors is not watched: restart to switch")
    live = LiveGallery(gallery, retriever, verify)
    metrics = Metrics()
    batchers: dict[str, Batcher] = {}

    def run_text(queries, k, shortlist):
        if sharded is not None:
            return sharded.search_text(queries, k, shortlist)
        with live.using() as snapshot:
            return snapshot.retriever.search_text(queries, k, shortlist)

    def run_image(queries, k, shortlist):
        if sharded is not None:
            return sharded.search_image(np.stack(queries), k, shortlist)
        with live.using() as snapshot:
            return snapshot.retriever.search_image(np.stack(queries), k, shortlist)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for kind, run in (("text", run_text), ("image", run_image)):
            batchers[kind] = Batcher(
                run, *(settings.max_batch, settings.max_wait, settings.max_queue),
                metrics.observer(kind),
            )  # fmt: skip
            batchers[kind].start()
        watcher = None
        if live.root is not None and settings.watch:
            watcher = asyncio.get_running_loop().create_task(live.watch(settings.watch))
        app.state.ready = True
        yield
        app.state.ready = False
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for batcher in batchers.values():
            await batcher.close()
        live.close()

    app = FastAPI(
        title="scan-deploy",
        summary="Image-text retrieval with SCAN (stacked cross attention)",
        lifespan=lifespan,
    )
    app.state.ready = False
    app.add_middleware(BodyLimit, limit=settings.max_body, refused=metrics.refused)

    @app.middleware("http")
    async def timed(request: Request, call_next):
        start, status = time.perf_counter(), 500  # a bug's exception: counted as a 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            path = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.latency.labels(path, str(status)).observe(time.perf_counter() - start)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return _error(422, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        metrics.refused.labels("queue_full").inc()
        return _error(503, f"busy: {exc}; retry later", {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return _error(400, f"{where}: malformed JSON ({first.get('ctx', {}).get('error')})")
        return _error(422, f"{where}: {first.get('msg')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.post("/v1/search/text", summary="Images for each text")
    async def search_text(body: TextSearch) -> dict[str, Any]:
        _check_count(len(body.queries), settings.max_queries)
        with live.using() as snapshot:  # k and shortlist, before queueing
            snapshot.retriever.gallery_for("text", body.k, body.shortlist)
        found = await batchers["text"].submit(body.queries, body.k, body.shortlist)
        results = zip(body.queries, found, strict=True)
        return {"results": [_result(q, hits, "images") for q, hits in results]}

    @app.post("/v1/search/image", summary="Captions for each image's region features (.npy)")
    async def search_image(
        request: Request,
        k: int = Query(10, ge=1),
        shortlist: int | None = Query(None, ge=1),
    ) -> dict[str, Any]:
        features = _features(await request.body(), retriever.bundle.config.img_dim)
        _check_count(len(features), settings.max_queries)
        with live.using() as snapshot:
            snapshot.retriever.gallery_for("image", k, shortlist)
            features = snapshot.retriever.check_features(features)
        found = await batchers["image"].submit(list(features), k, shortlist, features.shape[1])
        return {
            "results": [_result(f"image {i}", hits, "captions") for i, hits in enumerate(found)]
        }

    @app.post("/v1/explain", summary="The attention behind a text's score of an image")
    async def explain(body: ExplainRequest) -> dict[str, Any]:
        result, shown, _ = await asyncio.to_thread(_explanation, live, body.text, body.id)
        out = result.to_dict()
        if shown is not None:
            out.update(boxes=shown[0].tolist(), image_size=list(shown[1]))
        return out

    @app.get("/v1/explain.png", summary="The attention picture (the plots extra)")
    async def explain_png(text: str = Query(min_length=1), id: str = Query(min_length=1)):
        with live.using() as snapshot:
            _image(snapshot, id)  # 404 before 501
        try:
            import matplotlib  # noqa: F401 (the plots extra; attention_picture imports it late)
        except ModuleNotFoundError:
            return _error(501, "pictures need matplotlib: pip install 'scan-deploy[plots]'")
        from scan_deploy.attention_picture import write_hit_png

        result, boxed, image = await asyncio.to_thread(_explanation, live, text, id)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "explain.png"
            await asyncio.to_thread(write_hit_png, path, text, id, result, boxed, image)
            return Response(path.read_bytes(), media_type="image/png")

    @app.get("/v1/images/{image_id}", summary="A gallery image's file")
    async def image(image_id: str):
        with live.using() as snapshot:  # only the gallery's ids: no URL path reaches the disk
            file = _image(snapshot, image_id)[1].image_file(image_id)
        if file is None:
            raise HTTPException(404, f"image {image_id!r}: the gallery knows no file for it")
        return FileResponse(file)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the galleries are open and the batchers running")
    async def readyz():
        if not app.state.ready:
            return _error(503, "not ready")
        with live.using() as snapshot:
            galleries = {kind: g.live_count for kind, g in snapshot.retriever.galleries.items()}
        depth = {kind: b.depth for kind, b in batchers.items()}
        ready = {"status": "ready", "generation": snapshot.generation, "galleries": galleries}
        return {**ready, "queue": depth}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        for kind, batcher in batchers.items():
            metrics.queue.labels(kind).set(batcher.depth)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("scan_deploy.serve").joinpath("page.html").read_text("utf-8")

    return app


def _explanation(live: LiveGallery, text: str, image_id: str):
    """(explanation, its boxes or None, the image's file or None) of a text and a gallery
    image, on one snapshot held until done (a thread: it outlives a cancelled request)."""
    with live.using() as snapshot:
        index, images = _image(snapshot, image_id)
        hit = Hit(index, image_id, 0.0, None)
        (result,) = snapshot.retriever.explain_text(text, [hit])
        return result, result.boxes(images.boxes_of(index)), images.image_file(image_id)


def _image(snapshot: Snapshot, image_id: str) -> tuple[int, Gallery]:
    """(index, images gallery) of a live gallery image, or HTTP 404."""
    images = snapshot.retriever.galleries.get("images")
    if images is None:
        raise HTTPException(404, "the gallery has no images")
    index = snapshot.image_index.get(image_id)
    if index is None or images.deleted_mask[index]:
        raise HTTPException(404, f"image {image_id!r}: not in the gallery")
    return index, images


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise HTTPException(413, f"{count} queries in one request, the server takes {limit}")


def _features(body: bytes, img_dim: int) -> np.ndarray:
    """A request body's .npy (never unpickled) as float32 (images, regions, img_dim)."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise HTTPException(400, f"body: expected a .npy file of region features ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise HTTPException(400, "body: expected a .npy file of region features, got an .npz")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[2] != img_dim or not array.shape[1] or not array.shape[0]:
        message = f"body: expected (images, regions, {img_dim}) features, got {array.shape}"
        raise HTTPException(422, message)
    if not np.issubdtype(array.dtype, np.floating):
        raise HTTPException(422, f"body: expected float features, got {array.dtype}")
    return np.asarray(array, np.float32)


def _result(query: str, hits: list[Hit], kind: str) -> dict[str, Any]:
    return {"query": query, "hits": [_hit(rank, hit, kind) for rank, hit in enumerate(hits, 1)]}


def _hit(rank: int, hit: Hit, kind: str) -> dict[str, Any]:
    """A hit as JSON; its image as a URL of this server (`image:k` is caption k of `image`)."""
    image_id = hit.id if kind == "images" else hit.id.rpartition(":")[0]
    url = None if hit.image is None else f"/v1/images/{quote(image_id, safe='')}"
    return {
        "rank": rank,
        "index": hit.index,
        "id": hit.id,
        "score": hit.score,
        "text": hit.text,
        "image_url": url,
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"status": status, "message": " ".join(message.split())}}
    return JSONResponse(body, status_code=status, headers=headers)
