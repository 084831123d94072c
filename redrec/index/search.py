"""Serving-side retrieval: the top-k eligible items for a user's K query vectors in a scenario."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import numpy as np

from redrec.index.config import IndexConfig
from redrec.index.milvus import PK, CollectionInfo, _alias_target, _search_raw, client, describe, recent_alias_target

log = logging.getLogger(__name__)
_RETRIES = 2
_info_cache: dict[tuple[str, str], CollectionInfo] = {}
_info_lock = threading.Lock()


class NotPublished(LookupError):
    pass


def _info(cfg: IndexConfig, collection: str) -> CollectionInfo:
    # a published version is immutable, so its description is cached by (uri, collection)
    key = (cfg.uri, collection)
    with _info_lock:
        hit = _info_cache.get(key)
    if hit is None:
        hit = describe(cfg, collection)
        if hit.status == "ready":
            with _info_lock:
                _info_cache[key] = hit
    return hit


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
    if k <= 0:
        return []
    return _resolve_and_search(cfg, lambda alias_target: alias_target, _queries(query_vectors), scenario, k,
                               set(map(str, exclude_ids or ())))[0]


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
    if alias_target is not None and _info(cfg, alias_target).version == str(model_version):
        return alias_target
    own = cfg.collection(str(model_version))
    with _info_lock:
        known = (cfg.uri, own) in _info_cache
    info = _info(cfg, own) if known or client(cfg).has_collection(own) else None
    if info is None or info.status != "ready" or info.version != str(model_version):
        raise PairMismatch(f"alias '{cfg.name}' serves {alias_target} (model {_version_of(cfg, alias_target)}) and no "
                           f"ready collection built from model {model_version} is kept: publish model {model_version}'s "
                           "index or point this arm at the alias' model version")
    return own


def _version_of(cfg: IndexConfig, collection: str | None) -> str | None:
    try:
        return None if collection is None else _info(cfg, collection).version
    except Exception:  # noqa: BLE001 - only used in a message
        return None


def search_paired(cfg: IndexConfig, model_version: str, query_vectors: np.ndarray, scenario: str, k: int,
                  exclude_ids: list[str] | None = None) -> PairedHits:
    """``search`` for a model: only ever a collection built from ``model_version`` is searched
    (``paired_collection``), and the answer says which one."""
    hits, target, alias_target = _resolve_and_search(
        cfg, lambda t: paired_collection(cfg, t, model_version), _queries(query_vectors), scenario, k,
        set(map(str, exclude_ids or ())), allow_unpublished=True)
    # read back from the collection itself, not echoed from the request: the caller checks the pair
    return PairedHits(hits, target, str(_info(cfg, target).version), alias_target)


def _resolve_and_search(cfg, pick, q, scenario, k, exclude, allow_unpublished: bool = False):
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
            return _search_version(cfg, target, q, scenario, k, exclude), target, resolved
        except (ValueError, NotPublished):
            raise
        except Exception as e:  # noqa: BLE001 - retried only when the alias moved meanwhile
            last_error = e
            log.info("search on %s failed (%s); re-resolving alias '%s'", target, e, cfg.name)
            with _info_lock:
                _info_cache.pop((cfg.uri, target), None)
    raise last_error


def _search_version(cfg: IndexConfig, target: str, q: np.ndarray, scenario: str, k: int, exclude: set[str]) -> list[tuple[str, float]]:
    info = _info(cfg, target)
    if info.dim is not None and q.shape[1] != info.dim:
        raise ValueError(f"query vectors have dim {q.shape[1]}, the served index {target} has dim {info.dim}")
    field = info.scenarios.get(scenario)
    if field is None:
        raise ValueError(f"scenario {scenario!r} has no eligible items in {target}; it knows {sorted(info.scenarios)}")
    metric = info.metric or cfg.metric
    if metric == "COSINE":
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    flt = f"{field} == true"
    limit = k + len(exclude)
    if exclude and (len(exclude) > cfg.overfetch_max_exclusions or limit > cfg.max_topk):
        # a JSON list of strings is a Milvus list literal; non-ASCII ids stay as they are
        # (Milvus' expression parser has no \u escapes)
        flt += f" and {PK} not in {json.dumps(sorted(exclude), ensure_ascii=False)}"
        limit = k
    params = info.search_params or {}
    scfg = cfg if metric == cfg.metric else cfg.model_copy(update={"metric": metric})
    best: dict[str, float] = {}
    for hits in _search_raw(scfg, target, q, min(limit, cfg.max_topk), params, flt):
        for iid, score in hits:
            if iid in exclude:
                continue
            if score > best.get(iid, -np.inf):
                best[iid] = score
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
