"""The recommendation engine behind the BentoML service (no HTTP here; ``bentos/service.py`` is a
thin shell that maps these calls and errors to routes and status codes).

recommend: experiment arm of the user -> one micro-batch per arm holds the concurrent requests:
ONE Feast read of all their users' recent behaviour across ALL scenarios -> ONE user-tower forward
with each request's scenario queries -> the Milvus search, restricted to the scenario's eligible
items, seen items excluded: per request and concurrent, or with ``serving.batch_search`` ONE search
per scenario with all the batch's query vectors, split per request.
Feast and Milvus calls run under a deadline each (``serving.feast_timeout_s``,
``milvus.timeout_s``); a dependency timing out shows in ``/readyz``. No usable history -> the
scenario's popular items, flagged ``cold_start``. Every response is appended to the serving log
before it is returned.

Model and index are a pair: an arm searches its alias only while the alias' collection records the
arm's model version; otherwise (a publication ahead of the deploy, a rollback of the index alone)
it keeps searching the collection built from its own model, and says so in ``release_status`` and
the log. Models come from the model store the config names; a changed config file (a deploy, a
promote, a rollback) is loaded in the background and swapped in whole, or refused whole.

This module is the request path; the arms and their reload live in ``redrec.serving.arms``,
readiness and the release status in ``redrec.serving.health`` (mixed into ``Engine``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from redrec.experiments.assignment import HOLDOUT, INTERLEAVED, assign
from redrec.experiments.interleaving import draft_seed, team_draft
from redrec.experiments.log import RECEIVED
from redrec.features.eventlog import open_log
from redrec.schema import EVENT_COLUMNS
from redrec.index import exact
from redrec.index.search import NotPublished, PairedHits, Query, paired_collection, search_paired_many
from redrec.serving import registry
from redrec.serving.config import ServingConfig, read_config_source
from redrec.serving.servinglog import ServingLogs
from redrec.serving.workers import WorkerBoard
from redrec.serving.arms import ArmRuntime, ArmsMixin, _Generation  # noqa: F401 - ArmRuntime: the request path's arm
from redrec.serving.health import HealthMixin
from redrec.serving.shadow import Shadow
from redrec.serving.features import item_catalogue, open_repo
from redrec.serving.history import collate, encode_row

log = logging.getLogger(__name__)


class ServingError(Exception):
    status = 500

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def body(self) -> dict:
        return {"error": str(self), **({"field": self.field} if self.field else {})}


class BadRequest(ServingError):
    status = 400


class NotFound(ServingError):
    status = 404


class Unavailable(ServingError):
    status = 503


@dataclass
class _Ask:
    """One /recommend request, as queued for its arm's micro-batch."""

    user_id: str
    scenario: str
    k: int
    exclude_seen: bool
    search: bool  # False for holdout users: they get popularity, the tower and index are not asked
    queued_at: float  # perf_counter at submit


@dataclass
class _Answer:
    history: list
    history_len: int = 0  # events the tower reads: drift compares model outputs at like lengths
    vec: np.ndarray | None = None  # [K, dim], for requests that search
    hits: PairedHits | None = None
    search_error: Exception | None = None  # the batch's Milvus search failed: this request degrades
    timings: dict | None = None  # where the batch's time went, logged with each response

    @property
    def warm(self) -> bool:
        """The user has usable history (else: cold start)."""
        return self.history_len > 0


class DeadlineExceeded(TimeoutError):
    """A dependency's call ran past its deadline; ``dependency`` names it (feast, milvus, event log)."""

    def __init__(self, dependency: str, message: str):
        super().__init__(message)
        self.dependency = dependency


class _Deadline:
    """Calls to one dependency in a bounded pool, each under a deadline; remembers whether the
    last call timed out (for /readyz). The dependencies' own clients may retry for a minute
    (pymilvus reconnects, Feast's HTTP client has no timeout): a hung server must cost a request
    its deadline, never the arm's batch thread."""

    def __init__(self, name: str, timeout_s: float, setting: str, workers: int = 4):
        self.name, self.timeout_s, self.setting = name, timeout_s, setting
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="redrec-" + name.replace(" ", "-"))
        self.ok_at, self.stuck_at = 0.0, 0.0

    def __call__(self, fn, *args, timeout_s: float | None = None, setting: str | None = None):
        fut = self.pool.submit(fn, *args)
        timeout_s = timeout_s or self.timeout_s
        try:
            out = fut.result(timeout=timeout_s)
        except FutureTimeout:
            self.stuck_at = time.monotonic()
            raise DeadlineExceeded(self.name, f"{self.name}: no answer within {timeout_s:g}s ({setting or self.setting})") from None
        self.ok_at = time.monotonic()
        return out

    @property
    def stuck(self) -> bool:
        return self.stuck_at > self.ok_at


def _dependency(e: BaseException) -> str | None:
    """The dependency an exception comes from, if it is an outage rather than a bug."""
    if isinstance(e, DeadlineExceeded):
        return e.dependency
    mod = type(e).__module__ or ""
    if mod.startswith("redis"):
        return "event log"
    if isinstance(e, NotPublished) or mod.startswith(("pymilvus", "grpc")):  # PairMismatch included
        return "milvus"
    if mod.startswith(("requests", "urllib3", "feast", "sqlite3")) or isinstance(e, (ConnectionError, TimeoutError)):
        return "feast"
    if isinstance(e, RuntimeError) and "online features" in str(e):  # feast's remote store wraps HTTP errors so
        return "feast"
    return None


def _short(value, limit: int = 64) -> str:
    """A client's value as echoed in an error: quoted, and cut (an id may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(str(value))} characters)"



class Engine(ArmsMixin, HealthMixin):
    def __init__(self, cfg: ServingConfig, config_path: str | None = None):
        if cfg.serving.torch_threads:
            torch.set_num_threads(cfg.serving.torch_threads)
            # process-wide: a BLAS pool spins its threads against the tower's and the event loop's.
            # numpy and scipy each bundle an OpenBLAS, and a cap reaches only those loaded: load
            # scipy's now rather than at its first use, after the cap
            import scipy.linalg  # noqa: F401

            threadpool_limits(cfg.serving.torch_threads, user_api="blas")
        self.scenarios = list(cfg.scenarios)
        self.repo = open_repo(cfg)
        self.repo.max_future_skew_s = cfg.events.max_future_skew_s
        # where /record_events appends: the online store itself (embedded) or the Redis event log
        self.events = open_log(cfg.events, self.repo)
        self._append = (_Deadline("event log", cfg.events.append_timeout_s, "events.append_timeout_s")
                        if self.events.kind == "redis" else None)
        self._feast = _Deadline("feast", cfg.serving.feast_timeout_s, "serving.feast_timeout_s")
        self._milvus = _Deadline("milvus", cfg.milvus.timeout_s, "milvus.timeout_s")
        self.models = registry.ModelSource(cfg.model_store.uri, cfg.model_store.cache_dir)
        self._gen: _Generation | None = None
        self._install(cfg, self._load_arms(cfg))
        sl = cfg.serving.serving_log
        self.logs = ServingLogs(sl.dir, sl.writer_args())
        self.shadow = Shadow(self, sl.dir, sl.writer_args())  # a candidate scoring mirrored requests (redrec.serving.shadow)
        self.shadow.install(cfg, self.shadow.load(cfg))
        self._popular: dict[str, list[tuple[str, float]]] | None = None
        self._popular_at = 0.0
        self._pop_lock = threading.Lock()
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "not checked yet")
        self._alias_seen: dict[str, str | None] = {}  # arm -> alias target of its last search (log once per change)
        self._retired: list[ArmRuntime] = []
        self._config_path = config_path
        # config.yaml and the release overlay (redrec.serving.config.ConfigSource): a change to either reloads
        self._config_src = read_config_source(config_path) if config_path else None
        # which config text is served and which was refused: a deployer waits for its own text
        self.reload = {"config": config_path, "loaded": time.time(),
                       "loaded_sha256": self._config_src.sha256 if self._config_src else None,
                       "overlay": self._config_src.overlay_path if self._config_src else None,
                       "error": None, "error_sha256": None, "reloads": 0}
        self.draining = None  # the service's Drain: set once SIGTERM handling is in place
        self.board = WorkerBoard(cfg.serving.workers)
        self._publish_status()
        self.refresh_popularity(raise_errors=False, startup=True)
        if (config_path or self.models.store) and cfg.model_store.config_poll_s > 0:
            threading.Thread(target=self._watch_config, name="redrec-config-watch", daemon=True).start()

    # ---- popularity (cold start and fallback) ---------------------------------------------------
    def refresh_popularity(self, raise_errors: bool = True, startup: bool = False) -> None:
        deadline = {"timeout_s": self.cfg.serving.startup_catalogue_timeout_s,
                    "setting": "serving.startup_catalogue_timeout_s"} if startup else {}
        try:
            scen, pop = self._feast(item_catalogue, self.repo, self.catalogue, **deadline)
        except Exception as e:
            if raise_errors:
                raise
            log.warning("item popularity not loaded yet: %s", e)
            return
        table = {}
        for s in self.scenarios:
            ranked = sorted(((i, float(pop[i])) for i in self.catalogue if s in scen[i]), key=lambda kv: (-kv[1], kv[0]))
            table[s] = ranked
        with self._pop_lock:
            self._popular, self._popular_at = table, time.monotonic()

    def popular(self, scenario: str, k: int, exclude: set[str]) -> list[tuple[str, float]]:
        if self._popular is None or time.monotonic() - self._popular_at > self.cfg.serving.popularity_refresh_s:
            try:
                self.refresh_popularity()
            except Exception as e:  # keep serving the last table; without one, this is an outage
                if self._popular is None:
                    raise Unavailable(f"feature store unavailable, popularity not loaded: {type(e).__name__}: {e}") from e
                log.warning("popularity refresh failed, serving the previous table: %s", e)
                self._popular_at = time.monotonic()
        return [(i, s) for i, s in self._popular[scenario] if i not in exclude][:k]

    # ---- validation -----------------------------------------------------------------------------
    def _check_common(self, user_id: str | None, scenario: str, k: int) -> None:
        if scenario not in self.scenarios:
            raise BadRequest(f"scenario: unknown scenario {_short(scenario)}; use one of {self.scenarios}", "scenario")
        if not 1 <= k <= self.cfg.serving.max_k:
            raise BadRequest(f"k: must be between 1 and {self.cfg.serving.max_k} (serving.max_k), got {k}", "k")
        if user_id is not None:
            self._check_user(user_id)

    def _check_user(self, user_id: str, field: str = "user_id") -> None:
        if not user_id.strip():
            raise BadRequest(f"{field}: must not be empty", field)
        if len(user_id) > self.cfg.serving.max_user_id_len:
            raise BadRequest(f"{field}: longer than {self.cfg.serving.max_user_id_len} characters "
                             f"(serving.max_user_id_len)", field)

    # ---- the request path, batched ---------------------------------------------------------------
    def _serve_batch(self, rt: ArmRuntime, asks: list[_Ask]) -> list[_Answer]:
        """A micro-batch of one arm: one Feast read for all its users, one user-tower forward, one
        Milvus search per scenario; then split per request. A failed Feast read fails the batch
        (every request degrades); a failed search is handed to each request that needed it."""
        t0 = time.perf_counter()
        users = list(dict.fromkeys(a.user_id for a in asks))
        hist = self._feast(self.repo.online_histories, users)
        t1 = time.perf_counter()
        rows = [encode_row(rt.vocab, hist[a.user_id]) for a in asks]
        out = [_Answer(hist[a.user_id], len(r["items"])) for a, r in zip(asks, rows)]
        warm = [i for i, a in enumerate(asks) if a.search and out[i].warm]
        if warm:
            batch = collate([rows[i] for i in warm], [rt.vocab.scenario_index[asks[i].scenario] for i in warm])
            with torch.inference_mode():
                vec = rt.model.user_vectors(batch)[:, 0].float().numpy()  # [B, K, dim]
            for j, i in enumerate(warm):
                out[i].vec = vec[j]
        t2 = time.perf_counter()
        # a collection held in process is searched for the whole batch at once: one matrix product
        # per scenario; through Milvus, serving.batch_search decides
        if warm and (self.cfg.serving.batch_search or exact.loaded(rt.index, rt.version)):
            queries = [Query(out[i].vec, asks[i].scenario, asks[i].k,
                             {h.item_id for h in out[i].history} if asks[i].exclude_seen else ()) for i in warm]
            try:
                for i, res in zip(warm, self._milvus(self._search_many, rt, queries)):
                    out[i].hits = res
            except Exception as e:  # noqa: BLE001 - each request decides (fallback or 503)
                for i in warm:
                    out[i].search_error = e
        t3 = time.perf_counter()
        ms = lambda a, b: round((b - a) * 1000, 3)  # noqa: E731
        for a, ans in zip(asks, out):
            ans.timings = {"queue_ms": ms(a.queued_at, t0), "feast_ms": ms(t0, t1), "tower_ms": ms(t1, t2),
                           "search_ms": ms(t2, t3), "batch_size": len(asks)}
        return out

    def _search_many(self, rt: ArmRuntime, queries: list[Query]) -> list[PairedHits]:
        try:
            res = search_paired_many(rt.index, rt.version, queries)
        except Exception as e:
            # a restarted Milvus (Lite always, a standalone after some failures) comes back with
            # the collection released: load it once and retry instead of failing until a redeploy
            if "load" not in str(e).lower() or _dependency(e) != "milvus":
                raise
            from redrec.index.milvus import _alias_target, client

            target = paired_collection(rt.index, _alias_target(rt.index), rt.version)
            log.warning("collection %s is not loaded in Milvus; loading it", target)
            client(rt.index).load_collection(target, timeout=rt.index.timeout_s)
            res = search_paired_many(rt.index, rt.version, queries)
        alias_target = res[0].alias_target if res else self._alias_seen.get(rt.name)
        if res and self._alias_seen.get(rt.name) != alias_target:
            self._alias_seen[rt.name] = alias_target
            if res[0].collection != alias_target:
                log.warning("arm %s: alias '%s' serves %s, not an index of model %s; searching %s (the model's "
                            "own) until the config names the alias' model", rt.name, rt.alias, alias_target,
                            rt.version, res[0].collection)
        return res

    # ---- API ------------------------------------------------------------------------------------
    def arm_for(self, user_id: str) -> str:
        return assign(self.cfg.experiment, user_id)

    def _arm_runtime(self, user_id: str) -> tuple[str, ArmRuntime]:
        g = self._gen  # one generation, even mid-reload
        arm = assign(g.cfg.experiment, user_id)
        return arm, g.arms[g.control] if arm in (HOLDOUT, INTERLEAVED) else g.arms[arm]

    def _degraded(self, e: Exception) -> str:
        """The reason a dependency failure degrades this request to popularity; re-raises errors
        that are not a dependency's, and raises Unavailable (503) unless the fallback is configured."""
        dep = _dependency(e)
        if dep is None:
            raise e
        reason = f"{dep} unavailable: {type(e).__name__}: {str(e)[:200]}"
        if self.cfg.serving.on_dependency_error != "popularity":
            raise Unavailable(reason) from e
        return reason

    async def recommend(self, user_id: str, scenario: str, k: int = 10, exclude_seen: bool = True,
                        context: dict | None = None) -> dict:
        self._check_common(user_id, scenario, k)
        self._check_context(context)
        t0 = time.perf_counter()
        g = self._gen
        arm, rt = self._arm_runtime(user_id)
        if arm == INTERLEAVED:
            return await self._recommend_interleaved(g, user_id, scenario, k, exclude_seen, context, t0)
        fallback, warm, history, vec, reason, index, ans = False, False, [], None, None, None, None
        try:
            ans = await rt.batcher.submit(_Ask(user_id, scenario, k, exclude_seen, arm != HOLDOUT, t0))
            history, warm, vec = ans.history, ans.warm, ans.vec
            if ans.search_error is not None:
                reason, fallback = self._degraded(ans.search_error), True
        except Exception as e:
            reason, fallback = self._degraded(e), True
        cold = not warm and not fallback
        seen = {h.item_id for h in history} if exclude_seen else set()
        if arm == HOLDOUT or cold or fallback:
            # holdout users get the non-personalised baseline, the reference for the arms' total lift
            hits = await asyncio.to_thread(self.popular, scenario, k, seen)
            version = "popularity" if arm == HOLDOUT or fallback else rt.version
        else:
            version = rt.version
            if ans.hits is None:  # serving.batch_search off: this request searches on its own
                t_search = time.perf_counter()
                q = Query(vec, scenario, k, seen)
                try:
                    ans.hits = (await asyncio.to_thread(self._milvus, self._search_many, rt, [q]))[0]
                except Exception as e:
                    reason, fallback, version = self._degraded(e), True, "popularity"
                ans.timings["search_ms"] = round((time.perf_counter() - t_search) * 1000, 3)
            if fallback:
                hits = await asyncio.to_thread(self.popular, scenario, k, seen)
            else:
                hits, index = ans.hits.hits, ans.hits
        resp = {
            "request_id": uuid.uuid4().hex,
            "experiment": g.cfg.experiment.name,
            "user_id": user_id,
            "scenario": scenario,
            "arm": arm,
            "model_version": version,
            "index_version": index.index_version if index else None,
            "items": [i for i, _ in hits],
            "scores": [round(float(s), 6) for _, s in hits],
            "cold_start": cold,
            "fallback": fallback,
        }
        self._log_response(resp, t0, ans, index, reason, context, vec)
        self.shadow.offer(resp, k, exclude_seen, history if ans is not None else None)  # queued, never waited on
        return resp

    def _log_response(self, resp: dict, t0: float, ans: _Answer | None, index: PairedHits | None, reason: str | None,
                      context: dict | None, vec: np.ndarray | None, **extra) -> None:
        record = {**resp, "ts": time.time(), "latency_ms": round((time.perf_counter() - t0) * 1000, 3), **extra}
        if ans is not None and ans.timings:  # where the time went: queue, Feast read, tower, search (per batch)
            record.update(ans.timings)
        if index is not None:
            record["index_collection"] = index.collection
        if reason:
            record["fallback_reason"] = reason
        if context:
            record["context"] = context
        if vec is not None:
            record["history_len"] = ans.history_len
        if vec is not None and self.cfg.serving.log_user_embedding:
            m = vec.mean(0)
            record["user_embedding"] = [round(float(x), 5) for x in m / max(np.linalg.norm(m), 1e-12)]
        self.logs.append("serving", [record])  # before returning: an acknowledged response is on the log

    async def _ranked(self, rt: ArmRuntime, ask: _Ask) -> _Answer:
        """One arm's answer with its hits searched (on its own when the batch did not search)."""
        ans = await rt.batcher.submit(ask)
        if ans.search_error is not None:
            raise ans.search_error
        if ans.warm and ans.hits is None:
            seen = {h.item_id for h in ans.history} if ask.exclude_seen else set()
            t_search = time.perf_counter()
            ans.hits = (await asyncio.to_thread(self._milvus, self._search_many, rt,
                                                [Query(ans.vec, ask.scenario, ask.k, seen)]))[0]
            ans.timings["search_ms"] = round((time.perf_counter() - t_search) * 1000, 3)
        return ans

    async def _recommend_interleaved(self, g: _Generation, user_id: str, scenario: str, k: int, exclude_seen: bool,
                                     context: dict | None, t0: float) -> dict:
        """Both arms rank for the user, concurrently, each in its own micro-batch; team draft merges
        the two top-k lists, seeded by the request id, and the log says which arm placed each item.
        A user without history, or an arm that fails, gets the scenario's popular items (no teams:
        such a response says nothing about the preference). No shadow mirror: the list is no one
        model's, so a candidate's overlap with it would measure nothing."""
        names = [a.name for a in g.cfg.experiment.arms]
        rts = [g.arms[n] for n in names]
        request_id = uuid.uuid4().hex
        answers: list[_Answer] = []
        reason = None
        try:
            answers = list(await asyncio.gather(*(self._ranked(rt, _Ask(user_id, scenario, k, exclude_seen, True, t0))
                                                  for rt in rts)))
        except Exception as e:
            reason = self._degraded(e)
        warm = bool(answers) and all(a.warm for a in answers)
        history = answers[0].history if answers else []
        seen = {h.item_id for h in history} if exclude_seen else set()
        teams, rankings, versions = None, None, {n: rt.version for n, rt in zip(names, rts)}
        if warm:
            ranked = [a.hits.hits for a in answers]
            items, team_idx = team_draft([i for i, _ in ranked[0]], [i for i, _ in ranked[1]], k,
                                         draft_seed(g.cfg.experiment.name, request_id))
            score = [dict(r) for r in ranked]
            scores = [score[t][i] for i, t in zip(items, team_idx)]
            teams = [names[t] for t in team_idx]
            # both inputs of the draft: with the request id, a replay of the line reproduces the list
            rankings = {n: [i for i, _ in r] for n, r in zip(names, ranked)}
            version = rts[0].version
        else:
            hits = await asyncio.to_thread(self.popular, scenario, k, seen)
            items, scores = [i for i, _ in hits], [s for _, s in hits]
            version = "popularity" if reason else rts[0].version
        resp = {
            "request_id": request_id,
            "experiment": g.cfg.experiment.name,
            "user_id": user_id,
            "scenario": scenario,
            "arm": INTERLEAVED,
            "model_version": version,
            "index_version": answers[0].hits.index_version if warm else None,
            "items": items,
            "scores": [round(float(s), 6) for s in scores],
            "cold_start": not warm and reason is None,
            "fallback": reason is not None,
        }
        # the control's user vector: the drift check compares it with the control model's reference
        vec = answers[0].vec if warm else None
        self._log_response(resp, t0, answers[0] if answers else None, answers[0].hits if warm else None, reason,
                           context, vec, teams=teams, rankings=rankings, arm_versions=versions)
        return resp

    def _check_context(self, context: dict | None) -> None:
        """Before any work: the context is logged verbatim, so it must be finite JSON of bounded size."""
        if not context:
            return
        try:
            size = len(json.dumps(context, separators=(",", ":"), allow_nan=False))
        except (ValueError, TypeError) as e:
            raise BadRequest(f"context must be JSON with finite numbers only (no NaN or Infinity): {e}", "context") from None
        limit = self.cfg.serving.max_context_bytes
        if size > limit:
            raise BadRequest(f"context is {size} bytes of JSON; at most {limit} are accepted", "context")

    async def similar_items(self, item_id: str, scenario: str, k: int = 10, user_id: str | None = None) -> dict:
        self._check_common(user_id, scenario, k)
        _, rt = self._arm_runtime(user_id) if user_id else (self.control, self.arms[self.control])
        idx = rt.vocab.item_index.get(item_id)
        if idx is None:
            raise NotFound(f"item_id: unknown item {_short(item_id)} (not in the catalogue of model {rt.version})", "item_id")
        try:
            q = Query(rt.item_emb[idx - 1], scenario, k, {item_id})
            res = (await asyncio.to_thread(self._milvus, self._search_many, rt, [q]))[0]
        except Exception as e:
            dep = _dependency(e)
            if dep is None:
                raise
            raise Unavailable(f"{dep} unavailable: {type(e).__name__}: {str(e)[:200]}") from e
        return {"item_id": item_id, "scenario": scenario, "model_version": rt.version, "index_version": res.index_version,
                "items": [i for i, _ in res.hits], "scores": [round(float(s), 6) for _, s in res.hits]}

    async def record_events(self, events: list[dict]) -> dict:
        """Check every event, then append them all to the event log; ``accepted`` once it holds
        them (embedded: applied to Feast; redis: in the stream, applied by the ingest workers)."""
        if not events:
            raise BadRequest("events: empty list; send at least one event", "events")
        if len(events) > self.cfg.serving.max_events_per_call:
            raise BadRequest(f"events: {len(events)} events, at most {self.cfg.serving.max_events_per_call} per call", "events")
        received = time.time()
        now = int(received)
        skew = self.cfg.events.max_future_skew_s
        rows = []
        for n, e in enumerate(events):
            self._check_user(e["user_id"], f"events[{n}].user_id")
            if e["scenario"] not in self.scenarios:
                raise BadRequest(f"events[{n}].scenario: unknown scenario {_short(e['scenario'])}; use one of {self.scenarios}",
                                 f"events[{n}].scenario")
            if e["item_id"] not in self.known_items:
                raise BadRequest(f"events[{n}].item_id: unknown item {_short(e['item_id'])}", f"events[{n}].item_id")
            if e["action"] not in self.actions:
                raise BadRequest(f"events[{n}].action: unknown action {_short(e['action'])}; use one of {self.actions}",
                                 f"events[{n}].action")
            ts = int(e["ts"]) if e.get("ts") is not None else now
            if ts > now + skew:
                raise BadRequest(f"events[{n}].ts: {ts} is more than {skew:g}s ahead of the server's clock ({now}); "
                                 "send unix seconds, at most now + events.max_future_skew_s", f"events[{n}].ts")
            rows.append({"user_id": e["user_id"], "item_id": e["item_id"], "scenario": e["scenario"],
                         "action": e["action"], "ts": ts, "request_id": e.get("request_id"), RECEIVED: received})
        df = pd.DataFrame(rows)[list(EVENT_COLUMNS)]
        deadline = self._append or self._feast
        try:
            rep = await asyncio.to_thread(deadline, self.events.append, df)
        except Exception as e:
            dep = _dependency(e)
            if dep is None:
                raise
            late = " (a timed-out write may still land; a retry is deduplicated)" if isinstance(e, TimeoutError) else ""
            raise Unavailable(f"{dep} unavailable, events not recorded{late}: {type(e).__name__}: {str(e)[:200]}") from e
        self.logs.append("feedback", rows)
        return rep

    def stats(self) -> dict:
        return {name: rt.batcher.stats() for name, rt in self.arms.items()}
