"""Serving-side retrieval: the top-k eligible items for a user's K query vectors in a scenario."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from redrec.index import exact
from redrec.index.config import IndexConfig
from redrec.index.milvus import PK, CollectionInfo, _alias_target, _search_raw, client, describe, recent_alias_target

log = logging.getLogger(__name__)
_RETRIES = 2
_info_cache: dict[tuple[str, str], CollectionInfo] = {}
_info_lock = threading.Lock()
# the search calls of one batch run side by side: Milvus serves them in parallel, a round trip each
_calls = ThreadPoolExecutor(8, thread_name_prefix="redrec-search")


class NotPublished(LookupError):
    pass


def collection_info(cfg: IndexConfig, collection: str) -> CollectionInfo:
    """The collection's description; a published version is immutable, so a ready one's is cached
    by (uri, collection)."""
    key = (cfg.uri, collection)
    with _info_lock:
        hit = _info_cache.get(key)
    if hit is None:
        hit = describe(cfg, collection)
        if hit.status == "ready":
            with _info_lock:
                _info_cache[key] = hit
    return hit


def forget_collection(cfg: IndexConfig, collection: str) -> None:
    """Describe ``collection`` afresh on its next search."""
    with _info_lock:
        _info_cache.pop((cfg.uri, collection), None)


def search(
    cfg: IndexConfig,
    query_vectors: np.ndarray,
    scenario: str,
    k: int,
    exclude_ids: list[str] | None = None,
) -> list[tuple[str, float]]:
    """Items eligible in ``scenario``, ranked by the MAX similarity over the K query vectors,
    without ``exclude_ids``; at most ``k`` pairs ``(item_id, score)``, best first.

    The alias is resolved (or its resolution of at most ``cfg.alias_ttl_s`` ago reused) once per
    call and that version is searched, so a concurrent swap makes a call see the old or the new
    version whole; should that version be dropped meanwhile (the retention step of the swap that
    replaced it), the alias is resolved again. Exclusions are handled by over-fetching
    ``k + len(exclude_ids)`` per query vector (exact for the max-merge: an item of the final top-k
    is within that rank for the query that scores it best); beyond the server's top-k limit they
    go into the filter expression instead, as do more than ``cfg.overfetch_max_exclusions`` of them
    (each over-fetched hit costs the server a row; a filter on the primary key is cheaper).
    """
    q = Query(query_vectors, scenario, k, exclude_ids or ())
    return _resolve_and_search(cfg, lambda alias_target: alias_target, lambda t: _search_version(cfg, t, [q]))[0][0]


@dataclass(frozen=True)
class Query:
    """One request's search: its [K, dim] query vectors, the scenario, k and the ids to leave out."""

    vectors: np.ndarray
    scenario: str
    k: int
    exclude: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "vectors", _queries(self.vectors))
        object.__setattr__(self, "exclude", frozenset(map(str, self.exclude)))


def _queries(query_vectors) -> np.ndarray:
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"query_vectors must be [K, dim] with K >= 1, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("query vectors hold NaN or infinite values")
    return q


@dataclass
class PairedHits:
    hits: list[tuple[str, float]]
    collection: str  # the collection searched
    index_version: str  # the model version that collection records it was built from
    alias_target: str | None  # what the alias named; differs from ``collection`` on a mismatched pair


class PairMismatch(NotPublished):
    """No collection of the index was built from the model asking: it cannot be served safely."""


def paired_collection(cfg: IndexConfig, alias_target: str | None, model_version: str) -> str:
    """The collection a model of ``model_version`` may search: the alias' target when that
    collection records the same model version, else the model's own collection (the pair it was
    published with) while it is kept. Never a collection built from another model: its vectors
    live in another embedding space (same dimension, no error, wrong recommendations)."""
    if alias_target is not None and collection_info(cfg, alias_target).version == str(model_version):
        return alias_target
    own = cfg.collection(str(model_version))
    with _info_lock:
        known = (cfg.uri, own) in _info_cache
    info = collection_info(cfg, own) if known or client(cfg).has_collection(own) else None
    if info is None or info.status != "ready" or info.version != str(model_version):
        raise PairMismatch(f"alias '{cfg.name}' serves {alias_target} (model {_version_of(cfg, alias_target)}) and no "
                           f"ready collection built from model {model_version} is kept: publish model {model_version}'s "
                           "index or point this arm at the alias' model version")
    return own


def _version_of(cfg: IndexConfig, collection: str | None) -> str | None:
    try:
        return None if collection is None else collection_info(cfg, collection).version
    except Exception:  # noqa: BLE001 - only used in a message
        return None


def search_paired(cfg: IndexConfig, model_version: str, query_vectors: np.ndarray, scenario: str, k: int,
                  exclude_ids: list[str] | None = None) -> PairedHits:
    """``search`` for a model: only ever a collection built from ``model_version`` is searched
    (``paired_collection``), and the answer says which one."""
    return search_paired_many(cfg, model_version, [Query(query_vectors, scenario, k, exclude_ids or ())])[0]


def search_paired_many(cfg: IndexConfig, model_version: str, queries: list[Query]) -> list[PairedHits]:
    """``search_paired`` for many requests at once (a serving micro-batch): one alias resolution
    and, per scenario, ONE Milvus search holding every request's query vectors (nq = their sum),
    split back per request. All requests see the same collection."""
    hits, target, alias_target = _resolve_and_search(
        cfg, lambda t: paired_collection(cfg, t, model_version), lambda t: _search_version(cfg, t, queries),
        allow_unpublished=True)
    # read back from the collection itself, not echoed from the request: the caller checks the pair
    version = str(collection_info(cfg, target).version)
    return [PairedHits(h, target, version, alias_target) for h in hits]


def _resolve_and_search(cfg, pick, run, allow_unpublished: bool = False):
    # A swap may move the alias, and retention drop the old version, between resolving the alias
    # and searching the version it named: then the search fails on a collection that is gone.
    # Re-resolve and retry; an error with the alias unchanged is a real one.
    target = None
    for attempt in range(_RETRIES + 1):
        # the first attempt may use the alias as resolved up to cfg.alias_ttl_s ago; a retry
        # resolves it afresh
        resolved = (recent_alias_target(cfg, cfg.alias_ttl_s) if attempt == 0 else None) or _alias_target(cfg)
        if resolved is None and not allow_unpublished:
            raise NotPublished(f"no index is published under '{cfg.name}' at {cfg.uri}")
        chosen = pick(resolved)
        if chosen == target:
            raise last_error
        target = chosen
        try:
            return run(target), target, resolved
        except (ValueError, NotPublished):
            raise
        except Exception as e:  # noqa: BLE001 - retried only when the alias moved meanwhile
            last_error = e
            log.info("search on %s failed (%s); re-resolving alias '%s'", target, e, cfg.name)
            with _info_lock:
                _info_cache.pop((cfg.uri, target), None)
    raise last_error


def _search_version(cfg: IndexConfig, target: str, queries: list[Query]) -> list[list[tuple[str, float]]]:
    """Hits per query. A collection copied into this process (``exact.copy_of``) is searched here,
    exactly, one matrix product per scenario. Otherwise requests of one scenario share one search call: each over-fetches
    ``k + len(exclude)`` per query vector (the call fetches the largest of those for all; more
    hits never change a request's top-k). A request whose exclusions exceed
    ``cfg.overfetch_max_exclusions`` or the server's top-k limit is searched alone with its
    exclusions in the filter instead (a filter on the primary key is cheaper than that many hits)."""
    info = collection_info(cfg, target)
    metric = info.metric or cfg.metric
    scfg = cfg if metric == cfg.metric else cfg.model_copy(update={"metric": metric})
    params = info.search_params or {}
    out: list[list[tuple[str, float]] | None] = [None] * len(queries)
    for q in queries:
        if info.dim is not None and q.vectors.shape[1] != info.dim:
            raise ValueError(f"query vectors have dim {q.vectors.shape[1]}, the served index {target} has dim {info.dim}")
        if q.scenario not in info.scenarios:
            raise ValueError(f"scenario {q.scenario!r} has no eligible items in {target}; it knows {sorted(info.scenarios)}")
    copy = exact.copy_of(cfg, info)
    if copy is not None:
        for scenario, members in _by_scenario(queries).items():
            got = copy.search([_normalised(queries[n].vectors, metric) for n in members], info.scenarios[scenario],
                              [queries[n].k for n in members], [queries[n].exclude for n in members])
            for n, hits in zip(members, got):
                out[n] = hits
        return out
    shared: dict[str, list[int]] = {}
    alone: dict[int, str] = {}
    for n, q in enumerate(queries):
        field = info.scenarios[q.scenario]
        if q.k <= 0:
            out[n] = []
        elif q.exclude and (len(q.exclude) > cfg.overfetch_max_exclusions or q.k + len(q.exclude) > cfg.max_topk):
            # a JSON list of strings is a Milvus list literal; non-ASCII ids stay as they are
            # (Milvus' expression parser has no \u escapes)
            alone[n] = f"{field} == true and {PK} not in {json.dumps(sorted(q.exclude), ensure_ascii=False)}"
        else:
            shared.setdefault(q.scenario, []).append(n)
    calls = {n: _calls.submit(_search_raw, scfg, target, _normalised(queries[n].vectors, metric), queries[n].k, params, flt)
             for n, flt in alone.items()}
    for scenario, members in shared.items():
        stacked = _normalised(np.concatenate([queries[n].vectors for n in members]), metric)
        limit = min(max(queries[n].k + len(queries[n].exclude) for n in members), cfg.max_topk)
        calls[scenario] = _calls.submit(_search_raw, scfg, target, stacked, limit, params, f"{info.scenarios[scenario]} == true")
    for n in alone:
        out[n] = _best(calls[n].result(), queries[n])
    for scenario, members in shared.items():
        rows = calls[scenario].result()
        at = 0
        for n in members:
            kq = len(queries[n].vectors)
            out[n] = _best(rows[at : at + kq], queries[n])
            at += kq
    return out


def _by_scenario(queries: list[Query]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for n, q in enumerate(queries):
        groups.setdefault(q.scenario, []).append(n)
    return groups


def _normalised(q: np.ndarray, metric: str) -> np.ndarray:
    return q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12) if metric == "COSINE" else q


def _best(rows: list[list[tuple[str, float]]], q: Query) -> list[tuple[str, float]]:
    """The MAX over the query's K vectors per item, exclusions dropped, best ``q.k`` first."""
    best: dict[str, float] = {}
    for hits in rows:
        for iid, score in hits:
            if iid not in q.exclude and score > best.get(iid, -np.inf):
                best[iid] = score
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[: q.k]
