"""A cap on the request body, enforced before the application reads or parses any of it (ASGI
middleware): BentoML would otherwise take a 50 MB body whole into memory and hand it to the JSON
parser before any field bound applies.

- A ``Content-Length`` over the cap is answered 413 at once, without reading a byte of the body.
- A body without one (chunked) is read here chunk by chunk, counted, and answered 413 as soon as
  the count passes the cap: the rest is never read (the connection is closed after the answer).
- A body within the cap is handed to the application as it arrived. Holding it here first costs
  nothing extra: every route parses its body whole anyway.
"""

from __future__ import annotations

from redrec.serving.http import send_json


def too_large(limit: int) -> dict:
    return {"error": f"body: the request body is over {limit} bytes (serving.max_body_bytes): send less, e.g. "
                     f"fewer events per call, or raise serving.max_body_bytes", "field": "body"}


class BodyLimit:
    """``app.add_middleware(BodyLimit, max_bytes=2**20)``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = [v for k, v in scope.get("headers", []) if k == b"content-length"]
        try:
            if declared and int(declared[0]) > self.max_bytes:
                return await self._refuse(send)
        except ValueError:
            pass  # the server's HTTP parser has already refused a malformed Content-Length
        messages = await self._read(receive)
        if messages is None:
            return await self._refuse(send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> list[dict] | None:
        """The request's body messages up to its end, or None as soon as they pass the cap. A
        disconnect ends the list early: the application sees it where it would have."""
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return None
            if not message.get("more_body"):
                return messages

    async def _refuse(self, send) -> None:
        # the unread rest of the body would be taken as the next request: close the connection
        await send_json(send, 413, too_large(self.max_bytes), [(b"connection", b"close")])
