"""The recommendation engine behind the BentoML service (no HTTP here; ``bentos/service.py`` is a
thin shell that maps these calls and errors to routes and status codes).

recommend: experiment arm of the user -> the user's recent behaviour across ALL scenarios from
Feast -> user tower with the requested scenario's queries (micro-batched per arm) -> Milvus search
restricted to items eligible in the scenario, seen items excluded. No usable history -> the
scenario's popular items, flagged ``cold_start``. Every response is appended to the serving log
before it is returned.

Model and index are a pair: an arm searches its alias only while the alias' collection records the
arm's model version; otherwise (a publication ahead of the deploy, a rollback of the index alone)
it keeps searching the collection built from its own model, and says so in ``release_status`` and
the log. Models come from the model store the config names; a changed config file (a deploy, a
promote, a rollback) is loaded in the background and swapped in whole, or refused whole.
"""

from __future__ import annotations

import asyncio
import hashlib
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

from redrec.experiments.assignment import HOLDOUT, assign
from redrec.experiments.log import AppendLog
from redrec.features.store import HistoryEvent
from redrec.index.config import IndexConfig
from redrec.index.search import NotPublished, PairedHits, paired_collection, search_paired
from redrec.serving import registry
from redrec.serving.batching import MicroBatcher
from redrec.serving.config import ConfigError, ServingConfig
from redrec.serving.features import item_catalogue, open_repo
from redrec.serving.history import Vocab, collate, encode_row

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
class ArmRuntime:
    name: str
    version: str
    alias: str
    model: torch.nn.Module
    vocab: Vocab
    item_ids: list[str]
    item_emb: np.ndarray  # [n_items, dim], row i-1 = item index i
    index: IndexConfig
    batcher: MicroBatcher | None = None


def _dependency(e: BaseException) -> str | None:
    """The dependency an exception comes from, if it is an outage rather than a bug."""
    mod = type(e).__module__ or ""
    if isinstance(e, NotPublished) or mod.startswith(("pymilvus", "grpc")):  # PairMismatch included
        return "milvus"
    if mod.startswith(("requests", "urllib3", "feast", "sqlite3")) or isinstance(e, (ConnectionError, TimeoutError)):
        return "feast"
    if isinstance(e, RuntimeError) and "online features" in str(e):  # feast's remote store wraps HTTP errors so
        return "feast"
    return None


def _sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Generation:
    cfg: ServingConfig
    arms: dict[str, ArmRuntime]
    control: str
    catalogue: list[str]
    known_items: set[str]
    actions: list[str]


class Engine:
    def __init__(self, cfg: ServingConfig, config_path: str | None = None):
        if cfg.serving.torch_threads:
            torch.set_num_threads(cfg.serving.torch_threads)
        self.scenarios = list(cfg.scenarios)
        self.repo = open_repo(cfg)
        # every Feast read runs here under a deadline (Feast's HTTP client has none): a hung feature
        # server costs a request its deadline, not the arm's batch thread forever
        self._feast_pool = ThreadPoolExecutor(4, thread_name_prefix="redrec-feast")
        self._feast_timeout_s = cfg.serving.feast_timeout_s
        self._feast_ok_at, self._feast_stuck_at = 0.0, 0.0
        self.models = registry.ModelSource(cfg.model_store.uri, cfg.model_store.cache_dir)
        self._gen: _Generation | None = None
        self._install(cfg, self._load_arms(cfg))
        sl = cfg.serving.serving_log
        self.log = AppendLog.for_process(sl.dir, "serving", **sl.writer_args())
        self.feedback = AppendLog.for_process(sl.dir, "feedback", **sl.writer_args())
        self._popular: dict[str, list[tuple[str, float]]] | None = None
        self._popular_at = 0.0
        self._pop_lock = threading.Lock()
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "not checked yet")
        self._alias_seen: dict[str, str | None] = {}  # arm -> alias target of its last search (log once per change)
        self._retired: list[ArmRuntime] = []
        self._config_path = config_path
        self._config_text = open(config_path).read() if config_path else None
        # which config text is served and which was refused: a deployer waits for its own text
        self.reload = {"config": config_path, "loaded": time.time(), "loaded_sha256": _sha(self._config_text),
                       "error": None, "error_sha256": None, "reloads": 0}
        self.refresh_popularity(raise_errors=False)
        if config_path and cfg.model_store.config_poll_s > 0:
            threading.Thread(target=self._watch_config, name="redrec-config-watch", daemon=True).start()

    # ---- models: load, install, reload -----------------------------------------------------------
    def _load_arms(self, cfg: ServingConfig) -> dict[str, ArmRuntime]:
        """Every arm's model loaded and checked; raises (naming the arm and the fix) on any problem."""
        cfg.experiment.check_versions(self.models.versions(), where=self.models.name)
        models: dict[str, tuple] = {}
        arms: dict[str, ArmRuntime] = {}
        for arm in cfg.experiment.arms:
            if arm.model_version not in models:
                models[arm.model_version] = self.models.load(arm.model_version)
            model, info = models[arm.model_version]
            missing = [s for s in self.scenarios if s not in info["model"]["scenarios"]]
            if missing:
                raise ValueError(f"experiment.arms[{arm.name}].model_version {arm.model_version}: the model has no "
                                 f"queries for scenario(s) {missing} (it knows {info['model']['scenarios']})")
            emb = np.load(self.models.path(arm.model_version) / "item_embeddings.npy")
            alias = cfg.alias_for(arm.name)
            idx = IndexConfig(uri=cfg.milvus.uri, token=cfg.milvus.token, name=alias, dim=int(emb.shape[1]),
                              timeout_s=cfg.milvus.timeout_s, alias_ttl_s=cfg.milvus.alias_ttl_s)
            rt = ArmRuntime(arm.name, info["model_version"], alias, model, Vocab.from_info(info), list(info["item_ids"]),
                            emb, idx)
            rt.batcher = MicroBatcher(lambda reqs, rt=rt: self._user_vectors(rt, reqs), cfg.serving.batch_max_size,
                                      cfg.serving.batch_max_wait_ms, name=f"arm-{arm.name}")
            arms[arm.name] = rt
        return arms

    def _install(self, cfg: ServingConfig, arms: dict[str, ArmRuntime]) -> None:
        catalogue = sorted({i for a in arms.values() for i in a.item_ids})
        actions = sorted({a for rt in arms.values() for a in rt.vocab.action_index})
        # one assignment: a request reads config, arms and catalogue of the same generation
        self._gen = _Generation(cfg, arms, cfg.experiment.arms[0].name, catalogue, set(catalogue), actions)

    cfg = property(lambda self: self._gen.cfg)
    arms = property(lambda self: self._gen.arms)
    control = property(lambda self: self._gen.control)
    catalogue = property(lambda self: self._gen.catalogue)
    known_items = property(lambda self: self._gen.known_items)
    actions = property(lambda self: self._gen.actions)

    def _watch_config(self) -> None:
        while True:
            time.sleep(self.cfg.model_store.config_poll_s)
            try:
                self.reload_config()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad config
                log.exception("config reload failed")

    def reload_config(self) -> bool:
        """Load the config file again if it changed; True when new arms were swapped in. A config
        that does not load (unknown version, a model missing from the store, bad YAML) is refused
        whole: the running arms keep serving and ``release_status`` says why."""
        try:
            text = open(self._config_path).read()
        except OSError as e:
            self.reload["error"] = f"cannot read {self._config_path}: {e}"
            return False
        if text == self._config_text:
            return False
        try:
            new = ServingConfig.from_yaml(self._config_path)
            fixed = ("scenarios", "serving", "milvus", "feast", "model_store")
            changed = [k for k in fixed if getattr(new, k) != getattr(self.cfg, k)]
            if changed:
                raise ConfigError(f"sections {changed} changed: they take effect on a restart (only 'experiment' "
                                  "is reloaded in place)")
            arms = self._load_arms(new)
        except Exception as e:  # noqa: BLE001
            self.reload.update(error=f"{type(e).__name__}: {e}", error_sha256=_sha(text))
            self._config_text = text  # report once, retry on the next change
            log.error("config %s not loaded, still serving %s: %s", self._config_path,
                      {a: rt.version for a, rt in self.arms.items()}, self.reload["error"])
            return False
        old = self.arms
        for rt in self._retired:  # idle since the reload before this one
            rt.batcher.close()
        self._retired = list(old.values())
        self._install(new, arms)
        self._config_text = text
        self.reload.update(loaded=time.time(), loaded_sha256=_sha(text), error=None, error_sha256=None,
                           reloads=self.reload["reloads"] + 1)
        self._ready_cache = (0.0, False, "reloaded")
        log.info("config reloaded: arms %s", {a: rt.version for a, rt in arms.items()})
        return True

    # ---- popularity (cold start and fallback) ---------------------------------------------------
    def _feast(self, fn, *args):
        """``fn(*args)`` (a Feast read) within serving.feast_timeout_s, else TimeoutError (an outage)."""
        fut = self._feast_pool.submit(fn, *args)
        try:
            out = fut.result(timeout=self._feast_timeout_s)
        except FutureTimeout:
            self._feast_stuck_at = time.monotonic()
            raise TimeoutError(f"feast: no answer within {self._feast_timeout_s:g}s (serving.feast_timeout_s)") from None
        self._feast_ok_at = time.monotonic()
        return out

    def refresh_popularity(self, raise_errors: bool = True) -> None:
        try:
            scen, pop = self._feast(item_catalogue, self.repo, self.catalogue)
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

    # ---- readiness ------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """Models are loaded before the service starts; ready once every arm has an index built
        from its own model (the alias' collection, or its own previous one) and the popularity
        table is loaded. With ``on_dependency_error: popularity`` a Milvus outage leaves the pod
        ready (degraded): the fallback serves. Cached for 2 s: probes must stay cheap."""
        t, ok, why = self._ready_cache
        if time.monotonic() - t < 2.0:
            return ok, why
        ok, why = True, "ready"
        try:
            from redrec.index.milvus import _alias_target

            for rt in list(self.arms.values()):
                target = _alias_target(rt.index)
                paired_collection(rt.index, target, rt.version)  # raises PairMismatch when nothing pairs
        except NotPublished as e:
            ok, why = False, str(e)
        except Exception as e:
            ok, why = False, f"milvus unreachable: {type(e).__name__}"
        if self._popular is None:
            self.refresh_popularity(raise_errors=False)
        if ok and self._popular is None:
            ok, why = False, "item popularity not loaded (feature store unreachable?)"
        if self._feast_stuck_at > self._feast_ok_at:
            # probe again: an unready pod gets no traffic, so no request would ever clear the state
            self.refresh_popularity(raise_errors=False)
        if ok and self._feast_stuck_at > self._feast_ok_at:
            ok, why = False, f"feast timing out: its last read got no answer within {self._feast_timeout_s:g}s"
        if not ok and self.cfg.serving.on_dependency_error == "popularity" and self._popular is not None:
            # the models are loaded and the fallback answers every request: an outage of a dependency
            # must not take every replica out of the Service (that would defeat the fallback)
            ok, why = True, f"degraded, serving the popularity fallback: {why}"
        self._ready_cache = (time.monotonic(), ok, why)
        return ok, why

    def release_status(self) -> dict:
        """Per arm: the model it serves, what its alias names, the collection it searched last
        and whether that was the alias' (``paired_with_alias``); plus the config reload state."""
        from redrec.index.milvus import _alias_target, describe

        arms = {}
        for name, rt in list(self.arms.items()):
            row = {"model_version": rt.version, "alias": rt.alias}
            try:
                target = _alias_target(rt.index)
                row["alias_target"] = target
                row["alias_model_version"] = describe(rt.index, target).version if target else None
                row["collection"] = paired_collection(rt.index, target, rt.version)
                row["paired_with_alias"] = row["collection"] == target
                if not row["paired_with_alias"]:
                    row["note"] = (f"alias '{rt.alias}' serves model {row['alias_model_version']}'s index; this arm "
                                   f"keeps the pair ({rt.version}, {row['collection']}) until its config names "
                                   f"{row['alias_model_version']}")
            except Exception as e:  # noqa: BLE001 - reported, not raised: this is a status page
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            arms[name] = row
        return {"arms": arms, "config": dict(self.reload), "model_source": self.models.name,
                "readiness": self.ready()[1]}

    # ---- validation -----------------------------------------------------------------------------
    def _check_common(self, user_id: str | None, scenario: str, k: int) -> None:
        if scenario not in self.scenarios:
            raise BadRequest(f"scenario: unknown scenario {scenario!r}; use one of {self.scenarios}", "scenario")
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

    # ---- user tower (batched) -------------------------------------------------------------------
    def _user_vectors(self, rt: ArmRuntime, reqs: list[tuple[str, str]]) -> list:
        """(user_id, scenario) per request -> (history, [K, dim] vectors or None for cold users)."""
        users = list(dict.fromkeys(u for u, _ in reqs))
        hist = self._feast(self.repo.online_histories, users)
        rows = [encode_row(rt.vocab, hist[u]) for u, _ in reqs]
        warm = [i for i, r in enumerate(rows) if len(r["items"])]
        out: list = [(hist[u], None) for u, _ in reqs]
        if warm:
            batch = collate([rows[i] for i in warm], [rt.vocab.scenario_index[reqs[i][1]] for i in warm])
            with torch.inference_mode():
                vec = rt.model.user_vectors(batch)[:, 0].float().numpy()  # [B, K, dim]
            for j, i in enumerate(warm):
                out[i] = (hist[reqs[i][0]], vec[j])
        return out

    def _search(self, rt: ArmRuntime, vec: np.ndarray, scenario: str, k: int, exclude: list[str]) -> PairedHits:
        try:
            res = search_paired(rt.index, rt.version, vec, scenario, k, exclude)
        except Exception as e:
            # a restarted Milvus (Lite always, a standalone after some failures) comes back with
            # the collection released: load it once and retry instead of failing until a redeploy
            if "load" not in str(e).lower() or _dependency(e) != "milvus":
                raise
            from redrec.index.milvus import _alias_target, client

            target = paired_collection(rt.index, _alias_target(rt.index), rt.version)
            log.warning("collection %s is not loaded in Milvus; loading it", target)
            client(rt.index).load_collection(target, timeout=rt.index.timeout_s)
            res = search_paired(rt.index, rt.version, vec, scenario, k, exclude)
        if self._alias_seen.get(rt.name) != res.alias_target:
            self._alias_seen[rt.name] = res.alias_target
            if res.collection != res.alias_target:
                log.warning("arm %s: alias '%s' serves %s, not an index of model %s; searching %s (the model's "
                            "own) until the config names the alias' model", rt.name, rt.alias, res.alias_target,
                            rt.version, res.collection)
        return res

    # ---- API ------------------------------------------------------------------------------------
    def arm_for(self, user_id: str) -> str:
        return assign(self.cfg.experiment, user_id)

    def _arm_runtime(self, user_id: str) -> tuple[str, ArmRuntime]:
        g = self._gen  # one generation, even mid-reload
        arm = assign(g.cfg.experiment, user_id)
        return arm, g.arms[g.control] if arm == HOLDOUT else g.arms[arm]

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
        arm, rt = self._arm_runtime(user_id)
        fallback, cold, history, vec, reason, index = False, False, [], None, None, None
        t_user = None
        try:
            history, vec = await rt.batcher.submit((user_id, scenario))
            t_user = time.perf_counter()
        except Exception as e:
            reason, fallback = self._degraded(e), True
        seen = {h.item_id for h in history} if exclude_seen else set()
        if arm == HOLDOUT or vec is None or fallback:
            # holdout users get the non-personalised baseline, the reference for the arms' total lift
            cold = vec is None and not fallback
            hits = await asyncio.to_thread(self.popular, scenario, k, seen)
            version = "popularity" if arm == HOLDOUT or fallback else rt.version
        else:
            try:
                res = await asyncio.to_thread(self._search, rt, vec, scenario, k, sorted(seen))
                hits, index = res.hits, res
            except Exception as e:
                reason, fallback = self._degraded(e), True
                hits = await asyncio.to_thread(self.popular, scenario, k, seen)
            version = "popularity" if fallback else rt.version
        resp = {
            "request_id": uuid.uuid4().hex,
            "experiment": self.cfg.experiment.name,
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
        t_end = time.perf_counter()
        record = {**resp, "ts": time.time(), "latency_ms": round((t_end - t0) * 1000, 3)}
        if t_user is not None:  # where the time went: queue + Feast read + user tower, then search
            record["user_ms"] = round((t_user - t0) * 1000, 3)
            record["search_ms"] = round((t_end - t_user) * 1000, 3)
        if index is not None:
            record["index_collection"] = index.collection
        if reason:
            record["fallback_reason"] = reason
        if context:
            record["context"] = context
        if vec is not None and self.cfg.serving.log_user_embedding:
            m = vec.mean(0)
            record["user_embedding"] = [round(float(x), 5) for x in m / max(np.linalg.norm(m), 1e-12)]
        self.log.append(record)  # before returning: an acknowledged response is on the log
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
            raise NotFound(f"item_id: unknown item {item_id!r} (not in the catalogue of model {rt.version})", "item_id")
        try:
            res = await asyncio.to_thread(self._search, rt, rt.item_emb[idx - 1], scenario, k, [item_id])
        except Exception as e:
            dep = _dependency(e)
            if dep is None:
                raise
            raise Unavailable(f"{dep} unavailable: {type(e).__name__}: {str(e)[:200]}") from e
        return {"item_id": item_id, "scenario": scenario, "model_version": rt.version, "index_version": res.index_version,
                "items": [i for i, _ in res.hits], "scores": [round(float(s), 6) for _, s in res.hits]}

    async def record_events(self, events: list[dict]) -> dict:
        if not events:
            raise BadRequest("events: empty list; send at least one event", "events")
        if len(events) > self.cfg.serving.max_events_per_call:
            raise BadRequest(f"events: {len(events)} events, at most {self.cfg.serving.max_events_per_call} per call", "events")
        now = int(time.time())
        rows = []
        for n, e in enumerate(events):
            self._check_user(e["user_id"], f"events[{n}].user_id")
            if e["scenario"] not in self.scenarios:
                raise BadRequest(f"events[{n}].scenario: unknown scenario {e['scenario']!r}; use one of {self.scenarios}",
                                 f"events[{n}].scenario")
            if e["item_id"] not in self.known_items:
                raise BadRequest(f"events[{n}].item_id: unknown item {e['item_id']!r}", f"events[{n}].item_id")
            if e["action"] not in self.actions:
                raise BadRequest(f"events[{n}].action: unknown action {e['action']!r}; use one of {self.actions}",
                                 f"events[{n}].action")
            ts = int(e["ts"]) if e.get("ts") is not None else now
            rows.append({"user_id": e["user_id"], "item_id": e["item_id"], "scenario": e["scenario"],
                         "action": e["action"], "ts": ts, "request_id": e.get("request_id")})
        df = pd.DataFrame(rows)
        try:
            rep = await asyncio.to_thread(self._feast, self.repo.push_events, df[["user_id", "item_id", "scenario", "action", "ts"]])
        except Exception as e:
            dep = _dependency(e)
            if dep is None:
                raise
            late = " (a timed-out push may still land; a retry is deduplicated)" if isinstance(e, TimeoutError) else ""
            raise Unavailable(f"{dep} unavailable, events not recorded{late}: {type(e).__name__}: {str(e)[:200]}") from e
        self.feedback.append_many(rows)
        return {"accepted": len(rows), "skipped_duplicates": rep.skipped_duplicates}

    def stats(self) -> dict:
        return {name: rt.batcher.stats() for name, rt in self.arms.items()}
