"""Versioned publication of item embeddings to Milvus, with verification and an atomic alias swap.

A publication of model version V:
1. checks the input (shape/dimension, metric, duplicate ids, NaN/inf/zero vectors, items missing
   from the catalogue, scenario eligibility) and, against the server, the collection it would
   write and the one now served; any problem is refused with a message naming it, before
   anything is written;
2. creates ``<name>_v<V>`` (``item_id`` primary key, one BOOL eligibility field per scenario,
   ``vec``), marked ``building``; inserts in columnar batches; flushes; checks the row count;
3. builds the index and loads the collection;
4. verifies recall@k of the collection against exact search (numpy) on a sample of queries,
   raising ``nprobe`` until ``min_recall`` holds; also checks the returned scores equal the exact
   cosine, which catches corrupted vectors;
5. marks the collection ``ready`` and only then moves the alias ``<name>`` to it in one call
   (``alter_alias``; Milvus resolves an alias per request, so a search sees the old or the new
   version, never neither);
6. drops the oldest ready versions beyond ``keep_versions`` (never the served one).
A failure in steps 2-4 drops the new collection and raises ``PublishError`` saying which step
failed and why; the alias has not moved. Versions are immutable: re-publishing a ready version
is refused (roll back to it instead); a leftover ``building`` collection of a crashed publication
of the same version is replaced.

One publisher at a time per alias: this module does not lock; the pipeline's publish and deploy
steps and ``redrec release promote|rollback`` hold the release lease (``redrec.release.lease``)
around the swap. Searches may run concurrently.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from redrec.index.config import IndexConfig

log = logging.getLogger(__name__)

PK = "item_id"
VEC = "vec"
P_STATUS = "redrec.status"
P_VERSION = "redrec.model_version"
P_SCEN = "redrec.scenarios"
P_PUBLISHED = "redrec.published_at"
P_SEARCH = "redrec.search_params"
P_RECALL = "redrec.recall"
P_METRIC = "redrec.metric"


class IndexError_(ValueError):
    """Base class of refusals and failures of the index."""


class PublishRefused(IndexError_):
    """Bad input or an incompatible target: nothing was written, nothing served changed."""


class PublishError(IndexError_):
    """Publication failed part way: the new collection was removed, the alias did not move."""


class RollbackError(IndexError_):
    pass


@dataclass
class PublishResult:
    version: str
    collection: str
    alias: str
    previous_collection: str | None
    n_items: int
    recall: float
    search_params: dict
    index_params: dict
    seconds: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


# ---- connection ---------------------------------------------------------------------------
_clients: dict[tuple[str, str], object] = {}
_clients_lock = threading.Lock()


def client(cfg: IndexConfig):
    """A shared ``MilvusClient`` per (uri, token); gRPC channels are thread-safe."""
    from pymilvus import MilvusClient

    key = (cfg.uri, cfg.token)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            if cfg.uri.endswith(".db"):
                from pathlib import Path

                Path(cfg.uri).parent.mkdir(parents=True, exist_ok=True)
            c = MilvusClient(uri=cfg.uri, token=cfg.token or "", timeout=cfg.timeout_s)
            _clients[key] = c
        return c


def close_clients(uri: str | None = None) -> None:
    """Close cached clients (all, or those of ``uri``); a Milvus Lite file opened in this process
    is released too, so another process (or a ``LiteServer``) can open it."""
    with _clients_lock:
        keys = [k for k in _clients if uri is None or k[0] == uri]
        for k in keys:
            c = _clients.pop(k)
            try:
                c.close()
            except Exception:  # pragma: no cover - best effort
                pass
            if k[0].endswith(".db"):
                try:
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(k[0])
                except ImportError:  # pragma: no cover
                    pass


# ---- metadata -------------------------------------------------------------------------------
def scenario_field(scenario: str) -> str:
    slug = re.sub(r"[^0-9A-Za-z_]", "_", str(scenario)).strip("_").lower()
    if not slug:
        raise PublishRefused(f"scenario {scenario!r} has no usable characters for a field name")
    return f"s_{slug}"[:250]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    version: str | None
    status: str | None
    dim: int | None
    metric: str | None
    scenarios: dict  # scenario -> bool field
    search_params: dict
    published_at: float
    recall: float | None
    index_type: str | None


def _props(desc: dict) -> dict:
    p = desc.get("properties") or {}
    if isinstance(p, list):  # some server versions return key/value pairs
        p = {kv["key"]: kv["value"] for kv in p}
    return dict(p)


def describe(cfg: IndexConfig, name: str) -> CollectionInfo:
    c = client(cfg)
    desc = c.describe_collection(name)
    p = _props(desc)
    dim = None
    for f in desc.get("fields", []):
        if f.get("name") == VEC:
            dim = int((f.get("params") or {}).get("dim", 0)) or None
    index_type = None
    try:
        idx = c.describe_index(name, VEC)
        index_type = idx.get("index_type")
        metric = idx.get("metric_type") or p.get(P_METRIC)
    except Exception:
        metric = p.get(P_METRIC)
    return CollectionInfo(
        name=desc.get("collection_name", name),
        version=p.get(P_VERSION),
        status=p.get(P_STATUS),
        dim=dim,
        metric=metric,
        scenarios=json.loads(p.get(P_SCEN, "{}")),
        search_params=json.loads(p.get(P_SEARCH, "{}")),
        published_at=float(p.get(P_PUBLISHED, 0) or 0),
        recall=float(p[P_RECALL]) if P_RECALL in p else None,
        index_type=index_type,
    )


_alias_seen: dict[tuple[str, str], tuple[float, str]] = {}  # (uri, alias) -> (monotonic time, collection)


def _alias_target(cfg: IndexConfig) -> str | None:
    c = client(cfg)
    key = (cfg.uri, cfg.name)
    aliases = c.list_aliases()
    names = aliases.get("aliases", []) if isinstance(aliases, dict) else list(aliases)
    if cfg.name not in names:
        _alias_seen.pop(key, None)
        return None
    d = c.describe_alias(cfg.name)
    target = d.get("collection_name") or d.get("collection")
    _alias_seen[key] = (time.monotonic(), target)
    return target


def recent_alias_target(cfg: IndexConfig, max_age_s: float) -> str | None:
    """What ``_alias_target`` answered in this process at most ``max_age_s`` seconds ago, else
    ``None``. A swap made by this process is seen at once (publish and rollback resolve the alias
    after moving it)."""
    hit = _alias_seen.get((cfg.uri, cfg.name))
    if max_age_s > 0 and hit is not None and time.monotonic() - hit[0] < max_age_s:
        return hit[1]
    return None


def list_versions(cfg: IndexConfig) -> list[CollectionInfo]:
    """Collections of this index (``<name>_v*``), oldest publication first."""
    c = client(cfg)
    prefix = f"{cfg.name}_v"
    out = [describe(cfg, n) for n in c.list_collections() if n.startswith(prefix)]
    return sorted(out, key=lambda i: (i.published_at, i.name))


def current_collection(cfg: IndexConfig) -> str | None:
    return _alias_target(cfg)


def current_version(cfg: IndexConfig) -> str | None:
    """Model version served by the alias, or None when nothing is published."""
    target = _alias_target(cfg)
    return None if target is None else describe(cfg, target).version


# ---- validation -----------------------------------------------------------------------------
def _names(xs, n: int = 5) -> str:
    xs = [str(x) for x in xs]
    more = f" and {len(xs) - n} more" if len(xs) > n else ""
    return ", ".join(repr(x) for x in xs[:n]) + more


@dataclass(frozen=True)
class Eligibility:
    lists: list[list[str]]  # distinct scenario lists
    codes: np.ndarray  # per item, its index into ``lists``

    def scenarios(self) -> list[str]:
        return list(dict.fromkeys(s for lst in self.lists for s in lst))

    def mask(self, scenario: str) -> np.ndarray:
        return np.array([scenario in lst for lst in self.lists], dtype=bool)[self.codes]


def _check_input(cfg, model_version, item_ids, vectors, scenarios, catalogue_ids) -> tuple[list[str], np.ndarray, Eligibility]:
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", str(model_version)):
        raise PublishRefused(f"model version {model_version!r}: use 1-64 letters, digits or underscores "
                             f"(it becomes the collection name {cfg.name}_v<version>)")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise PublishRefused(f"vectors must be a 2-D array [items, dim], got shape {vectors.shape}")
    n, dim = vectors.shape
    if dim != cfg.dim:
        raise PublishRefused(f"dimension mismatch: the model's vectors have dim {dim}, the index is configured for dim {cfg.dim}")
    item_ids = [str(i) for i in item_ids]
    if n == 0:
        raise PublishRefused("no items to publish")
    if len(item_ids) != n or len(scenarios) != n:
        raise PublishRefused(f"lengths differ: {len(item_ids)} item ids, {n} vectors, {len(scenarios)} eligibility lists")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise PublishRefused(f"vectors must be floating point, got {vectors.dtype}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    empty = [i for i in item_ids if not i]
    if empty:
        raise PublishRefused(f"{len(empty)} item(s) have an empty item id")
    too_long = [i for i in item_ids if len(i) > 16383 and len(i.encode()) > 65535]  # <= 4 bytes a char
    if too_long:
        raise PublishRefused(f"item id(s) longer than 65535 bytes: {_names(i[:40] for i in too_long)}")
    uniq, counts = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_counts=True)
    if (counts > 1).any():
        d = uniq[counts > 1]
        raise PublishRefused(f"duplicate item ids ({len(d)}): {_names(d)}; each item must appear once")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise PublishRefused(f"NaN or infinite vector(s) for {int(bad.sum())} item(s): {_names(np.asarray(item_ids)[bad])}")
    if cfg.metric == "COSINE":
        zero = np.linalg.norm(vectors, axis=1) < 1e-12
        if zero.any():
            raise PublishRefused(f"zero vector(s) (no cosine) for {int(zero.sum())} item(s): {_names(np.asarray(item_ids)[zero])}")
    if catalogue_ids is not None:
        cat = set(map(str, catalogue_ids))
        missing = [i for i in item_ids if i not in cat]
        if missing:
            raise PublishRefused(f"{len(missing)} item(s) missing from the catalogue: {_names(missing)}")
    # Many items share one eligibility list: each distinct list is normalised once and items
    # carry its code (parquet gives numpy arrays, pandas lists; None means no scenario).
    patterns: dict[tuple, int] = {}
    codes = np.empty(n, dtype=np.int64)
    for j, sc in enumerate(scenarios):
        key = () if sc is None else (sc,) if isinstance(sc, str) else tuple(sc)  # a bare string is one scenario
        c = patterns.get(key)
        if c is None:
            c = patterns[key] = len(patterns)
        codes[j] = c
    lists = [list(dict.fromkeys(str(v) for v in key)) for key in patterns]
    empty_codes = [c for c, lst in enumerate(lists) if not lst]
    if empty_codes:
        no_scen = np.asarray(item_ids, dtype=object)[np.isin(codes, empty_codes)]
        raise PublishRefused(f"{len(no_scen)} item(s) are eligible in no scenario: {_names(no_scen)}")
    scen_lists = Eligibility(lists, codes)
    return item_ids, vectors, scen_lists


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def similarity(metric: str, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What Milvus reports for ``metric``, as a similarity (L2: minus the squared distance)."""
    if metric == "L2":
        return -(np.sum(q * q, 1)[:, None] - 2 * q @ x.T + np.sum(x * x, 1)[None, :])
    return q @ x.T  # COSINE (both normalised) or IP


def exact_topk(cfg: IndexConfig, queries: np.ndarray, vectors: np.ndarray, k: int, block: int = 131_072) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by blocks of items (bounded memory): (indices [Q,k], similarities [Q,k])."""
    q = queries.astype(np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(vectors), block):
        sim = similarity(cfg.metric, q, vectors[s : s + block])
        kk = min(k, sim.shape[1])
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sim, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + s], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i, best_s


def _sim_from_distance(cfg: IndexConfig, d: float) -> float:
    # pymilvus reports COSINE and IP as similarities (larger = closer) and L2 as squared distance
    return -d if cfg.metric == "L2" else d


# ---- publication ----------------------------------------------------------------------------
def _index_params(cfg: IndexConfig, n: int) -> dict:
    if n < cfg.flat_below or cfg.index_type == "FLAT":
        return {"index_type": "FLAT", "metric_type": cfg.metric, "params": {}}
    if cfg.index_type == "HNSW":
        return {"index_type": "HNSW", "metric_type": cfg.metric,
                "params": {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction}}
    if cfg.index_type == "AUTOINDEX":
        return {"index_type": "AUTOINDEX", "metric_type": cfg.metric, "params": {}}
    per_seg = min(n, cfg.segment_rows)
    # ~sqrt(rows) lists per segment, and >= 39 training points per list (faiss' k-means minimum)
    nlist = cfg.nlist or int(max(1, min(max(16, round(np.sqrt(per_seg))), per_seg // 39)))
    return {"index_type": "IVF_FLAT", "metric_type": cfg.metric, "params": {"nlist": nlist}}


def _search_ladder(cfg: IndexConfig, index: dict) -> list[dict]:
    t = index["index_type"]
    if t == "IVF_FLAT":
        nlist = index["params"]["nlist"]
        out, p = [], min(cfg.nprobe, nlist)
        while True:
            out.append({"nprobe": p})
            if p >= min(nlist, cfg.max_nprobe):
                return out
            p = min(p * 2, nlist, cfg.max_nprobe)
    if t == "HNSW":
        out, ef = [], max(cfg.hnsw_ef, cfg.verify_k)
        while ef <= 1024:
            out.append({"ef": ef})
            ef *= 2
        return out
    return [{}]


def _create(cfg: IndexConfig, name: str, version: str, scen_fields: dict, id_len: int) -> None:
    from pymilvus import DataType, MilvusClient

    c = client(cfg)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description=f"redrec item embeddings, model version {version}")
    schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=max(64, min(65535, 2 * id_len)))
    for f in scen_fields.values():
        schema.add_field(f, DataType.BOOL)
    schema.add_field(VEC, DataType.FLOAT_VECTOR, dim=cfg.dim)
    c.create_collection(name, schema=schema, consistency_level="Strong")
    c.alter_collection_properties(name, {
        P_STATUS: "building", P_VERSION: str(version), P_SCEN: json.dumps(scen_fields),
        P_PUBLISHED: repr(time.time()), P_METRIC: cfg.metric,
    })


def _insert(cfg: IndexConfig, name: str, item_ids: list[str], vectors: np.ndarray, elig: dict[str, np.ndarray]) -> None:
    """Columnar, pipelined inserts: the next batch is encoded while the server stores the last."""
    from pymilvus import DataType

    c = client(cfg)
    n = len(item_ids)
    conn = getattr(c, "_get_connection", None)
    if conn is None:  # pragma: no cover - other pymilvus versions: row inserts
        for s in range(0, n, cfg.insert_batch):
            rows = [{PK: item_ids[j], VEC: vectors[j].tolist(), **{f: bool(m[j]) for f, m in elig.items()}}
                    for j in range(s, min(n, s + cfg.insert_batch))]
            res = c.insert(name, rows)
            if int(res.get("insert_count", len(rows))) != len(rows):
                raise PublishError(f"insert into {name}: {res.get('insert_count')} of {len(rows)} rows stored")
        return
    conn = conn()
    schema = c.describe_collection(name)
    pending = None

    def wait(p):
        fut, expect = p
        res = fut.result()
        got = int(getattr(res, "insert_count", expect))
        if got != expect:
            raise PublishError(f"insert into {name}: {got} of {expect} rows stored")

    for s in range(0, n, cfg.insert_batch):
        e = min(n, s + cfg.insert_batch)
        ents = [{"name": PK, "type": DataType.VARCHAR, "values": item_ids[s:e]}]
        ents += [{"name": f, "type": DataType.BOOL, "values": m[s:e].tolist()} for f, m in elig.items()]
        ents.append({"name": VEC, "type": DataType.FLOAT_VECTOR, "values": vectors[s:e]})
        fut = conn.batch_insert(name, ents, "", schema=schema, _async=True, timeout=cfg.timeout_s)
        if pending is not None:
            wait(pending)
        pending = (fut, e - s)
    if pending is not None:
        wait(pending)


def _build_index(cfg: IndexConfig, name: str, index: dict) -> None:
    c = client(cfg)
    ip = c.prepare_index_params()
    # pymilvus 3 sends build params as flat key/values, which Milvus reads; Milvus Lite 3.2 reads
    # only the legacy JSON "params" entry (and silently builds with defaults otherwise), which
    # Milvus also still accepts: send both.
    params = dict(index["params"])
    if params:
        params["params"] = dict(index["params"])
    ip.add_index(field_name=VEC, index_type=index["index_type"], metric_type=index["metric_type"],
                 index_name=VEC, params=params)
    # sync=False and our own wait: pymilvus' wait calls AllocTimestamp, which Milvus Lite lacks
    c.create_index(name, ip, timeout=cfg.timeout_s, sync=False)
    deadline = time.monotonic() + cfg.timeout_s
    while True:
        d = c.describe_index(name, VEC)
        state = str(d.get("state", "Finished"))
        if state == "Finished" and int(d.get("pending_index_rows", 0) or 0) == 0:
            break
        if state == "Failed":
            raise PublishError(f"index build failed: {d.get('index_state_fail_reason', d)}")
        if time.monotonic() > deadline:
            raise PublishError(f"index build not finished after {cfg.timeout_s:.0f}s: {d}")
        time.sleep(0.2)
    got = d.get("params") or {k: v for k, v in d.items() if k in index["params"]}
    for k, v in index["params"].items():
        if k in got and str(got[k]) != str(v):
            raise PublishError(f"index built with {k}={got[k]}, asked for {v}")


def _search_raw(cfg: IndexConfig, name: str, queries: np.ndarray, limit: int, params: dict, flt: str = "") -> list[list[tuple[str, float]]]:
    c = client(cfg)
    out: list[list[tuple[str, float]]] = []
    for s in range(0, len(queries), 512):
        res = c.search(name, data=queries[s : s + 512].astype(np.float32), limit=limit, filter=flt,
                       output_fields=[PK], search_params={"metric_type": cfg.metric, "params": params},
                       anns_field=VEC, timeout=cfg.timeout_s)
        out.extend([(str(h.id), _sim_from_distance(cfg, float(h.distance))) for h in hits] for hits in res)
    return out


def _verify(cfg: IndexConfig, name: str, item_ids: list[str], vectors: np.ndarray, queries: np.ndarray | None,
            ladder: list[dict], rng: np.random.Generator) -> tuple[float, dict, float]:
    """Recall@k of the collection vs exact search; returns (recall, chosen params, max score error)."""
    k = min(cfg.verify_k, len(item_ids))
    if queries is None:
        idx = rng.choice(len(vectors), size=min(cfg.verify_sample, len(vectors)), replace=False)
        noise = rng.standard_normal((len(idx), vectors.shape[1])).astype(np.float32)
        q = vectors[idx] + 0.5 * noise / np.sqrt(vectors.shape[1]) * np.linalg.norm(vectors[idx], axis=1, keepdims=True)
    else:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != cfg.dim:
            raise PublishRefused(f"verify queries must have shape [n, {cfg.dim}], got {q.shape}")
        if not np.isfinite(q).all():
            raise PublishRefused("verify queries hold NaN or infinite values")
    if cfg.metric == "COSINE":
        q = _normalise(q)
    ex_i, ex_s = exact_topk(cfg, q, vectors, k)
    kth = ex_s[:, -1]
    pos = {iid: j for j, iid in enumerate(item_ids)}
    recall, params, max_err = 0.0, ladder[0], 0.0
    for params in ladder:
        got = _search_raw(cfg, name, q, k, params)
        hits, max_err = 0, 0.0
        for qi, res in enumerate(got):
            for iid, score in res:
                j = pos.get(iid)
                if j is None:
                    raise PublishError(f"verification: search returned {iid!r}, which was not published")
                true = float(similarity(cfg.metric, q[qi : qi + 1], vectors[j : j + 1])[0, 0])
                max_err = max(max_err, abs(true - score))
                hits += true >= kth[qi] - 1e-5  # ties with the k-th exact score count as hits
        recall = hits / (len(q) * k)
        if max_err > 1e-3 * max(1.0, float(np.abs(ex_s).max())):
            raise PublishError(f"verification: scores differ from exact {cfg.metric} by up to {max_err:.4g}; "
                               "stored vectors do not match the published ones")
        if recall >= cfg.min_recall:
            break
    return recall, params, max_err


def _retain(cfg: IndexConfig, keep_also: str) -> list[str]:
    """Drop ready versions beyond ``keep_versions`` (oldest first), never the served one."""
    c = client(cfg)
    served = _alias_target(cfg)
    ready = [v for v in list_versions(cfg) if v.status == "ready"]
    keep = {v.name for v in ready[-cfg.keep_versions:]} | {served, keep_also}
    dropped = []
    for v in ready:
        if v.name not in keep:
            c.drop_collection(v.name)
            dropped.append(v.name)
            log.info("dropped old index version %s", v.name)
    return dropped


def publish(
    cfg: IndexConfig,
    model_version: str,
    item_ids: list[str],
    vectors: np.ndarray,
    scenarios: list[list[str]],
    catalogue_ids: set[str] | None = None,
    *,
    verify_queries: np.ndarray | None = None,
    allow_schema_change: bool = False,
    seed: int = 0,
) -> PublishResult:
    """Publish, verify, then serve ``vectors`` as version ``model_version`` (see module doc).

    ``verify_queries``: optional [n, dim] queries for the recall check (e.g. user vectors); by
    default, perturbed item vectors. ``allow_schema_change``: permit a dimension or metric that
    differs from the version now served (its searchers must change with it).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    item_ids, vectors, scen_lists = _check_input(cfg, model_version, item_ids, vectors, scenarios, catalogue_ids)
    if cfg.metric == "COSINE":
        vectors = _normalise(vectors).astype(np.float32)
    all_scen = scen_lists.scenarios()
    scen_fields: dict[str, str] = {}
    for s in all_scen:
        f = scenario_field(s)
        clash = [o for o, fo in scen_fields.items() if fo == f]
        if clash:
            raise PublishRefused(f"scenarios {clash[0]!r} and {s!r} map to the same field {f!r}")
        scen_fields[s] = f
    elig = {f: scen_lists.mask(s) for s, f in scen_fields.items()}

    name = cfg.collection(model_version)
    c = client(cfg)
    served = _alias_target(cfg)
    if name in c.list_collections():
        info = describe(cfg, name)
        if name == served:
            raise PublishRefused(f"version {model_version} is already published and served ({name}); publish a new version")
        if info.status == "ready":
            raise PublishRefused(f"version {model_version} is already published ({name}, not served); "
                                 "versions are immutable: roll back to it or publish a new version")
        if info.dim != cfg.dim or (info.metric and info.metric != cfg.metric):
            raise PublishRefused(f"collection {name} has dim {info.dim} / metric {info.metric}; "
                                 f"the model has dim {cfg.dim} / metric {cfg.metric}")
        log.warning("dropping %s left over by an unfinished publication (status %s)", name, info.status)
        c.drop_collection(name)
    if served is not None and not allow_schema_change:
        cur = describe(cfg, served)
        if cur.dim != cfg.dim or (cur.metric and cur.metric != cfg.metric):
            raise PublishRefused(
                f"the served collection {served} has dim {cur.dim} / metric {cur.metric}, the model has dim "
                f"{cfg.dim} / metric {cfg.metric}; searchers of '{cfg.name}' would break "
                "(pass allow_schema_change=True when serving changes with it)")
    seconds["check"] = time.perf_counter() - t_start

    index = _index_params(cfg, len(item_ids))
    step = "create"
    try:
        t = time.perf_counter()
        _create(cfg, name, model_version, scen_fields, max(len(i.encode()) for i in item_ids))
        step = "insert"
        _insert(cfg, name, item_ids, vectors, elig)
        seconds["insert"] = time.perf_counter() - t
        step = "flush"
        t = time.perf_counter()
        c.flush(name)
        n_rows = int(c.get_collection_stats(name).get("row_count", -1))
        if n_rows != len(item_ids):
            raise PublishError(f"partial publication: {name} holds {n_rows} of {len(item_ids)} rows after flush")
        seconds["flush"] = time.perf_counter() - t
        step = "index"
        t = time.perf_counter()
        _build_index(cfg, name, index)
        c.load_collection(name, timeout=cfg.timeout_s)
        seconds["index"] = time.perf_counter() - t
        step = "verify"
        t = time.perf_counter()
        recall, params, _ = _verify(cfg, name, item_ids, vectors, verify_queries, _search_ladder(cfg, index),
                                    np.random.default_rng(seed))
        seconds["verify"] = time.perf_counter() - t
        if recall < cfg.min_recall:
            raise PublishError(f"recall@{cfg.verify_k} {recall:.3f} < {cfg.min_recall} against exact search "
                               f"(index {index}, best search params {params})")
        c.alter_collection_properties(name, {P_STATUS: "ready", P_SEARCH: json.dumps(params), P_RECALL: f"{recall:.4f}"})
    except PublishRefused:
        _drop_quietly(cfg, name)
        raise
    except Exception as e:
        _drop_quietly(cfg, name)
        msg = str(e) if isinstance(e, PublishError) else f"{type(e).__name__}: {e}"
        raise PublishError(f"publication of {name} failed at step '{step}': {msg}; "
                           f"'{cfg.name}' still serves {served or 'nothing'}") from e

    t = time.perf_counter()
    if served is None:
        c.create_alias(name, cfg.name)
    else:
        c.alter_alias(name, cfg.name)
    now = _alias_target(cfg)
    if now != name:  # pragma: no cover - the server did not apply the swap
        raise PublishError(f"alias '{cfg.name}' points at {now} after the swap to {name}")
    seconds["swap"] = time.perf_counter() - t
    dropped = _retain(cfg, keep_also=name)
    seconds["total"] = time.perf_counter() - t_start
    return PublishResult(
        version=str(model_version), collection=name, alias=cfg.name, previous_collection=served, n_items=len(item_ids),
        recall=float(recall), search_params=params, index_params=index, seconds=seconds, dropped=dropped,
    )


def _drop_quietly(cfg: IndexConfig, name: str) -> None:
    try:
        c = client(cfg)
        if name in c.list_collections() and name != _alias_target(cfg):
            c.drop_collection(name)
    except Exception as e:  # pragma: no cover - report, the original error matters more
        log.error("could not drop the failed collection %s: %s", name, e)


def rollback(cfg: IndexConfig) -> tuple[str, str]:
    """Serve the ready version published just before the served one; returns (from, to) versions."""
    c = client(cfg)
    served = _alias_target(cfg)
    if served is None:
        raise RollbackError(f"nothing is published under '{cfg.name}'")
    versions = [v for v in list_versions(cfg) if v.status == "ready"]
    names = [v.name for v in versions]
    if served not in names:
        raise RollbackError(f"'{cfg.name}' serves {served}, which is not a ready version of this index")
    i = names.index(served)
    if i == 0:
        raise RollbackError(f"no version older than {served} is kept (keep_versions={cfg.keep_versions})")
    prev = versions[i - 1]
    c.alter_alias(prev.name, cfg.name)
    _alias_target(cfg)  # refresh this process' view of the alias
    return versions[i].version or served, prev.version or prev.name
