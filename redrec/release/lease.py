"""One release at a time: a lease held around what moves the served pair (the index alias swap
and the serving deploy, ``redrec release promote|rollback``).

Two backends, one interface (``Lease``):

- ``FileLease`` (deploy_target local or none): a JSON record in ``<workspace>/release.lock``,
  read and written under ``fcntl.flock`` on that file. A holder that died (its pid is gone on
  this host) is taken over at once.
- ``KubeLease`` (deploy_target kubernetes): a ``coordination.k8s.io/v1`` Lease
  ``<release fullname>-release``; every write carries the resourceVersion it read, so two
  writers never both win.

The holder is a pipeline run (``identity`` = the KFP run id): publish takes the lease and, when
it succeeds, hands it over to the same run's deploy step (the record stays, unrenewed, for
``duration_s``), which releases it when it ends. A holder renews the lease every third of
``duration_s`` while it works; a lease not renewed for ``duration_s`` is expired and may be taken
over. A second runner waits up to ``wait_s`` and then fails with ``LeaseHeld`` naming the holder.
``REDREC_RELEASE_LEASE_S`` and ``REDREC_RELEASE_WAIT_S`` set the two durations.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DURATION_S = 300.0  # covers the gap between the publish step's pod and the deploy step's
DEFAULT_WAIT_S = 900.0  # a publish + deploy of the other run (a rollout of every serving pod)
POLL_S = 1.0


class LeaseHeld(RuntimeError):
    """Another holder has the lease (and kept renewing it) for longer than this runner waits."""


class LeaseLost(RuntimeError):
    """The lease this runner held was taken over (it was not renewed for its duration)."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected seconds as a number (e.g. {default:.0f})") from None
    if not v > 0:
        raise ValueError(f"{name}={raw!r}: must be > 0 seconds")
    return v


def lease_durations() -> tuple[float, float]:
    """(duration_s, wait_s) from the environment, validated."""
    return (_env_seconds("REDREC_RELEASE_LEASE_S", DEFAULT_DURATION_S),
            _env_seconds("REDREC_RELEASE_WAIT_S", DEFAULT_WAIT_S))


def default_identity() -> str:
    """A holder name unique to this process (a caller outside a pipeline run)."""
    return f"{socket.gethostname()}-pid{os.getpid()}"


def _iso(t: float | None) -> str:
    if t is None:
        return "?"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Holder:
    identity: str
    host: str = ""
    pid: int | None = None  # None: handed over between two steps of the same run
    acquired: float = 0.0  # epoch seconds
    renewed: float = 0.0
    duration_s: float = DEFAULT_DURATION_S
    transitions: int = 0

    def expired(self, now: float) -> bool:
        return now > self.renewed + self.duration_s

    def describe(self) -> str:
        who = self.identity + (f" (pid {self.pid} on {self.host})" if self.pid else f" (on {self.host})" if self.host else "")
        return (f"{who}, acquired {_iso(self.acquired)}, last renewed {_iso(self.renewed)}, "
                f"expires {_iso(self.renewed + self.duration_s)} unless renewed")


class Lease:
    """``with lease.hold(): ...`` acquires (waiting up to ``wait_s``), renews in the background,
    and releases on exit; ``hold(hand_over=True)`` keeps the lease for the same identity's next
    step when the block succeeds (released on failure)."""

    what = "release lease"

    def __init__(self, identity: str, duration_s: float | None = None, wait_s: float | None = None):
        d, w = lease_durations()
        self.identity = identity or default_identity()
        self.duration_s = float(duration_s if duration_s is not None else d)
        self.wait_s = float(wait_s if wait_s is not None else w)
        self.lost: str | None = None

    # ---- a backend implements these three, each atomic against other writers ----------------------
    def _try_take(self, now: float) -> Holder | None:
        """Take or renew the lease when it is free, expired, abandoned or ours; else return the holder."""
        raise NotImplementedError

    def _renew(self, now: float, pid: int | None) -> Holder | None:
        """Renew our lease; return the holder instead when it is not ours any more."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free the lease if we hold it."""
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    # ---- the interface ---------------------------------------------------------------------------
    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            other = self._try_take(time.time())
            if other is None:
                self.lost = None
                return
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.what} {self.where()} is held by {other.describe()}; this runner "
                                f"({self.identity}) waited {self.wait_s:.0f}s. One release at a time: let it finish, "
                                f"or wait for the lease to expire if that holder is gone")
            if not said:
                print(f"[redrec-release] waiting up to {self.wait_s:.0f}s for the {self.what} {self.where()}, "
                      f"held by {other.describe()}", flush=True)
                said = True
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def renew(self) -> None:
        other = self._renew(time.time(), os.getpid())
        if other is not None:
            self.lost = f"taken over by {other.describe()}"
            raise LeaseLost(f"{self.what} {self.where()} of {self.identity} was {self.lost}")

    def release(self) -> None:
        self._release()

    def hand_over(self) -> None:
        """Keep the lease for this identity's next step: renewed now, no live process attached."""
        self._renew(time.time(), None)

    @contextlib.contextmanager
    def hold(self, hand_over: bool = False):
        self.acquire()
        stop = threading.Event()

        def renewer():
            while not stop.wait(self.duration_s / 3):
                try:
                    self.renew()
                except LeaseLost as e:
                    log.error("%s", e)
                    return
                except Exception as e:  # noqa: BLE001 - an API hiccup: the next period retries
                    log.warning("renewing the %s failed: %s", self.what, e)

        t = threading.Thread(target=renewer, name="redrec-release-lease", daemon=True)
        t.start()
        ok = False
        try:
            yield self
            ok = True
        finally:
            stop.set()
            t.join()
            if self.lost is None:
                if ok and hand_over:
                    self.hand_over()
                else:
                    self.release()
        if self.lost is not None:
            raise LeaseLost(f"{self.what} {self.where()} of {self.identity} was {self.lost} while it worked")


# ---- local: a record under flock ----------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class FileLease(Lease):
    def __init__(self, path: str | Path, identity: str, **kw):
        super().__init__(identity, **kw)
        self.path = Path(path)

    def where(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held only while the record is read and written
            with os.fdopen(os.dup(fd), "r+") as f:
                raw = f.read()
                rec = Holder(**json.loads(raw)) if raw.strip() else None

                def write(h: Holder | None) -> None:
                    f.seek(0)
                    f.truncate()
                    if h is not None:
                        f.write(json.dumps(asdict(h), indent=2))
                    f.flush()
                    os.fsync(f.fileno())

                yield rec, write
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def read(self) -> Holder | None:
        with self._locked() as (rec, _):
            return rec if rec is not None and rec.identity else None

    def _abandoned(self, rec: Holder) -> bool:
        return bool(rec.pid) and rec.host == socket.gethostname() and not _pid_alive(rec.pid)

    def _try_take(self, now: float) -> Holder | None:
        with self._locked() as (rec, write):
            if rec is not None and rec.identity and rec.identity != self.identity \
                    and not rec.expired(now) and not self._abandoned(rec):
                return rec
            mine = rec is not None and rec.identity == self.identity
            write(Holder(self.identity, socket.gethostname(), os.getpid(), rec.acquired if mine else now, now,
                         self.duration_s, (rec.transitions if rec else 0) + (0 if mine else 1)))
            return None

    def _renew(self, now: float, pid: int | None) -> Holder | None:
        with self._locked() as (rec, write):
            if rec is None or rec.identity != self.identity:
                return rec or Holder("(nobody)")
            rec.renewed, rec.pid, rec.host = now, pid, socket.gethostname()
            write(rec)
            return None

    def _release(self) -> None:
        with self._locked() as (rec, write):
            if rec is not None and rec.identity == self.identity:
                write(None)


# ---- Kubernetes: a coordination.k8s.io/v1 Lease -------------------------------------------------

ANN_HOST = "redrec.io/holder-host"
ANN_PID = "redrec.io/holder-pid"


def _dt(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)


def _ts(d) -> float:
    if d is None:
        return 0.0
    if isinstance(d, str):
        d = datetime.datetime.fromisoformat(d.replace("Z", "+00:00"))
    return d.timestamp()


class KubeLease(Lease):
    """``api`` is a ``kubernetes.client.CoordinationV1Api``."""

    def __init__(self, api, name: str, namespace: str, identity: str, **kw):
        super().__init__(identity, **kw)
        self.api, self.name, self.namespace = api, name, namespace
        # when this process first saw the current (holder, renewTime): expiry is also judged on this
        # process' own clock, so a writer whose clock runs behind cannot keep a lease alive forever
        self._seen: tuple[tuple, float] | None = None

    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def _holder(self, obj) -> Holder:
        s, ann = obj.spec, (obj.metadata.annotations or {})
        pid = ann.get(ANN_PID)
        return Holder(s.holder_identity or "", ann.get(ANN_HOST, ""), int(pid) if pid else None, _ts(s.acquire_time),
                      _ts(s.renew_time), float(s.lease_duration_seconds or self.duration_s), s.lease_transitions or 0)

    def _body(self, obj, now: float, acquired: float, transitions: int, pid: int | None):
        from kubernetes import client

        ann = {ANN_HOST: socket.gethostname()}
        if pid:
            ann[ANN_PID] = str(pid)
        meta = client.V1ObjectMeta(name=self.name, namespace=self.namespace, annotations=ann,
                                   resource_version=obj.metadata.resource_version if obj is not None else None,
                                   labels={"app.kubernetes.io/part-of": "redrec"})
        spec = client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=int(round(self.duration_s)),
                                  acquire_time=_dt(acquired), renew_time=_dt(now), lease_transitions=transitions)
        return client.V1Lease(api_version="coordination.k8s.io/v1", kind="Lease", metadata=meta, spec=spec)

    def _read(self):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def read(self) -> Holder | None:
        obj = self._read()
        h = None if obj is None else self._holder(obj)
        return h if h is not None and h.identity else None

    def _expired(self, h: Holder, now: float) -> bool:
        key = (h.identity, h.renewed)
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, time.monotonic())
        return h.expired(now) or time.monotonic() - self._seen[1] > h.duration_s

    def _try_take(self, now: float) -> Holder | None:
        from kubernetes.client.exceptions import ApiException

        obj = self._read()
        try:
            if obj is None:
                self.api.create_namespaced_lease(self.namespace, self._body(None, now, now, 0, os.getpid()))
                return None
            h = self._holder(obj)
            if h.identity and h.identity != self.identity and not self._expired(h, now):
                return h
            mine = h.identity == self.identity
            body = self._body(obj, now, h.acquired if mine else now, h.transitions + (0 if mine else 1), os.getpid())
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
            return None
        except ApiException as e:
            if e.status == 409:  # another writer got there between our read and write: look again
                obj = self._read()
                return self._holder(obj) if obj is not None else Holder("(being created)")
            raise

    def _renew(self, now: float, pid: int | None) -> Holder | None:
        from kubernetes.client.exceptions import ApiException

        for _ in range(3):
            obj = self._read()
            h = self._holder(obj) if obj is not None else Holder("(nobody)")
            if h.identity != self.identity:
                return h
            try:
                self.api.replace_namespaced_lease(self.name, self.namespace,
                                                  self._body(obj, now, h.acquired, h.transitions, pid))
                return None
            except ApiException as e:
                if e.status != 409:
                    raise
        raise RuntimeError(f"{self.where()}: renewing kept conflicting with other writers")

    def _release(self) -> None:
        from kubernetes.client.exceptions import ApiException

        obj = self._read()
        if obj is None or (obj.spec.holder_identity or "") != self.identity:
            return
        obj.spec.holder_identity = None  # what client-go's leader election writes on release
        obj.spec.renew_time = _dt(time.time())
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, obj)
        except ApiException as e:
            if e.status != 409:  # 409: someone else wrote it since: it is not ours to free any more
                raise


def release_lease(params, identity: str = "") -> Lease:
    """The lease of ``params``' deployment: a Kubernetes Lease next to the chart's release, or a
    file in the workspace."""
    if params.deploy_target == "kubernetes":
        from redrec.pipeline.k8s_deploy import _names, _namespace, coordination_api

        return KubeLease(coordination_api(), _names().lease, _namespace(), identity)
    return FileLease(Path(params.workspace) / "release.lock", identity)
