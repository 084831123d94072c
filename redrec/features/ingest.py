"""Ingest workers: apply the Redis event log to the online store, one writer per user at a time,
in order, idempotently, acknowledging only after the online write (``redrec features ingest``).

Each worker leases a fair share of the log's partitions (``SET NX PX``, renewed while it lives; a
user's events are all in one partition, so a user has one writer). Taking a partition, it claims
the entries a dead predecessor read but never acknowledged (``XAUTOCLAIM``) and applies them first.
Applying a batch:

1. plan the new windows against the stored ones (an event already in its window is a duplicate:
   re-applying a batch changes nothing);
2. count the fresh events' items in Redis, atomically with the partition's counted offset and a
   lease check (a Lua script): an entry is counted once even when its batch is applied twice, and
   a worker that lost its lease counts and writes nothing;
3. write the windows (row timestamps monotonic, ``FeatureRepo.plan_windows``);
4. acknowledge and trim the applied entries.

Popularity is a counter of every worker's users, so it is kept exact in Redis (``HINCRBY``) and
copied to Feast as absolute values by one worker at a time (a lock), from a set of changed items
that survives a crash mid-copy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd

from redrec.features.eventlog import GROUP, EventLogConfig, entries_frame

log = logging.getLogger(__name__)

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# KEYS: lease, offsets, counts, dirty. ARGV: worker, partition, last entry id, then (entry id, item)
# per fresh event. -1: the lease is not ours (write nothing)
_COUNT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
local off = redis.call('hget', KEYS[2], ARGV[2])
local function after(a, b)
  if not b then return true end
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local n = 0
for k = 4, #ARGV, 2 do
  if after(ARGV[k], off) then
    redis.call('hincrby', KEYS[3], ARGV[k + 1], 1)
    redis.call('sadd', KEYS[4], ARGV[k + 1])
    n = n + 1
  end
end
if after(ARGV[3], off) then redis.call('hset', KEYS[2], ARGV[2], ARGV[3]) end
return n
"""
# KEYS: lock, dirty, flushing, counts. ARGV: worker, max items. Changed items move to ``flushing``
# (left there by a flusher that died) and up to ARGV[2] of them come back with their counts
_TAKE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return {} end
if redis.call('exists', KEYS[2]) == 1 then
  redis.call('sunionstore', KEYS[3], KEYS[3], KEYS[2])
  redis.call('del', KEYS[2])
end
local items = redis.call('srandmember', KEYS[3], tonumber(ARGV[2]))
if #items == 0 then return {} end
local counts = redis.call('hmget', KEYS[4], unpack(items))
local out = {}
for i = 1, #items do out[2 * i - 1] = items[i]; out[2 * i] = counts[i] end
return out
"""
# KEYS: lock, seeded, counts. ARGV: worker, then (item, its count in Feast) per item never seeded.
# The counters start from Feast's count (the materialised one) once: HINCRBY commutes with the
# workers' increments, and only the lock holder seeds
_SEED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return {} end
local out = {}
for k = 2, #ARGV, 2 do
  if redis.call('hsetnx', KEYS[2], ARGV[k], 1) == 1 then redis.call('hincrby', KEYS[3], ARGV[k], ARGV[k + 1]) end
  out[#out + 1] = redis.call('hget', KEYS[3], ARGV[k])
end
return out
"""
FLUSH_MAX_ITEMS = 2000


@dataclass
class IngestStats:
    applied: int = 0  # events applied (fresh + duplicates)
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    lost_leases: int = 0
    popularity_flushed: int = 0
    errors: int = 0
    last_error: str = ""
    partitions: list[int] = field(default_factory=list)


class IngestWorker:
    def __init__(self, cfg: EventLogConfig, repo, worker_id: str | None = None, client=None):
        if cfg.log != "redis":
            raise ValueError("events.log is 'embedded': events are applied as they are accepted, there is no log to "
                             "ingest; set events.log: redis (and events.redis_url) to run ingest workers")
        self.cfg, self.repo = cfg, repo
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.r = client or cfg.client()
        self.ttl_ms = int(cfg.lease_ttl_s * 1000)
        self.owned: set[int] = set()  # partitions whose lease this worker holds
        self.backlog: set[int] = set()  # partitions whose pending entries (ours or claimed) come first
        self.stats = IngestStats()
        self.alive_at = time.monotonic()
        self._rebalanced_at = self._flushed_at = 0.0
        self._renew, self._release = self.r.register_script(_RENEW), self.r.register_script(_RELEASE)
        self._count, self._take = self.r.register_script(_COUNT), self.r.register_script(_TAKE)
        self._seed = self.r.register_script(_SEED)
        self.repo.max_future_skew_s = cfg.max_future_skew_s

    # ---- partitions ------------------------------------------------------------------------------
    def _lease(self, p: int) -> str:
        return self.cfg.key(f"lease:p{p}")

    def rebalance(self) -> None:
        """Renew the leases held, then hold ceil(partitions / live workers) of them."""
        now = time.time()
        workers = self.cfg.key("workers")
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(workers, {self.id: now + self.cfg.lease_ttl_s})
        pipe.zremrangebyscore(workers, "-inf", now)
        pipe.zcard(workers)
        live = max(1, pipe.execute()[-1])
        share = math.ceil(self.cfg.partitions / live)
        for p in list(self.owned):
            if not self._renew(keys=[self._lease(p)], args=[self.id, self.ttl_ms]):
                self._drop(p, "lease lost")
        for p in sorted(self.owned, reverse=True)[: max(0, len(self.owned) - share)]:
            self._release(keys=[self._lease(p)], args=[self.id])
            self._drop(p, "rebalanced to another worker")
        free = [p for p in range(self.cfg.partitions) if p not in self.owned]
        random.shuffle(free)
        for p in free:
            if len(self.owned) >= share:
                break
            # a restarted pod keeps its name: the leases it held before are its own again at once
            if (self.r.set(self._lease(p), self.id, nx=True, px=self.ttl_ms)
                    or self._renew(keys=[self._lease(p)], args=[self.id, self.ttl_ms])):
                self._take_over(p)
        self.stats.partitions = sorted(self.owned)
        self._rebalanced_at = time.monotonic()

    def _take_over(self, p: int) -> None:
        stream = self.cfg.stream(p)
        try:
            self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as e:  # noqa: BLE001
            if "BUSYGROUP" not in str(e):
                raise
        start, claimed = "0-0", 0
        while True:  # entries a dead (or departed) worker read and never acknowledged
            res = self.r.xautoclaim(stream, GROUP, self.id, min_idle_time=0, start_id=start, count=1000)
            start = res[0]
            claimed += len(res[1])
            if start in ("0-0", b"0-0"):
                break
        self.owned.add(p)
        self.backlog.add(p)
        log.info("worker %s took partition %d (%d unacknowledged entries claimed)", self.id, p, claimed)

    def _drop(self, p: int, why: str) -> None:
        self.owned.discard(p)
        self.backlog.discard(p)
        log.info("worker %s left partition %d: %s", self.id, p, why)

    def release_all(self) -> None:
        for p in list(self.owned):
            self._release(keys=[self._lease(p)], args=[self.id])
            self._drop(p, "worker stopping")
        self.r.zrem(self.cfg.key("workers"), self.id)

    # ---- applying --------------------------------------------------------------------------------
    def step(self) -> int:
        """One pass: rebalance when due, apply what the held partitions have, copy popularity."""
        if time.monotonic() - self._rebalanced_at > self.cfg.lease_ttl_s / 3:
            self.rebalance()
        n = 0
        if self.backlog:  # entries read before (ours, or claimed from a dead worker) come first
            got = self.r.xreadgroup(GROUP, self.id, {self.cfg.stream(p): "0" for p in self.backlog},
                                    count=self.cfg.batch_size)
            batches = {_partition(stream): entries for stream, entries in got or [] if entries}
            self.backlog &= set(batches)
            n += self.apply(batches)
        elif self.owned:
            got = self.r.xreadgroup(GROUP, self.id, {self.cfg.stream(p): ">" for p in self.owned},
                                    count=self.cfg.batch_size, block=self.cfg.block_ms)
            n += self.apply({_partition(stream): entries for stream, entries in got or [] if entries})
        else:
            time.sleep(self.cfg.block_ms / 1000)
        if time.monotonic() - self._flushed_at >= self.cfg.popularity_copy_s:
            self.flush_popularity()
            self._flushed_at = time.monotonic()
        self.alive_at = time.monotonic()
        return n

    def apply(self, batches: dict[int, list]) -> int:
        """Apply the entries read from several partitions in one pass: one online read and one
        write per scenario for all of them (a pass per partition cost a feature-server round trip
        per partition and scenario), counted per partition, acknowledged per partition."""
        if not batches:
            return 0
        frames = [entries_frame([(eid, f) for eid, f in entries if f]).assign(partition=p) for p, entries in batches.items()]
        ev = self._checked(pd.concat(frames, ignore_index=True))  # a trimmed pending entry comes back empty
        lost: set[int] = set()
        if len(ev):
            update = self.repo.plan_windows(ev)
            fresh = ev.loc[update.fresh, ["partition", "entry_id", "item_id"]]
            pipe = self.r.pipeline(transaction=False)
            for p, entries in batches.items():
                mine = fresh[fresh["partition"] == p]
                args = [self.id, p, max((e for e, _ in entries), key=_id_key)]
                args += [x for pair in mine[["entry_id", "item_id"]].itertuples(index=False) for x in pair]
                self._count(keys=[self._lease(p), self.cfg.key("pop:offsets"), self.cfg.key("pop:counts"),
                                  self.cfg.key("pop:dirty")], args=args, client=pipe)
            for p, counted in zip(batches, pipe.execute()):
                if counted == -1:  # another worker holds the partition now: it re-applies these entries
                    lost.add(p)
                    self.stats.lost_leases += 1
                    self._drop(p, "lease lost before the write")
            if lost:  # a user lives in one partition: leave the lost partitions' users alone
                gone = set(ev.loc[ev["partition"].isin(lost), "user_id"])
                update.rows = {s: df[~df["user_id"].isin(gone)] for s, df in update.rows.items()}
            self.repo.write_windows(update)
            self.stats.duplicates += update.skipped
        pipe = self.r.pipeline(transaction=False)
        applied = 0
        for p, entries in batches.items():
            if p in lost:
                continue
            ids = [eid for eid, _ in entries]
            pipe.xack(self.cfg.stream(p), GROUP, *ids)
            # every entry up to the last applied one is done: the log keeps only what is still to apply
            pipe.xtrim(self.cfg.stream(p), minid=_next_id(max(ids, key=_id_key)))
            applied += sum(1 for _, f in entries if f)
        pipe.execute()
        self.stats.applied += applied
        self.stats.batches += 1
        return applied

    def _checked(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The batch as checked events; an entry that can never apply (a scenario the repo no longer
        declares, a malformed field) goes to the dead-letter stream instead of blocking its users."""
        # entries were checked against the server's clock when accepted: allow that skew again
        now = time.time() + self.cfg.max_future_skew_s
        carry = ("entry_id", "partition")
        try:
            return self.repo.check_events(frame, now=now, carry=carry)
        except (ValueError, KeyError) as e:
            log.warning("a batch of %d entries does not check (%s); checking one by one", len(frame), e)
        good = []
        for k in range(len(frame)):
            row = frame.iloc[[k]]
            try:
                good.append(self.repo.check_events(row, now=now, carry=carry))
            except (ValueError, KeyError) as e:
                self.r.xadd(self.cfg.key("dead"), {**{c: str(row[c].iloc[0]) for c in row.columns}, "error": str(e)[:500]})
                self.stats.dead_lettered += 1
        if not good:
            return frame.iloc[:0]
        return pd.concat(good).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)

    def flush_popularity(self) -> int:
        """Copy changed popularity counts to Feast, one worker at a time."""
        lock = self.cfg.key("pop:lock")
        if not self.r.exists(self.cfg.key("pop:dirty"), self.cfg.key("pop:flushing")):
            return 0
        if not self.r.set(lock, self.id, nx=True, px=self.ttl_ms):
            return 0
        try:
            got = self._take(keys=[lock, self.cfg.key("pop:dirty"), self.cfg.key("pop:flushing"),
                                   self.cfg.key("pop:counts")], args=[self.id, FLUSH_MAX_ITEMS])
            values = {got[k]: int(got[k + 1] or 0) for k in range(0, len(got), 2)}
            seeded = self.r.hmget(self.cfg.key("pop:seeded"), list(values)) if values else []
            fresh = [i for i, done in zip(values, seeded) if not done]
            if fresh:
                base = self.repo.online_popularity(fresh)
                now = self._seed(keys=[lock, self.cfg.key("pop:seeded"), self.cfg.key("pop:counts")],
                                 args=[self.id] + [x for i in fresh for x in (i, base[i])])
                if len(now) != len(fresh):  # the lock expired: leave them for the next holder
                    return 0
                values.update({i: int(v) for i, v in zip(fresh, now)})
            if values:
                self.repo.write_popularity(values, add=False)
                self.r.srem(self.cfg.key("pop:flushing"), *values)
                self.stats.popularity_flushed += len(values)
            return len(values)
        finally:
            self._release(keys=[lock], args=[self.id])

    # ---- running ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.1
            except Exception as e:  # noqa: BLE001 - an outage of Redis or Feast: retry, lose nothing
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("ingest step failed (retrying in %.1fs): %s", backoff, self.stats.last_error)
                self.backlog |= self.owned  # what was read and not acknowledged is read again
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        try:
            self.flush_popularity()  # what this worker counted reaches Feast now, not at a successor's copy
            self.release_all()
        except Exception:  # noqa: BLE001 - the leases expire on their own
            log.warning("could not release the leases; they expire in %.0fs", self.cfg.lease_ttl_s)

    def healthy(self) -> bool:
        return time.monotonic() - self.alive_at < max(10.0, 3 * self.cfg.lease_ttl_s)


def _partition(stream: str) -> int:
    return int(stream.rsplit(":p", 1)[1])


def _id_key(eid: str) -> tuple[int, int]:
    ms, seq = eid.split("-")
    return int(ms), int(seq)


def _next_id(eid: str) -> str:
    ms, seq = _id_key(eid)
    return f"{ms}-{seq + 1}"


def serve_health(worker: IngestWorker, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``GET /healthz``: 200 while the worker's loop turns, 503 once it is stuck (the probe restarts it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/healthz":
                self.send_error(404)
                return
            ok = worker.healthy()
            body = json.dumps({"ok": ok, "worker": worker.id, **worker.stats.__dict__}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds: not worth a log line each
            pass

    srv = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, name="redrec-ingest-health", daemon=True).start()
    return srv
