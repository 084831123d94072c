"""Stopping the server processes the serving code starts (bentoml serve, feast serve)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(p: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM the process group (a supervisor and its workers), SIGKILL if it outlives timeout_s."""
    if p is None or p.poll() is not None:
        return
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
