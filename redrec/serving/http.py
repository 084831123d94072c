"""ASGI middleware in front of the BentoML routes, for one error contract on every API route.

- Every API route takes JSON only: any other content type is refused before BentoML parses it
  (its multipart parser answers a body without a boundary with a 500) with 415.
- BentoML answers a request that fails its pydantic validation with 400 and its own body
  ``{"error", "detail": [...]}``; it is rewritten to the service's ``{"error", "field"}`` (the
  first failing field, dotted), the body the service itself sends for every 4xx/503.
- BentoML's OpenAPI document (``/docs.json``) declares its own exception shapes for errors; the
  statuses the service really sends are declared instead, with the ``{error, field}`` schema, and
  the bearer scheme on the routes that need a token (``redrec.serving.auth``).
- A 400's message is cut at ``MAX_ERROR_CHARS``, whatever input it quotes.
"""

from __future__ import annotations

import json
from typing import Callable

ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong and how to fix it"},
        "field": {"type": "string", "description": "the request field at fault (absent for outages)"},
    },
}
ERROR_STATUSES = {
    "400": "bad input: the field named is missing, malformed or out of range",
    "404": "an id that does not exist (similar_items' item_id)",
    "413": "the body is over serving.max_body_bytes",
    "415": "the body is not application/json",
    "503": "a dependency (Milvus, Feast) is down and no fallback is configured",
}
AUTH_STATUSES = {
    "401": "no token, or a malformed Authorization header: send 'Authorization: Bearer <token>'",
    "403": "the token is not accepted (mistyped, revoked or for another deployment)",
}
BEARER = {"type": "http", "scheme": "bearer", "description": "a token of auth.tokens_file (one a line)"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}  # a path item's operations
# a 400's message longer than this is cut: a reply never carries a client's payload back (the
# request models bound every string, so only a message quoting several values gets near it)
MAX_ERROR_CHARS = 1024


def _field(detail) -> str:
    """pydantic's loc of the first error, without BentoML's wrapper levels: events.0.ts."""
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return "body"
    loc = [str(x) for x in detail[0].get("loc", []) if x not in ("body", "__root__")]
    return ".".join(loc) or "body"


def _cut(text: str, n: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _message(detail, fallback: str) -> str:
    # pydantic's msg names the rule, not the input (BentoML drops the input itself), but a custom
    # validator's message may quote it: the whole message is bounded
    if isinstance(detail, list) and detail and isinstance(detail[0], dict) and detail[0].get("msg"):
        return _cut(f"{_field(detail)}: {detail[0]['msg']}")
    return _cut(fallback)


def patch_openapi(spec: dict, routes: set[str], secured: Callable[[str], bool] = lambda path: False) -> dict:
    """The error statuses and body of ``routes``' POSTs; on every operation of a path ``secured``
    names, the bearer scheme and its 401/403."""
    comps = spec.setdefault("components", {})
    comps.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in spec.get("paths", {}).items():
        if path in routes and "post" in item:
            responses = {k: v for k, v in item["post"].get("responses", {}).items() if str(k).startswith("2")}
            responses.update({code: {"description": d, "content": ref} for code, d in ERROR_STATUSES.items()})
            item["post"]["responses"] = responses
        if secured(path):
            comps.setdefault("securitySchemes", {})["bearerAuth"] = BEARER
            for op in (op for method, op in item.items() if method in HTTP_METHODS):
                op["security"] = [{"bearerAuth": []}]
                op.setdefault("responses", {}).update({code: {"description": d, "content": ref}
                                                       for code, d in AUTH_STATUSES.items()})
    return spec


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    hdrs = [(k, v) for k, v in (headers or []) if k.lower() not in (b"content-length", b"content-type")]
    await send({"type": "http.response.start", "status": status,
                "headers": [*hdrs, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ErrorContract:
    def __init__(self, app, routes: tuple[str, ...], secured: Callable[[str], bool] = lambda path: False,
                 spec_path: str = "/docs.json"):
        self.app = app
        self.routes = set(routes)
        self.secured = secured
        self.spec_path = spec_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path"), scope.get("method")
        if method == "POST" and path in self.routes:
            ctype = ""
            for k, v in scope.get("headers", []):
                if k == b"content-type":
                    ctype = v.decode("latin-1").split(";", 1)[0].strip().lower()
            if ctype and ctype != "application/json":
                return await send_json(send, 415, {
                    "error": f"content-type {ctype!r} is not accepted: send the body as application/json",
                    "field": "content-type"})
            return await self._rewriting(scope, receive, send, 400, _contract_400)
        if method == "GET" and path == self.spec_path:
            return await self._rewriting(scope, receive, send, 200,
                                         lambda body: patch_openapi(json.loads(body), self.routes, self.secured))
        return await self.app(scope, receive, send)

    async def _rewriting(self, scope, receive, send, status: int, rewrite):
        """Run the app; a response with ``status`` (a small JSON body) is held back and replaced
        by ``rewrite(body)`` unless that returns None. Other responses stream through."""
        held: dict = {}

        async def capture(message):
            if message["type"] == "http.response.start":
                if message["status"] != status:
                    held["pass"] = True
                    return await send(message)
                held["start"], held["body"] = message, b""
                return None
            if held.get("pass") or message["type"] != "http.response.body":
                return await send(message)
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return None
            payload = rewrite(held["body"])
            if payload is None:
                await send(held["start"])
                return await send({"type": "http.response.body", "body": held["body"]})
            return await send_json(send, status, payload, held["start"].get("headers"))

        await self.app(scope, receive, capture)


def _contract_400(body: bytes) -> dict | None:
    """BentoML's validation-error body as ``{error, field}``; the service's own 400s pass."""
    try:
        data = json.loads(body)
    except ValueError:
        return {"error": "the body is not valid JSON", "field": "body"}
    if isinstance(data, dict) and "field" in data:
        # the service's own 400: passed as sent unless a message quotes too much of the input
        if len(str(data.get("error", ""))) <= MAX_ERROR_CHARS:
            return None
        return {**data, "error": _cut(str(data["error"]))}
    detail = data.get("detail") if isinstance(data, dict) else None
    msg = data.get("error", "bad request") if isinstance(data, dict) else "bad request"
    return {"error": _message(detail, str(msg)), "field": _field(detail)}


class ReadyzReason:
    """``/readyz``'s 200 carries why the pod is ready: "ready", or "degraded, ..." (a dependency
    down and the fallback serving, the serving log not written). BentoML answers a bare newline,
    so an on-call engineer probing a pod could not tell a healthy one from a degraded one."""

    def __init__(self, app, reason: Callable[[], str | None], path: str = "/readyz"):
        self.app = app
        self.reason = reason
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def capture(message):
            if message["type"] == "http.response.start":
                if message["status"] != 200:
                    held["pass"] = True
                    return await send(message)
                held["start"] = message
                return None
            if held.get("pass") or message["type"] != "http.response.body":
                return await send(message)
            if message.get("more_body"):  # BentoML's body is one newline; a longer one is replaced whole
                return None
            body = ((self.reason() or "ready") + "\n").encode()
            hdrs = [(k, v) for k, v in held["start"].get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
            await send({**held["start"], "headers": [*hdrs, (b"content-type", b"text/plain; charset=utf-8"),
                                                     (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
