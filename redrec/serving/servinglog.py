"""The serving process's two logs (responses, feedback) behind one rule: a failed write costs
the log line, never the response.

The answer was computed and the user is waiting; a full or broken log volume is an operations
problem (alerted, reported by ``/readyz`` as degraded), not a reason to answer 500, which would
take the popularity fallback down with it. Every failed line is counted (``failures``, and the
``on_failure`` hook the service turns into ``redrec_log_write_failures_total``); ``AppendLog``
cuts a half-written line back, so what did reach the disk reads back as whole lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from redrec.experiments.log import AppendLog

log = logging.getLogger("redrec.serving")

KINDS = ("serving", "feedback")
# how long a write failure keeps /readyz degraded after the last one: a single hiccup shows for a
# probe or two, a full disk (every request fails) shows as long as it lasts
DEGRADED_FOR_S = 60.0
WARN_EVERY_S = 30.0  # one log line per failing stretch, not one per request


class ServingLogs:
    def __init__(self, log_dir: str | Path, writer_args: dict, on_failure: Callable[[str], None] | None = None):
        self.logs = {kind: AppendLog.for_process(log_dir, kind, **writer_args) for kind in KINDS}
        self.on_failure = on_failure or (lambda kind: None)
        self.failures: Counter = Counter()
        self.written: Counter = Counter()
        self._last_error: dict[str, tuple[float, str]] = {}
        self._warned_at = 0.0
        self._lock = threading.Lock()

    def append(self, kind: str, records: list[dict]) -> bool:
        """Append ``records`` as one write; False (counted, reported) when the disk refused it."""
        if not records:
            return True
        try:
            self.logs[kind].append_many(records)
        except OSError as e:
            self._failed(kind, len(records), e)
            return False
        self.written[kind] += len(records)
        return True

    def _failed(self, kind: str, n: int, e: OSError) -> None:
        path = self.logs[kind].path
        why = f"{path}: {e.strerror or type(e).__name__}"
        now = time.time()
        with self._lock:
            self.failures[kind] += n
            self._last_error[kind] = (now, why)
            warn = now - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = now
        for _ in range(n):
            self.on_failure(kind)
        if warn:
            log.error("serving log write failed, responses are served but not logged (%d %s lines lost so far): %s",
                      self.failures[kind], kind, why)

    def degraded(self) -> str | None:
        """Why the logs are not being written (the last failure of each kind in the last minute)."""
        now = time.time()
        recent = {k: why for k, (t, why) in self._last_error.items() if now - t < DEGRADED_FOR_S}
        if not recent:
            return None
        lost = ", ".join(f"{self.failures[k]} {k}" for k in recent)
        return (f"serving log not written ({lost} lines lost; last error {'; '.join(recent.values())}): free space "
                "on the log volume (serving.servingLog) or raise its size")

    def stats(self) -> dict:
        return {k: {"path": str(self.logs[k].path), "written": self.written[k], "failed": self.failures[k]} for k in KINDS}

    def close(self) -> None:
        for lg in self.logs.values():
            lg.close()
