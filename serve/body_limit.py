"""Request bodies larger than a limit are refused with 413 before the app sees them: by their
Content-Length when they declare one, else as soon as the bytes received pass the limit (the body
is read here, at most `limit` bytes held, and handed to the app whole).

Plain ASGI middleware: Starlette has no body limit of its own, uvicorn's `--limit-*` options
bound connections and requests in flight, not body sizes, and an error raised inside the app's
own body reading would be turned into a 400 by FastAPI."""

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
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

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
