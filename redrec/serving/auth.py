"""Bearer-token authentication in front of the service's routes (ASGI middleware).

- Which routes need a token: every route except the probes, the metrics and the API document
  (``OPEN_PATHS``) and, unless ``auth.read_routes``, the read routes ``/recommend`` and
  ``/similar_items``. Default deny: a route added later is protected until it is opened here.
- Tokens: the lines of ``auth.tokens_file`` (a mounted Kubernetes Secret) and the comma separated
  env ``REDREC_API_TOKENS``. Several are accepted at once, so a rotation adds the new token, moves
  the clients, then removes the old one. The file is checked for a change every ``REREAD_S`` and
  re-read when it changed: a revoked token stops working within that, without a restart.
- Answers: no or a malformed ``Authorization`` header -> 401 with ``WWW-Authenticate: Bearer``;
  a token that is not accepted -> 403; both with the service's ``{"error", "field"}`` body.
- A token is never logged, and nothing derived from one is (no prefix, no hash).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from redrec.serving.config import AuthSection, ConfigError
from redrec.serving.http import send_json

log = logging.getLogger("redrec.serving.auth")

ENV_TOKENS = "REDREC_API_TOKENS"
REREAD_S = 2.0  # how stale the accepted set may be after the file changes (revocation delay)
MIN_TOKEN_LEN = 16  # shorter is guessable; `openssl rand -hex 32` gives 64
# probes, scraping and the API document: a kubelet or Prometheus carries no token
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/docs", "/", "/schema.json"})
OPEN_PREFIXES = ("/static_content/",)  # the Swagger UI's files, which the page at / loads
READ_PATHS = frozenset({"/recommend", "/similar_items"})
CHALLENGE = (b"www-authenticate", b'Bearer realm="redrec"')


def needs_token(path: str, read_routes: bool) -> bool:
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return False
    if path in READ_PATHS:
        return read_routes
    return True


def _digest(token: bytes) -> bytes:
    # compared as fixed-length digests: compare_digest on the raw tokens would return early on a
    # length mismatch and so tell a prober each token's length
    return hashlib.sha256(token).digest()


class TokenSource:
    """The accepted tokens, kept as SHA-256 digests, from a file (re-read when it changes) and a
    fixed env value. ``load()`` reads now and raises on any problem (the server's start).
    ``digests()`` checks the file at most every ``reread_s``; a change after the start fails
    closed: a line that is not a valid token is skipped and a file gone or unreadable accepts none
    of its tokens, each logged once (a revocation must never be undone by a bad edit)."""

    def __init__(self, path: str = "", env_value: str = "", reread_s: float = REREAD_S, clock=time.monotonic):
        self.path = path
        self.reread_s = reread_s
        self._clock = clock
        self._env, self._env_problems = self._parse(env_value.replace(",", "\n"), f"env {ENV_TOKENS}")
        self._file: tuple[bytes, ...] = ()
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        for problem in self._env_problems:
            log.error("%s (skipped)", problem)

    @staticmethod
    def _parse(text: str, where: str) -> tuple[tuple[bytes, ...], list[str]]:
        out, problems = [], []
        for n, line in enumerate(text.splitlines(), 1):
            tok = line.strip()
            if not tok or tok.startswith("#"):
                continue
            if any(c.isspace() for c in tok) or not tok.isascii():
                problems.append(f"auth: line {n} of {where} has spaces or non-ASCII characters inside: one "
                                f"token a line, e.g. from `openssl rand -hex 32`")
            elif len(tok) < MIN_TOKEN_LEN:
                problems.append(f"auth: line {n} of {where} has {len(tok)} characters, fewer than "
                                f"{MIN_TOKEN_LEN}: mint one with `openssl rand -hex 32`")
            else:
                out.append(_digest(tok.encode()))
        return tuple(out), problems

    def _read_file(self) -> list[str]:
        """Re-read the file if it changed; the problems found (empty: none, or no change)."""
        p = Path(self.path)
        try:
            st = p.stat()  # follows the Secret mount's ..data symlink: a new inode on each update
            stamp: tuple = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
        except OSError as e:
            stamp = ("unreadable", e.errno)
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            self._file = ()
            return [f"auth.tokens_file {self.path}: cannot be read ({getattr(e, 'strerror', None) or e}): mount "
                    f"the token Secret there or set REDREC_API_TOKENS_FILE"]
        self._file, problems = self._parse(text, f"auth.tokens_file {self.path}")
        log.info("auth: read %d token(s) from auth.tokens_file %s", len(self._file), self.path)
        return problems

    def load(self) -> int:
        problems = list(self._env_problems)
        if self.path:
            problems += self._read_file()
            self._checked = self._clock()
        if problems:
            raise ConfigError("\n".join(problems))
        return len(self._file) + len(self._env)

    def digests(self) -> tuple[bytes, ...]:
        now = self._clock()
        if self.path and now - self._checked >= self.reread_s:
            self._checked = now
            before = self._stamp
            for problem in self._read_file():
                log.error("%s (not accepted)", problem)
            if self._stamp != before and not self._file and not self._env:
                log.error("auth: no token is accepted now (auth.tokens_file %s is empty or unreadable and %s is "
                          "unset): every protected route answers 403", self.path, ENV_TOKENS)
        return self._file + self._env

    def accepts(self, token: bytes) -> bool:
        d = _digest(token)
        ok = False
        for known in self.digests():  # every one, no early exit: the time says nothing about which
            ok |= hmac.compare_digest(d, known)
        return ok


def token_source(auth: AuthSection, env: dict | None = None) -> TokenSource:
    env = os.environ if env is None else env
    return TokenSource(auth.tokens_file, env.get(ENV_TOKENS, ""))


def require_tokens(auth: AuthSection, env: dict | None = None) -> None:
    """At the server's start: with auth on, at least one token, or a ConfigError naming the settings."""
    if not auth.enabled:
        return
    if token_source(auth, env).load() == 0:
        raise ConfigError("auth.enabled is true but no token is configured: put tokens, one a line, in "
                          "auth.tokens_file (env REDREC_API_TOKENS_FILE) or in env REDREC_API_TOKENS "
                          "(comma separated), or set auth.enabled: false")


def _presented(scope) -> tuple[bytes | None, str]:
    """The bearer token of the request, or None and why not (never echoing the header)."""
    values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
    if not values:
        return None, "this route needs a token: send the header 'Authorization: Bearer <token>'"
    if len(values) > 1:
        return None, "several Authorization headers: send one, 'Authorization: Bearer <token>'"
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip(b" ")
    if scheme.lower() != b"bearer" or not token or any(c in token for c in b" \t"):
        return None, "malformed Authorization header: expected 'Authorization: Bearer <token>'"
    return token, ""


class BearerAuth:
    """``app.add_middleware(BearerAuth, auth=AuthSection(enabled=True, tokens_file=...))``."""

    def __init__(self, app, auth: AuthSection, tokens: TokenSource | None = None):
        self.app = app
        self.auth = auth
        self.tokens = tokens or token_source(auth)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.auth.enabled \
                or not needs_token(scope.get("path", ""), self.auth.read_routes):
            return await self.app(scope, receive, send)
        token, why = _presented(scope)
        if token is not None and self.tokens.accepts(token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if token is None:
            return await send_json(send, 401, {"error": f"authorization: {why}", "field": "authorization"}, [CHALLENGE])
        return await send_json(send, 403, {"error": "authorization: the token is not accepted (mistyped, revoked or "
                                                    "for another deployment): ask the operator for a current one",
                                           "field": "authorization"})
