"""Serving under faults, piece by piece in one process: the log on a full disk, the drain on
SIGTERM, the pod-wide release status. The same behaviours through a running server are in
tests/test_serving.py (a full log volume, SIGTERM under load, two workers reloading)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from redrec.experiments.log import AppendLog, read_log


@pytest.fixture
def tiny_fs(tmp_path):
    """A 16 KiB tmpfs: a disk that fills up for real (ENOSPC, short writes)."""
    from services_util import small_disk

    with small_disk(tmp_path / "fs", "16k") as d:
        yield d


def _record(n: int) -> dict:
    # about 1 KB, as a response line with its scores and user embedding is
    return {"request_id": f"r{n}", "ts": 1.0e9 + n, "user_id": "u1", "scenario": "homefeed",
            "items": [f"i{j}" for j in range(40)], "scores": [0.5] * 40, "pad": "x" * 600}


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError as e:
            assert e.errno == 28
    return filler


def test_a_full_disk_refuses_whole_lines_and_leaves_no_fragment(tiny_fs):
    """The disk fills up under the log: the line that only partly fits (a short write, then
    ENOSPC) raises and is cut back; once space is freed the next lines are whole, and every line
    on disk reads back as data (no torn line, none glued to the next)."""
    log = AppendLog(tiny_fs / "serving-x.jsonl")
    log.append(_record(0))
    log.append(_record(1))
    filler = _fill(tiny_fs)
    ok, failed = [0, 1], 0
    for n in range(2, 12):
        try:
            log.append(_record(n))  # the log file's last page still has room for a line or so
            ok.append(n)
        except OSError as e:
            assert e.errno == 28  # ENOSPC
            failed += 1
    assert failed == 10 - (len(ok) - 2) and failed >= 8
    assert (tiny_fs / "serving-x.jsonl").read_bytes().endswith(b"\n")
    filler.unlink()  # the operator frees the volume: logging resumes
    log.append(_record(99))
    log.close()
    lr = read_log(tiny_fs)
    assert lr.n_skipped == 0, lr.problems()
    assert list(lr.requests["request_id"]) == [f"r{n}" for n in ok] + ["r99"]


def test_a_fragment_that_cannot_be_cut_is_ended_before_the_next_line(tmp_path, monkeypatch):
    """When even the cut-back fails, the next line starts with a newline: the fragment is read as
    one skipped line, the next line as data."""
    log = AppendLog(tmp_path / "serving-z.jsonl")
    log.append(_record(1))
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[:50])  # a short write ...
        raise OSError(28, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(os, "write", flaky)
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        log.append(_record(2))
    monkeypatch.undo()
    log.append(_record(3))
    log.close()
    lr = read_log(tmp_path)
    assert list(lr.requests["request_id"]) == ["r1", "r3"]
    assert lr.skipped["invalid JSON"] == 1


def test_serving_logs_count_failures_and_say_why(tiny_fs):
    from redrec.serving.servinglog import ServingLogs

    seen = []
    logs = ServingLogs(tiny_fs, {}, on_failure=seen.append)
    results = [logs.append("serving", [_record(n)]) for n in range(40)]
    assert results[0] and not results[-1]
    assert logs.failures["serving"] == results.count(False) == len(seen) and set(seen) == {"serving"}
    why = logs.degraded()
    assert why and "No space left on device" in why and "serving.servingLog" in why
    assert logs.stats()["serving"]["failed"] == results.count(False)
    logs.close()


def test_sigterm_starts_a_drain_then_calls_the_servers_handler():
    from redrec.serving.drain import Drain

    stopped = threading.Event()
    prev = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.set())
    try:
        d = Drain(0.5)
        assert d.install()
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's copy: still one drain
        assert d.active and not stopped.is_set()
        assert 0 < d.left_s() <= 0.5
        assert stopped.wait(5)
        assert time.monotonic() - t0 >= 0.5
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_no_drain_leaves_the_servers_handler_alone():
    from redrec.serving.drain import Drain

    prev = signal.getsignal(signal.SIGTERM)
    assert not Drain(0).install()
    assert signal.getsignal(signal.SIGTERM) is prev


WORKER = """
import sys, time
from redrec.serving.workers import WorkerBoard
b = WorkerBoard(2, sys.argv[1])
b.publish({"loaded_sha256": sys.argv[2]}, {"control": "v1"})
print("up", flush=True)
time.sleep(60)
"""


def test_the_pod_serves_a_config_only_once_every_live_worker_has_loaded_it(tmp_path):
    from redrec.serving.workers import WorkerBoard

    me = WorkerBoard(2, tmp_path)
    me.publish({"loaded_sha256": "new"}, {"control": "v2"})
    assert me.pod()["pod_loaded_sha256"] is None  # the sibling has not reported
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    sib = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), "old"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert sib.stdout.readline().strip() == "up"
        pod = me.pod()
        assert pod["pod_loaded_sha256"] is None and len(pod["workers"]) == 2  # one still serves the old config
        sib.kill()
        sib.wait()
        # the old worker died (the supervisor starts a new one, which loads the current config)
        assert set(me.pod()["workers"]) == {str(os.getpid())}
        sib = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), "new"], stdout=subprocess.PIPE, env=env, text=True)
        assert sib.stdout.readline().strip() == "up"
        assert me.pod()["pod_loaded_sha256"] == "new"
        me.publish({"loaded_sha256": "new", "error_sha256": "bad", "error": "unknown version"}, {"control": "v2"})
        assert me.pod()["pod_error_sha256"] == "bad"
    finally:
        sib.kill()
        sib.wait()
