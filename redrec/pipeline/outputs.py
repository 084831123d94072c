"""Step plumbing: progress lines, all-or-nothing outputs and the fault simulation for tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised where a test asked a step to fail (parameter ``inject_fault``); never in production runs."""


def fault_point(step: str, inject_fault: str, where: str) -> None:
    if inject_fault == step:
        raise InjectedFault(f"injected fault in step '{step}' ({where}): fault simulation requested by inject_fault={step!r}")


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at ``name`` when ``REDREC_TEST_KILL_AT`` names it (a kill runs
    no cleanup, unlike ``inject_fault``). An environment variable, so it never reaches a compiled
    pipeline's parameters."""
    if os.environ.get("REDREC_TEST_KILL_AT") == name:
        print(f"[redrec-pipeline] killed at {name} (REDREC_TEST_KILL_AT)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def progress(step: str):
    """One line when a step starts and one with its wall time when it ends (the runner greps these)."""
    t0 = time.perf_counter()
    print(f"[redrec-pipeline] {step}: started", flush=True)
    try:
        yield
    except BaseException as e:
        print(f"[redrec-pipeline] {step}: FAILED after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}", flush=True, file=sys.stderr)
        raise
    seconds = time.perf_counter() - t0
    print(f"[redrec-pipeline] {step}: done in {seconds:.1f}s", flush=True)
    timings = os.environ.get("REDREC_PIPELINE_TIMINGS")
    if timings:  # the local runner's summary table reads these (one JSON line per step)
        with open(timings, "a") as f:
            f.write(json.dumps({"step": step, "seconds": round(seconds, 2), "pid": os.getpid()}) + "\n")


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_output(path: str | Path):
    """Yield a scratch path next to ``path``; rename it to ``path`` only when the block succeeds.

    A failed step therefore leaves no output at all (not a half-written model or metrics file)
    for a later step, a cache or a human to pick up by mistake.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    _rm(partial)
    _rm(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        _rm(partial)
        raise
    if partial.exists():
        partial.rename(path)
