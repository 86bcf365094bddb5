"""Request bodies larger than a limit are refused with 413 before they are read whole: by their
Content-Length when they declare one, else as soon as the bytes received pass the limit.

Plain ASGI middleware: Starlette has no body limit of its own, and uvicorn's `--limit-*`
options bound connections and requests in flight, not body sizes."""

from __future__ import annotations

import json


class BodyLimit:
    def __init__(self, app, limit: int, refused=None) -> None:
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        if self.refused is not None:
            self.refused.labels("body_too_large").inc()
        message = f"the request body is larger than the server's limit of {self.limit} bytes"
        body = json.dumps({"error": {"status": 413, "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
