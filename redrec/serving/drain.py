"""Stopping a serving worker without failing a request.

A pod being deleted keeps receiving traffic for a while: the endpoints' removal takes time to
reach every node, and clients with keep-alive connections keep using them. So SIGTERM starts a
drain instead of a stop: for ``serving.drain_s`` the worker answers as before, fails its
readiness probe (a balancer still probing stops sending) and answers every request with
``Connection: close`` (the client's next request opens a new connection, which lands on a pod
that stays); only then does the server's own graceful shutdown run (uvicorn: stop accepting,
finish the requests in flight, close idle connections). Kubernetes' preStop sleep, before the
SIGTERM, covers the endpoints' propagation; ``terminationGracePeriodSeconds`` must exceed
preStop + drain + the longest request (the chart checks).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

log = logging.getLogger("redrec.serving")


class Drain:
    def __init__(self, drain_s: float):
        self.drain_s = float(drain_s)
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def left_s(self) -> float:
        return 0.0 if self.since is None else max(0.0, self.drain_s - (time.monotonic() - self.since))

    def install(self) -> bool:
        """Put the drain in front of the server's SIGTERM handler. Call from the main thread once
        the server has installed its handlers (BentoML builds the service inside uvicorn's
        startup, after them); False when there is nothing to wrap (no handler, or no drain)."""
        prev = signal.getsignal(signal.SIGTERM)
        if self.drain_s <= 0 or not callable(prev) or threading.current_thread() is not threading.main_thread():
            return False

        def on_term(sig: int, frame) -> None:
            if self.since is not None:
                return  # the supervisor forwards the SIGTERM the process group got: one drain
            self.since = time.monotonic()
            log.info("SIGTERM: draining for %.1fs before shutting down", self.drain_s)
            stop = threading.Timer(self.drain_s, prev, args=(sig, None))
            stop.daemon = True
            stop.start()

        signal.signal(signal.SIGTERM, on_term)
        return True


class CloseWhileDraining:
    """ASGI middleware: while ``draining()``, every HTTP response carries ``Connection: close``."""

    def __init__(self, app, draining: Callable[[], bool]):
        self.app = app
        self.draining = draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def closing(message):
            if message["type"] == "http.response.start" and self.draining():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)
