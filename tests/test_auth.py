"""Bearer-token auth and limits before work on the serving API.

The middleware's rules on a tiny ASGI app first (fast), then the real thing: `bentoml serve` with
auth on, over the same Feast and Milvus world as tests/test_serving.py, called over raw HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from redrec.serving.auth import ENV_TOKENS, BearerAuth, TokenSource, needs_token, require_tokens
from redrec.serving.config import AuthSection, ConfigError, ServingSection
from redrec.serving.http import patch_openapi
from redrec.serving.limits import BodyLimit

A, B, C = (secrets.token_hex(32) for _ in range(3))


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


# ---- the rules, on a tiny app ---------------------------------------------------------------

class Echo:
    """An ASGI app that reads the whole body and answers its length; counts its calls."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        out = json.dumps({"path": scope["path"], "read": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


def call(app, method, path, headers=None, content=None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, headers=headers or {}, content=content)
    return asyncio.run(go())


def tokens_file(tmp_path, *lines: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_which_routes_need_a_token():
    for path in ("/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/docs", "/", "/static_content/x.js"):
        assert not needs_token(path, read_routes=True), path
    for path in ("/record_events", "/batching_stats", "/ops/release", "/ops", "/anything-new", "/recommend/x"):
        assert needs_token(path, read_routes=False), path
    for path in ("/recommend", "/similar_items"):
        assert not needs_token(path, read_routes=False) and needs_token(path, read_routes=True)


def test_the_middleware_answers_401_403_or_passes(tmp_path):
    app = Echo()
    auth = AuthSection(enabled=True, tokens_file=str(tokens_file(tmp_path, "# ops team", "", A, f"  {B}  ")))
    mw = BearerAuth(app, auth, TokenSource(auth.tokens_file, C))
    for headers in ({}, {"authorization": A}, {"authorization": f"Basic {A}"}, {"authorization": "Bearer"},
                    {"authorization": "Bearer  "}, {"authorization": f"Bearer {A} {B}"}):
        r = call(mw, "POST", "/record_events", headers, b"{}")
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["field"] == "authorization" and "Bearer <token>" in r.json()["error"]
        assert A not in r.text and B not in r.text  # a malformed header is never echoed
    for wrong in ("x" * 64, A[:-1], A + "0", A.upper()):
        r = call(mw, "POST", "/ops/release", bearer(wrong))
        assert r.status_code == 403 and r.json()["field"] == "authorization", r.text
        assert "www-authenticate" not in r.headers
    for good in (A, B, C):  # the file's two and the env's one
        assert call(mw, "POST", "/batching_stats", bearer(good)).status_code == 200
    assert call(mw, "POST", "/record_events", {"authorization": f"bearer   {A}"}).status_code == 200  # scheme: any case
    assert call(mw, "GET", "/readyz").status_code == 200
    assert call(mw, "POST", "/recommend", content=b"{}").status_code == 200  # read routes open by default
    closed = BearerAuth(app, auth.model_copy(update={"read_routes": True}), TokenSource(auth.tokens_file))
    assert call(closed, "POST", "/recommend", content=b"{}").status_code == 401
    assert call(closed, "POST", "/similar_items", bearer(B), b"{}").status_code == 200
    # auth off: nothing is checked
    assert call(BearerAuth(app, AuthSection()), "POST", "/record_events").status_code == 200


def test_tokens_are_reread_when_the_file_changes_at_most_every_interval(tmp_path):
    now = [0.0]
    path = tokens_file(tmp_path, A)
    src = TokenSource(str(path), reread_s=2.0, clock=lambda: now[0])
    assert src.load() == 1 and src.accepts(A.encode()) and not src.accepts(B.encode())
    # a Secret update: kubelet swaps in a new file (a new inode), the new token added
    new = tmp_path / "tokens.new"
    new.write_text(f"{A}\n{B}\n")
    os.replace(new, path)
    now[0] = 1.0
    assert not src.accepts(B.encode())  # within the interval: not looked at yet
    now[0] = 2.5
    assert src.accepts(B.encode()) and src.accepts(A.encode())
    path.write_text(f"{B}\n")  # rewritten in place: the old one revoked
    now[0] = 5.0
    assert not src.accepts(A.encode()) and src.accepts(B.encode())


def test_a_bad_edit_after_the_start_fails_closed(tmp_path, caplog):
    now = [0.0]
    path = tokens_file(tmp_path, A, B)
    src = TokenSource(str(path), reread_s=1.0, clock=lambda: now[0])
    src.load()
    path.write_text(f"{A}\ntooshort1\n")  # B revoked, with a typo on the next line
    now[0] = 2.0
    with caplog.at_level(logging.ERROR, logger="redrec.serving.auth"):
        assert src.accepts(A.encode()) and not src.accepts(B.encode())
    assert "line 2" in caplog.text and "9 characters" in caplog.text and "tooshort1" not in caplog.text
    path.unlink()  # the Secret's key removed: none of its tokens
    now[0] = 4.0
    assert not src.accepts(A.encode())
    path.write_text(f"{B}\n")
    now[0] = 6.0
    assert src.accepts(B.encode())


def test_no_token_configured_refuses_to_start_naming_the_setting(tmp_path):
    require_tokens(AuthSection(), env={})  # auth off: nothing needed
    with pytest.raises(ConfigError, match="auth.enabled is true but no token.*auth.tokens_file.*REDREC_API_TOKENS"):
        require_tokens(AuthSection(enabled=True), env={})
    with pytest.raises(ConfigError, match="auth.enabled is true but no token"):
        require_tokens(AuthSection(enabled=True, tokens_file=str(tokens_file(tmp_path, "# none yet"))), env={})
    with pytest.raises(ConfigError, match=r"auth.tokens_file .*missing.*cannot be read"):
        require_tokens(AuthSection(enabled=True, tokens_file=str(tmp_path / "missing")), env={})
    with pytest.raises(ConfigError, match="line 2 of auth.tokens_file.*5 characters") as e:
        require_tokens(AuthSection(enabled=True, tokens_file=str(tokens_file(tmp_path, A, "abcde"))), env={})
    assert "abcde" not in str(e.value)
    require_tokens(AuthSection(enabled=True), env={ENV_TOKENS: f"{A}, {B}"})


def test_the_tokens_file_setting_comes_from_the_env(tmp_path, monkeypatch):
    from redrec.serving.config import ServingConfig

    arms = [{"name": "control", "model_version": "v1", "share": 1.0}]
    raw = {"scenarios": ["s"], "experiment": {"name": "e", "arms": arms},
           "milvus": {"uri": "http://127.0.0.1:1"}, "auth": {"enabled": True, "tokens_file": "/etc/a"}}
    assert ServingConfig.from_dict(raw).auth.tokens_file == "/etc/a"
    monkeypatch.setenv("REDREC_API_TOKENS_FILE", "/var/run/redrec/tokens")
    assert ServingConfig.from_dict(raw).auth.tokens_file == "/var/run/redrec/tokens"
    with pytest.raises(ConfigError, match="auth.read_only"):
        ServingConfig.from_dict({**raw, "auth": {"read_only": True}})


def test_the_body_limit_answers_before_the_app_reads_anything():
    app = Echo()
    mw = BodyLimit(app, max_bytes=1000)
    assert call(mw, "POST", "/record_events", content=b"x" * 1000).json()["read"] == 1000
    r = call(mw, "POST", "/record_events", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["field"] == "body", r.text
    assert "1000 bytes" in r.json()["error"] and "serving.max_body_bytes" in r.json()["error"]
    assert r.headers["connection"] == "close"
    assert app.calls == 1

    async def chunked(declared: bytes | None, chunks: int):
        """A body of ``chunks`` 400-byte messages; how many the middleware took before answering."""
        taken, sent = [0], []

        async def receive():
            taken[0] += 1
            return {"type": "http.request", "body": b"y" * 400, "more_body": taken[0] < chunks}

        async def send(m):
            sent.append(m)

        headers = [(b"content-length", declared)] if declared else [(b"transfer-encoding", b"chunked")]
        await mw({"type": "http", "method": "POST", "path": "/record_events", "headers": headers}, receive, send)
        return taken[0], sent[0]["status"]

    # a declared length over the cap: answered without reading one message
    assert asyncio.run(chunked(b"50000000", 100)) == (0, 413)
    # no length: read until the count passes the cap (3 x 400 > 1000), the other 97 never
    assert asyncio.run(chunked(None, 100)) == (3, 413)
    assert asyncio.run(chunked(None, 2)) == (2, 200)
    assert app.calls == 2


def test_the_default_body_cap_holds_a_full_call_of_the_largest_events():
    s = ServingSection()
    from bentos.service import MAX_ACTION

    event = {"user_id": "u" * s.max_user_id_len, "item_id": "i" * s.max_item_id_len, "scenario": "homefeed",
             "action": "a" * MAX_ACTION, "ts": 253402300799, "request_id": "r" * 128}
    largest = len(json.dumps({"events": [event] * s.max_events_per_call}))
    typical = len(json.dumps({"events": [{"user_id": "1m_6040", "item_id": "1m_3952", "scenario": "homefeed",
                                          "action": "click", "ts": 1733000000,
                                          "request_id": secrets.token_hex(16)}] * s.max_events_per_call}))
    assert 2 * largest <= s.max_body_bytes, (largest, s.max_body_bytes)
    assert 10 * typical <= s.max_body_bytes, (typical, s.max_body_bytes)


def test_the_openapi_patch_declares_the_scheme_on_the_secured_routes_only():
    op = {"responses": {"200": {"description": "ok"}, "422": {"description": "BentoML's"}}}
    spec = {"paths": {r: {"post": json.loads(json.dumps(op))} for r in ("/recommend", "/record_events")}}
    spec["paths"]["/ops/release"] = {"get": json.loads(json.dumps(op))}
    spec["paths"]["/livez"] = {"get": json.loads(json.dumps(op))}
    out = patch_openapi(spec, {"/recommend", "/record_events"}, secured=lambda p: needs_token(p, read_routes=False))
    scheme = out["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    writes, reads, ops = (out["paths"][p][m] for p, m in (("/record_events", "post"), ("/recommend", "post"),
                                                            ("/ops/release", "get")))
    assert writes["security"] == ops["security"] == [{"bearerAuth": []}] and "security" not in reads
    assert {"401", "403", "413"} <= set(writes["responses"]) and "422" not in writes["responses"]
    assert {"401", "403"} <= set(ops["responses"])
    assert "413" in reads["responses"] and not {"401", "403"} & set(reads["responses"])
    assert "security" not in out["paths"]["/livez"]["get"]
    assert "securitySchemes" not in patch_openapi({"paths": {"/x": {"post": {}}}}, {"/x"}).get("components", {})


def test_a_400_never_carries_a_payload_back():
    """BentoML's validation body and the service's own 400 alike: the message is cut at 1 KB."""
    from redrec.serving.http import _contract_400

    huge = "x" * 5 * 2**20
    own = _contract_400(json.dumps({"error": f"events[0].item_id: unknown item {huge!r}",
                                    "field": "events[0].item_id"}).encode())
    assert own["field"] == "events[0].item_id" and len(json.dumps(own)) < 1200 and own["error"].endswith("…")
    assert _contract_400(json.dumps({"error": "k: too big", "field": "k"}).encode()) is None  # short: as sent
    bentoml = _contract_400(json.dumps({"error": huge, "detail": [{"loc": ["body", "k"], "msg": huge}]}).encode())
    assert bentoml["field"] == "k" and len(json.dumps(bentoml)) < 1200
    assert len(json.dumps(_contract_400(json.dumps({"error": huge}).encode()))) < 1200


# ---- the real server ------------------------------------------------------------------------

from test_serving import eligible, world  # noqa: E402,F401  (world: the Feast + Milvus fixture)


def config_with(world, work: Path, **sections) -> Path:
    """The world's serving config with its own serving log and ``sections`` merged in."""
    cfg = json.loads(json.dumps(world["cfg"]))
    cfg["serving"]["serving_log"]["dir"] = str(work / "log")
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def guarded(world, tmp_path_factory):
    """Auth on: tokens A and B in the file, C in the env; read routes open (the default)."""
    from redrec.serving.local import LocalServer

    work = tmp_path_factory.mktemp("auth")
    tokens = work / "tokens"
    tokens.write_text(f"# two at once while clients move from A to B\n{A}\n\n{B}\n")
    path = config_with(world, work, auth={"enabled": True, "tokens_file": str(tokens)})
    with LocalServer(path, env={ENV_TOKENS: C}) as srv:
        srv.tokens = tokens
        yield srv


def send(srv, method, route, headers=None, body=None, **kw) -> httpx.Response:
    content = None if body is None else json.dumps(body)
    return httpx.request(method, srv.url + route, content=content, timeout=60,
                         headers={"content-type": "application/json", **(headers or {})}, **kw)


def an_event(world, **over) -> dict:
    return {"user_id": "auth-test-user", "item_id": sorted(eligible(world, "ads"))[-1], "scenario": "ads",
            "action": "click", **over}


def test_write_and_ops_routes_need_a_token_read_routes_do_not(guarded, world):
    ev = {"events": [an_event(world)]}
    for route, method, body in (("/record_events", "POST", ev), ("/batching_stats", "POST", {}),
                                ("/ops/release", "GET", None)):
        for headers in ({}, {"authorization": f"Token {A}"}, {"authorization": "Bearer"}):
            r = send(guarded, method, route, headers, body)
            assert r.status_code == 401, (route, headers, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer") and r.json()["field"] == "authorization"
        r = send(guarded, method, route, bearer(secrets.token_hex(32)), body)
        assert r.status_code == 403 and set(r.json()) == {"error", "field"} and r.json()["field"] == "authorization"
        for token in (A, B, C):  # either of the file's two, and the env's
            r = send(guarded, method, route, bearer(token), body)
            assert r.status_code == 200, (route, r.text)
    assert send(guarded, "POST", "/record_events", bearer(A), ev).json()["accepted"] == 1
    # the read routes stay open by default, and so do the probes, the metrics and the document
    assert send(guarded, "POST", "/recommend", body={"user_id": "anyone", "scenario": "ads", "k": 3}).status_code == 200
    item = sorted(eligible(world, "ads"))[0]
    assert send(guarded, "POST", "/similar_items", body={"item_id": item, "scenario": "ads", "k": 3}).status_code == 200
    for route in ("/livez", "/readyz", "/healthz", "/metrics", "/docs.json"):
        assert httpx.get(guarded.url + route, timeout=30).status_code == 200, route
    # no token, and nothing derived from one, in the server's log
    log = guarded.log_path.read_text(errors="replace")
    assert "auth: read 2 token(s)" in log and not any(t in log for t in (A, B, C)), log[-3000:]


def test_the_openapi_document_declares_the_bearer_scheme(guarded):
    spec = httpx.get(guarded.url + "/docs.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for route in ("/record_events", "/batching_stats"):
        op = spec["paths"][route]["post"]
        assert op["security"] == [{"bearerAuth": []}], route
        for code in ("401", "403", "413"):
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (route, code)
    assert spec["paths"]["/ops/release"]["get"]["security"] == [{"bearerAuth": []}]
    assert "401" in spec["paths"]["/ops/release"]["get"]["responses"]
    for route in ("/recommend", "/similar_items"):
        op = spec["paths"][route]["post"]
        assert "security" not in op and "413" in op["responses"] and "401" not in op["responses"], route
    assert "security" not in spec["paths"]["/readyz"]["get"]


def raw_http(srv, head: str, chunks=(), timeout: float = 20) -> tuple[int, dict, bytes]:
    """One request over a plain socket: ``head`` (request line and headers), then ``chunks`` fed
    from a thread while the answer is read, so the server may answer before the body is sent."""
    sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")

    def feed():
        try:
            for c in chunks:
                sock.sendall(c)
        except OSError:
            pass  # the server answered and closed: the rest is not taken

    threading.Thread(target=feed, daemon=True).start()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            assert got, f"closed without an answer: {data!r}"
            data += got
        head_raw, body = data.split(b"\r\n\r\n", 1)
        lines = head_raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            got = sock.recv(65536)
            if not got:
                break
            body += got
    finally:
        sock.close()
    return int(lines[0].split()[1]), headers, body


def test_an_oversized_body_is_a_413_before_it_is_read(guarded):
    cap = ServingSection().max_body_bytes
    head = (f"POST /record_events HTTP/1.1\nHost: {guarded.host}\nContent-Type: application/json\n"
            f"Authorization: Bearer {A}\n")
    # a declared 50 MB: answered at once, with not a byte of the body sent (waiting for it would time out)
    status, headers, body = raw_http(guarded, head + "Content-Length: 50000000\n")
    assert status == 413 and headers["connection"] == "close", body
    assert json.loads(body)["field"] == "body" and f"{cap} bytes" in body.decode() and b"serving.max_body_bytes" in body
    # chunked, never finished: answered once the count passes the cap, mid-stream
    piece = b"[" + b" " * 65534 + b"]"
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (cap // len(piece) + 8)
    status, headers, body = raw_http(guarded, head + "Transfer-Encoding: chunked\n", chunks)
    assert status == 413 and json.loads(body)["field"] == "body", body
    # without a token the same request is refused for that first
    status, _, body = raw_http(guarded, head.replace(f"Authorization: Bearer {A}\n", "") + "Content-Length: 50000000\n")
    assert status == 401, body
    # the server is fine after both
    assert send(guarded, "POST", "/batching_stats", bearer(A), {}).status_code == 200


def test_long_ids_are_a_400_whose_body_is_short(guarded, world):
    mb = "x" * 2**20  # under the body cap: it is the field bound that answers
    for route, body, field in (
            ("/record_events", {"events": [an_event(world, item_id=mb)]}, "events.0.item_id"),
            ("/record_events", {"events": [an_event(world, action=mb)]}, "events.0.action"),
            ("/record_events", {"events": [an_event(world, user_id=mb)]}, "events.0.user_id"),
            ("/record_events", {"events": [an_event(world, scenario=mb)]}, "events.0.scenario"),
            ("/record_events", {"events": [an_event(world, request_id=mb)]}, "events.0.request_id"),
            ("/similar_items", {"item_id": mb, "scenario": "ads"}, "item_id"),
            ("/recommend", {"user_id": mb, "scenario": "ads"}, "user_id")):
        r = send(guarded, "POST", route, bearer(A), body)
        assert r.status_code == 400 and r.json()["field"] == field, (route, field, r.status_code, r.text[:300])
        assert len(r.content) < 1024, (route, field, len(r.content))
    # 5 MB: over the body cap, refused before parsing, short too
    r = send(guarded, "POST", "/record_events", bearer(A), {"events": [an_event(world, item_id="x" * 5 * 2**20)]})
    assert r.status_code == 413 and len(r.content) < 1024, r.text[:300]
    # a full call of the largest events passes the cap (a 400 for the unknown item, not a 413)
    largest = an_event(world, user_id="u" * 256, item_id="i" * 256, action="a" * 64, request_id="r" * 128, ts=10**11)
    r = send(guarded, "POST", "/record_events", bearer(A), {"events": [largest] * 1000})
    assert r.status_code == 400 and r.json()["field"] == "events[0].item_id" and len(r.content) < 1024, r.text[:300]


def test_a_rotated_tokens_file_takes_effect_without_a_restart(guarded):
    """The Secret updated in place: B stays, D is added, A is revoked; within the re-read interval."""
    from redrec.serving.auth import REREAD_S

    D = secrets.token_hex(32)
    pid = guarded.proc.pid
    new = guarded.tokens.with_suffix(".new")
    new.write_text(f"{B}\n{D}\n")
    t0 = time.monotonic()
    os.replace(new, guarded.tokens)  # what kubelet's ..data symlink swap amounts to: a new file
    while time.monotonic() - t0 < 30:
        if send(guarded, "POST", "/batching_stats", bearer(A), {}).status_code == 403:
            break
        time.sleep(0.2)
    took = time.monotonic() - t0
    assert send(guarded, "POST", "/batching_stats", bearer(A), {}).status_code == 403
    assert took <= REREAD_S + 2, took
    for token in (B, D, C):
        assert send(guarded, "POST", "/batching_stats", bearer(token), {}).status_code == 200
    assert guarded.proc.pid == pid and guarded.alive()  # no restart
    guarded.tokens.write_text(f"{A}\n{B}\n")  # back as the module's other tests expect it


@pytest.fixture(scope="module")
def read_guarded(world, tmp_path_factory):
    """auth.read_routes on, the tokens in the env only (no file)."""
    from redrec.serving.local import LocalServer

    work = tmp_path_factory.mktemp("auth-read")
    path = config_with(world, work, auth={"enabled": True, "read_routes": True})
    with LocalServer(path, env={ENV_TOKENS: f"{A},{B}"}) as srv:
        yield srv


def test_read_routes_need_a_token_when_configured(read_guarded, world):
    item = sorted(eligible(world, "ads"))[0]
    for route, body in (("/recommend", {"user_id": "anyone", "scenario": "ads", "k": 3}),
                        ("/similar_items", {"item_id": item, "scenario": "ads", "k": 3})):
        assert send(read_guarded, "POST", route, body=body).status_code == 401
        assert send(read_guarded, "POST", route, bearer(C), body).status_code == 403
        assert send(read_guarded, "POST", route, bearer(B), body).status_code == 200
    spec = httpx.get(read_guarded.url + "/docs.json", timeout=30).json()
    assert spec["paths"]["/recommend"]["post"]["security"] == [{"bearerAuth": []}]
    assert httpx.get(read_guarded.url + "/readyz", timeout=30).status_code == 200


def test_auth_on_without_a_token_refuses_to_start(world, tmp_path):
    from redrec.serving.local import LocalServer

    path = config_with(world, tmp_path, auth={"enabled": True, "tokens_file": str(tmp_path / "empty")})
    (tmp_path / "empty").write_text("# no token yet\n")
    # `bentoml serve` itself exits (a worker failing its start would only be restarted, forever)
    with pytest.raises(RuntimeError, match="exited at start") as e:
        LocalServer(path).start(timeout_s=120)
    assert "auth.enabled is true but no token is configured" in str(e.value), str(e.value)[-2000:]
