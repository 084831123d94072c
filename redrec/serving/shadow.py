"""Shadow releases: a candidate model scores a mirrored share of live requests, off the request
path, so its behaviour on real traffic is known before any user sees it.

After a response is built and logged, ``Shadow.offer`` decides (a hash of the request id against
``shadow.share``: the same decision on every replica) whether the request is mirrored, and if so
queues it without waiting: the candidate's own ``ArmRuntime`` (model + its paired index) reads
the SAME history the production answer read (no second Feast read), runs its user tower and
searches, in a worker thread of its own that scores the queued mirrors together (one forward for
those gathered within ``shadow.batch_max_wait_ms``). Its answer goes to the shadow log (``shadow-<pod>-<pid>.jsonl`` beside the serving
log; the response and feedback readers skip it), next to the production answer.

Nothing here can reach the caller: a full queue (``shadow.max_in_flight``) drops the mirror, a
mirror older than ``shadow.timeout_s`` when its turn comes is dropped, and a failure of the
candidate (its collection gone, Milvus down, a bug) is logged with the request; each is counted
(``on_event``: the service's ``redrec_shadow_requests_total``, and ``/ops/release``).

Only requests the production model ranked are mirrored: a holdout, cold-start or fallback answer
is popularity, and comparing the candidate with it says nothing of the candidate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from redrec.experiments.assignment import HOLDOUT, unit_hash
from redrec.experiments.log import AppendLog
from redrec.index.search import Query
from redrec.serving import added_items
from redrec.serving.arms import ArmRuntime
from redrec.serving.config import ServingConfig, ShadowSpec
from redrec.serving.history import collate, encode_row

log = logging.getLogger("redrec.serving.shadow")

# what on_event reports (the Prometheus counter's ``outcome`` label)
OUTCOMES = ("mirrored", "scored", "error", "dropped", "log_failed")
WARN_EVERY_S = 30.0


def mirrored(request_id: str, share: float) -> bool:
    """Whether ``request_id`` is mirrored at ``share``: reproducible across replicas and restarts."""
    return unit_hash("shadow", str(request_id)) < share


@dataclass
class _Job:
    rt: ArmRuntime
    spec: ShadowSpec
    resp: dict
    k: int
    exclude_seen: bool
    history: list
    queued: float  # perf_counter at offer


class Shadow:
    def __init__(self, engine, log_dir: str | Path, writer_args: dict):
        self.engine = engine
        self.log_dir, self.writer_args = Path(log_dir), writer_args
        self._log: AppendLog | None = None  # opened at the first line: no empty file per process without a shadow
        self.on_event: Callable[[str], None] = lambda outcome: None
        self.counts: Counter = Counter()
        self.last_error: str | None = None
        self._state: tuple[ShadowSpec, ArmRuntime] | None = None
        self._q: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._pending = 0  # queued + being scored: what max_in_flight bounds
        self._drops: Counter = Counter()  # dropped since the last drop line, by reason
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned_at = 0.0

    # ---- config: loaded with the arms, swapped with them ---------------------------------------------
    def load(self, cfg: ServingConfig) -> ArmRuntime | None:
        """The candidate's runtime for ``cfg.shadow`` (None: no shadow); raises, naming the field,
        on an unknown version: the config is refused whole, as for an arm."""
        spec = cfg.shadow
        if spec is None:
            return None
        eng = self.engine
        cfg.check_shadow_version(eng.models.versions(), eng.models.name)
        rt = eng._arm_of(cfg, "shadow", spec.model_version, cfg.shadow_alias(), {}, "shadow.model_version",
                         timeout_s=min(spec.timeout_s, cfg.milvus.timeout_s))
        added_items.pick_up(eng.models.store, {"shadow": rt})
        return rt

    def install(self, cfg: ServingConfig, rt: ArmRuntime | None) -> None:
        self._state = None if rt is None or cfg.shadow is None else (cfg.shadow, rt)
        if self._state is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="redrec-shadow", daemon=True)
            self._thread.start()

    # ---- the request path: O(1), never raises ------------------------------------------------------------
    def offer(self, resp: dict, k: int, exclude_seen: bool, history: list | None) -> None:
        st = self._state
        if st is None or history is None:
            return
        try:
            spec, rt = st
            if resp.get("cold_start") or resp.get("fallback") or resp.get("arm") == HOLDOUT:
                return
            if not mirrored(resp["request_id"], spec.share):
                return
            with self._lock:
                full = self._pending >= spec.max_in_flight
                if full:
                    self._drops["max_in_flight"] += 1
                else:
                    self._pending += 1
            if full:
                self._count("dropped")
                return
            self._q.put(_Job(rt, spec, resp, k, exclude_seen, history, time.perf_counter()))
            self._count("mirrored")
        except Exception as e:  # noqa: BLE001 - the caller's response is already built: never theirs to see
            self._error(f"offer: {type(e).__name__}: {e}")

    # ---- the shadow worker -------------------------------------------------------------------------
    def _run(self) -> None:
        # not niced: a low-priority thread preempted while it holds the GIL stalls the request path
        while True:
            jobs = [self._q.get()]
            spec = jobs[0].spec
            # a tower forward costs about the same for 2 rows as for 30: mirrors wait to share one
            # (at share 0.1, one forward per mirror doubled the forwards and cut throughput by a third)
            until = jobs[0].queued + spec.batch_max_wait_ms / 1000
            while len(jobs) < spec.batch_max_size:
                try:
                    jobs.append(self._q.get(timeout=max(until - time.perf_counter(), 0)))
                except queue.Empty:
                    break
            try:
                self._batch(jobs)
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch
                self._error(f"worker: {type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._pending -= len(jobs)

    def _batch(self, jobs: list[_Job]) -> None:
        now = time.perf_counter()
        fresh = [j for j in jobs if now - j.queued <= j.spec.timeout_s]
        stale = len(jobs) - len(fresh)
        if stale:
            with self._lock:
                self._drops["timeout"] += stale
            for _ in range(stale):
                self._count("dropped")
        lines = []
        by_rt: dict[int, list[_Job]] = {}
        for j in fresh:  # a reload mid-queue: each mirror is scored by the candidate it was offered to
            by_rt.setdefault(id(j.rt), []).append(j)
        for group in by_rt.values():
            lines += self._score(group, now)
        with self._lock:
            drops, self._drops = self._drops, Counter()
        ts = time.time()
        lines += [{"ts": ts, "event": "dropped", "reason": why, "n": n} for why, n in drops.items()]
        self._write(lines)

    def _score(self, jobs: list[_Job], started: float) -> list[dict]:
        rt = jobs[0].rt
        out: list[dict] = []
        t0 = time.perf_counter()
        error = None
        results: list[tuple[list, list, bool]] = [([], [], False)] * len(jobs)
        try:
            seen = [{h.item_id for h in j.history} if j.exclude_seen else set() for j in jobs]
            rows = [encode_row(rt.vocab, j.history) for j in jobs]
            warm = [i for i, r in enumerate(rows) if len(r["items"])]
            for i in set(range(len(jobs))) - set(warm):
                # the candidate cannot read this history (items newer than its model): its cold start
                pop = [(it, s) for it, s in (self.engine._popular or {}).get(jobs[i].resp["scenario"], [])
                       if it not in seen[i]][: jobs[i].k]
                results[i] = ([it for it, _ in pop], [s for _, s in pop], True)
            if warm:
                batch = collate([rows[i] for i in warm], [rt.vocab.scenario_index[jobs[i].resp["scenario"]] for i in warm])
                with torch.inference_mode():
                    vec = rt.model.user_vectors(batch)[:, 0].float().numpy()
                queries = [Query(vec[n], jobs[i].resp["scenario"], jobs[i].k, seen[i]) for n, i in enumerate(warm)]
                for i, res in zip(warm, self.engine._search_many(rt, queries)):
                    results[i] = ([h for h, _ in res.hits], [s for _, s in res.hits], False)
        except Exception as e:  # noqa: BLE001 - the candidate's failure is a finding, logged and counted
            error = f"{type(e).__name__}: {str(e)[:300]}"
        compute_ms = round((time.perf_counter() - t0) * 1000, 3)
        ts = time.time()
        for j, (items, scores, cold) in zip(jobs, results):
            r = j.resp
            queue_ms = round((started - j.queued) * 1000, 3)
            err = error
            if err is None and (started - j.queued) + compute_ms / 1000 > j.spec.timeout_s:
                err = f"timeout: scored {queue_ms + compute_ms:.0f} ms after the response (shadow.timeout_s {j.spec.timeout_s:g})"
            out.append({
                "request_id": r["request_id"], "ts": ts, "user_id": r["user_id"], "scenario": r["scenario"], "k": j.k,
                "arm": r.get("arm"), "production_version": r["model_version"], "production_items": r["items"],
                "production_scores": r["scores"], "candidate_version": rt.version,
                "candidate_items": [] if error else items,
                "candidate_scores": [] if error else [round(float(s), 6) for s in scores],
                "candidate_cold_start": cold, "latency_ms": compute_ms, "queue_ms": queue_ms, "batch_size": len(jobs),
                "error": err})
            self._count("error" if err else "scored")
        if error:
            self._error(f"candidate {rt.version}: {error}")
        return out

    def _write(self, lines: list[dict]) -> None:
        if not lines:
            return
        try:
            if self._log is None:
                self._log = AppendLog.for_process(self.log_dir, "shadow", **self.writer_args)
            self._log.append_many(lines)
        except (OSError, ValueError) as e:
            for _ in lines:
                self._count("log_failed")
            self._error(f"shadow log not written: {e}")

    # ---- counting ------------------------------------------------------------------------------
    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        try:
            self.on_event(outcome)
        except Exception:  # noqa: BLE001 - a metrics hiccup must not stop the counting
            pass

    def _error(self, why: str) -> None:
        self.last_error = why
        now = time.time()
        if now - self._warned_at >= WARN_EVERY_S:  # one line per failing stretch, not one per mirror
            self._warned_at = now
            log.warning("shadow: %s (never seen by a caller; counted in redrec_shadow_requests_total)", why)

    def status(self) -> dict | None:
        """For ``/ops/release``: what is in shadow and how its mirrors fared in this process."""
        st = self._state
        base = {"counts": {o: self.counts[o] for o in OUTCOMES}, "pending": self._pending, "last_error": self.last_error,
                "log": str(self._log.path) if self._log else None}
        if st is None:
            return {"model_version": None, **base} if any(self.counts.values()) else None
        spec, rt = st
        return {"model_version": rt.version, "share": spec.share, "alias": rt.alias,
                "max_in_flight": spec.max_in_flight, "timeout_s": spec.timeout_s, **base}

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
