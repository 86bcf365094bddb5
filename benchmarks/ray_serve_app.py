"""The text search deployed on Ray Serve, for `bench_serve.py --ray-serve N`: what `serve` would
be if built on Ray Serve (its `@serve.batch` batching, N replicas behind its HTTP proxy), to
measure against `serve` (FastAPI, this project's batcher, optionally Ray actors behind it).
Needs `pip install 'ray[serve]'`, which is not an extra of scan-deploy (benchmark only).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request


@serve.deployment
class TextSearch:
    """One replica: a `Retriever` on the gallery; concurrent requests batched by Ray Serve with
    `serve`'s defaults (32 queries, 5 ms)."""

    def __init__(self, gallery: str, threads: int) -> None:
        from scan_deploy.runtime.retriever import Retriever

        self.retriever = Retriever.open(None, gallery, threads=threads)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search(self, requests: list[tuple[list[str], int]]) -> list[list[list[Any]]]:
        queries = [text for texts, _ in requests for text in texts]
        k = max(k for _, k in requests)
        hits = await asyncio.to_thread(self.retriever.search_text, queries, k)
        answers, start = [], 0
        for texts, wanted in requests:
            answers.append([row[:wanted] for row in hits[start : start + len(texts)]])
            start += len(texts)
        return answers

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        found = await self.search((body["queries"], int(body.get("k", 10))))
        return {
            "results": [
                {
                    "query": query,
                    "hits": [
                        {"rank": rank, "id": hit.id, "score": hit.score}
                        for rank, hit in enumerate(hits, 1)
                    ],
                }  # fmt: skip
                for query, hits in zip(body["queries"], found, strict=True)
            ]
        }


def start(gallery: Path, replicas: int, threads: int, port: int) -> str:
    """Deploy on the Ray instance `ray.init` started; returns the URL of Ray Serve's proxy."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = TextSearch.options(num_replicas=replicas).bind(str(gallery), threads)
    serve.run(app, route_prefix="/v1/search/text")
    return f"http://127.0.0.1:{port}"
