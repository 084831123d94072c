"""The release lease (redrec.release.lease): one release at a time.

The file backend between real processes on one workspace (fcntl.flock, holder record, a holder
that died, handing over from publish to deploy, expiry, renewal); the Kubernetes backend against
an emulated API server (kmock, with resourceVersion conflicts: tests/kube_util.py) through the
official client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import kmock
import pytest

from kube_util import ApiServer, client_config
from redrec.release.lease import FileLease, KubeLease, LeaseHeld

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from pathlib import Path
from redrec.release.lease import FileLease
path, identity, duration, hold_until = sys.argv[1:5]
lease = FileLease(path, identity, duration_s=float(duration), wait_s=5)
with lease.hold(hand_over=len(sys.argv) > 5):
    print("held", flush=True)
    while not Path(hold_until).exists():
        time.sleep(0.05)
print("released", flush=True)
"""


def _holder(path: Path, identity: str, stop: Path, duration: float = 30.0, hand_over: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLDER, str(path), identity, str(duration), str(stop)] + (["hand-over"] if hand_over else [])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_runner_waits_then_fails_naming_the_holder(tmp_path):
    path, stop = tmp_path / "release.lock", tmp_path / "stop"
    a = _holder(path, "run-a", stop)
    try:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as e:
            FileLease(path, "run-b", wait_s=1.0).acquire()
        assert time.monotonic() - t0 >= 1.0  # it waited, bounded
        msg = str(e.value)
        assert f"run-a (pid {a.pid} on {socket.gethostname()})" in msg and "acquired 20" in msg, msg
        assert str(path) in msg and "run-b" in msg
        rec = json.loads(path.read_text())  # the holder is written in the lock file itself
        assert rec["identity"] == "run-a" and rec["pid"] == a.pid

        # a runner that waits long enough gets it once the holder is done
        threading.Timer(0.5, stop.touch).start()
        b = FileLease(path, "run-b", wait_s=30)
        b.acquire()
        assert a.wait(10) == 0 and json.loads(path.read_text())["identity"] == "run-b"
        b.release()
        assert path.read_text() == ""
    finally:
        stop.touch()
        a.wait(10)


def test_a_dead_holder_is_taken_over_at_once_and_a_handed_over_lease_waits_for_its_run(tmp_path):
    path, stop = tmp_path / "release.lock", tmp_path / "stop"
    a = _holder(path, "run-a", stop)
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    b = FileLease(path, "run-b", wait_s=0.1)
    b.acquire()  # pid gone on this host: abandoned, no wait for its expiry
    b.release()

    # publish (hand_over) exits; the record stays for its run's deploy, with no live pid
    stop.touch()
    pub = _holder(path, "run-c", stop, hand_over=True)
    assert pub.wait(10) == 0
    rec = json.loads(path.read_text())
    assert rec["identity"] == "run-c" and rec["pid"] is None
    with pytest.raises(LeaseHeld, match="held by run-c"):
        FileLease(path, "run-d", wait_s=0.3).acquire()
    dep = FileLease(path, "run-c", wait_s=0.1)
    dep.acquire()  # the same run: no wait
    assert json.loads(path.read_text())["acquired"] == rec["acquired"]  # one tenure, from publish to deploy
    dep.release()


def test_expiry_and_renewal(tmp_path):
    path, stop = tmp_path / "release.lock", tmp_path / "stop"
    # a live holder renews every duration/3: it outlives its duration
    a = _holder(path, "run-a", stop, duration=0.6)
    try:
        with pytest.raises(LeaseHeld, match="held by run-a"):
            FileLease(path, "run-b", wait_s=1.5).acquire()
    finally:
        stop.touch()
        a.wait(10)
    # handed over and never picked up: taken over once not renewed for its duration
    stop.unlink()
    stop.touch()
    assert _holder(path, "run-c", stop, duration=0.5, hand_over=True).wait(10) == 0
    t0 = time.monotonic()
    b = FileLease(path, "run-d", wait_s=10)
    b.acquire()
    assert time.monotonic() - t0 < 5
    rec = json.loads(path.read_text())
    assert rec["identity"] == "run-d" and rec["transitions"] == 2  # run-c, then run-d
    b.release()


def test_bad_durations_name_the_variable(monkeypatch):
    monkeypatch.setenv("REDREC_RELEASE_WAIT_S", "soon")
    with pytest.raises(ValueError, match="REDREC_RELEASE_WAIT_S='soon'"):
        FileLease("/tmp/x", "r")
    monkeypatch.setenv("REDREC_RELEASE_WAIT_S", "-1")
    with pytest.raises(ValueError, match="must be > 0"):
        FileLease("/tmp/x", "r")


# ---- Kubernetes Lease ---------------------------------------------------------------------------

NS = "recsys"
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")


def _lease(api, identity: str, **kw) -> KubeLease:
    from kubernetes import client

    return KubeLease(client.CoordinationV1Api(client_config(api)), "rr-redrec-release", NS, identity, **kw)


@pytest.fixture
def k8s(kmock):
    kmock.resources["coordination.k8s.io/v1/leases"] = {}
    return kmock


@pytest.mark.asyncio
@pytest.mark.kmock(cls=ApiServer)
async def test_kubernetes_lease_is_one_holder_at_a_time(k8s):
    def scenario():
        a = _lease(k8s, "run-a", duration_s=30, wait_s=0.5)
        a.acquire()
        obj = dict(k8s.objects[LEASES, NS, "rr-redrec-release"].raw)
        assert obj["spec"]["holderIdentity"] == "run-a" and obj["spec"]["leaseDurationSeconds"] == 30
        assert obj["spec"]["acquireTime"] and obj["spec"]["renewTime"]
        assert obj["metadata"]["annotations"]["redrec.io/holder-pid"] == str(os.getpid())
        with pytest.raises(LeaseHeld) as e:
            _lease(k8s, "run-b", wait_s=0.5).acquire()
        msg = str(e.value)
        assert "Lease recsys/rr-redrec-release is held by run-a" in msg and "acquired 20" in msg and "renewed 20" in msg
        a.renew()
        a.release()
        assert not k8s.objects[LEASES, NS, "rr-redrec-release"]["spec"].get("holderIdentity")
        b = _lease(k8s, "run-b", wait_s=0.5)
        b.acquire()
        assert k8s.objects[LEASES, NS, "rr-redrec-release"]["spec"]["leaseTransitions"] == 1

        # b stops renewing (a holder that died): c takes over once the lease expires, not before
        b.duration_s = 1.0
        b.renew()
        c = _lease(k8s, "run-c", wait_s=10)
        t0 = time.monotonic()
        c.acquire()
        assert 0.5 < time.monotonic() - t0 < 8
        assert k8s.objects[LEASES, NS, "rr-redrec-release"]["spec"]["holderIdentity"] == "run-c"
        from redrec.release.lease import LeaseLost

        with pytest.raises(LeaseLost, match="taken over by run-c"):
            b.renew()

    await asyncio.to_thread(scenario)


@pytest.mark.asyncio
@pytest.mark.kmock(cls=ApiServer)
async def test_kubernetes_lease_racers_never_both_win(k8s):
    """Eight runners race for a free (then an expired) lease: every write carries the
    resourceVersion it read, so exactly one wins each time."""

    def race(tag: str) -> list[str]:
        won, barrier = [], threading.Barrier(8)

        def one(i: int) -> None:
            lease = _lease(k8s, f"{tag}-{i}", duration_s=1, wait_s=0.01)
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease.identity)
            except LeaseHeld:
                pass

        ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return won

    def scenario():
        first = race("a")
        assert len(first) == 1, first
        time.sleep(1.2)  # the winner never renews: expired
        second = race("b")
        assert len(second) == 1, second
        assert k8s.objects[LEASES, NS, "rr-redrec-release"]["spec"]["holderIdentity"] == second[0]

    await asyncio.to_thread(scenario)
