"""Exact search in this process over a copy of a published collection, for small catalogues.

Milvus stays the index of record: publication writes, verifies and aliases collections there, and
serving resolves the alias there. But for a catalogue of a few thousand items a Milvus round trip
costs far more than the search itself (ML-1M, 3.7k items, 2 cores: the search stage took a p50 of
10 ms alone and 865 ms at 100 clients through Milvus Lite, against well under 1 ms for the dot
product in process; bench/results/serving.json). A published version is written whole and
marked ready before the alias may name it, and afterwards only grows by onboarded items, whose
arrival serving learns from the model store (``redrec.serving.added_items`` then drops the copy):
so its rows read once ARE that collection until then. Collections of at most
``IndexConfig.exact_max_items`` rows are read once, in the background on first use, and then
searched here, exactly (no recall loss at all).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from redrec.index.config import IndexConfig
from redrec.index.milvus import PK, VEC, CollectionInfo, client, similarity

log = logging.getLogger(__name__)
_KEEP = 8  # copies kept: every arm's current collection plus the ones a swap just replaced
# query rows x items scored at once: bounds the score matrix (16 MB of float32) for big batches
_BLOCK = 4_000_000


@dataclass
class ExactCopy:
    """A collection's rows, in the order they were read."""

    collection: str
    version: str | None
    metric: str
    ids: np.ndarray  # [N] item ids (str objects)
    vectors: np.ndarray  # [N, dim] float32, as stored (L2-normalised for COSINE)
    eligible: dict[str, np.ndarray]  # scenario's bool field -> [N] mask
    row: dict[str, int] = field(repr=False)  # item id -> row
    seconds: float = 0.0  # how long reading it took

    def search(self, vectors: list[np.ndarray], field_name: str, ks: list[int],
               excludes: list[frozenset[str]]) -> list[list[tuple[str, float]]]:
        """Per request (its [K, dim] query vectors, already normalised for COSINE): the items of
        ``field_name`` ranked by the MAX similarity over its K vectors, its exclusions left out,
        best ``k`` first; ties by item id, as the Milvus path orders them."""
        mask = self.eligible[field_name]
        out: list[list[tuple[str, float]]] = []
        n = 0
        while n < len(vectors):
            # one matmul for as many requests as fit the block
            m, rows = n, 0
            while m < len(vectors) and (m == n or (rows + len(vectors[m])) * len(self.ids) <= _BLOCK):
                rows += len(vectors[m])
                m += 1
            sim = similarity(self.metric, np.concatenate(vectors[n:m]), self.vectors)
            sim[:, ~mask] = -np.inf
            at = 0
            for j in range(n, m):
                kq = len(vectors[j])
                best = sim[at : at + kq].max(axis=0)
                at += kq
                out.append(self._top(best, ks[j], excludes[j]))
            n = m
        return out

    def _top(self, best: np.ndarray, k: int, exclude: frozenset[str]) -> list[tuple[str, float]]:
        rows = [self.row[i] for i in exclude if i in self.row]
        if rows:
            best = best.copy()
            best[rows] = -np.inf
        k = min(k, len(best))
        if k <= 0:
            return []
        part = np.argpartition(-best, k - 1)[:k]
        hits = [(str(self.ids[r]), float(best[r])) for r in part if np.isfinite(best[r])]
        return sorted(hits, key=lambda kv: (-kv[1], kv[0]))


# by (uri, collection, published at): a collection dropped and published again under its name is new
_copies: OrderedDict[tuple[str, str, float], ExactCopy | None] = OrderedDict()  # None: too large to copy
_loading: set[tuple[str, str, float]] = set()
_failed: dict[tuple[str, str, float], float] = {}  # when reading it last failed: retried after _RETRY_S
_RETRY_S = 30.0
_lock = threading.Lock()
_loader = ThreadPoolExecutor(1, thread_name_prefix="redrec-exact-copy")


def copy_of(cfg: IndexConfig, info: CollectionInfo) -> ExactCopy | None:
    """The copy of a ready collection, or None: copying is off (``exact_max_items`` 0), the
    collection has more rows than that, or its copy is still being read (started here, in the
    background, on the first call; until then the caller searches Milvus)."""
    if cfg.exact_max_items <= 0 or info.status != "ready":
        return None
    key = (cfg.uri, info.name, info.published_at)
    with _lock:
        if key in _copies:
            _copies.move_to_end(key)
            return _copies[key]
        # a failing read (Milvus busy, an old server without query iterators) is not retried per search
        if key in _loading or (key in _failed and time.monotonic() - _failed[key] < _RETRY_S):
            return None
        _loading.add(key)
    _loader.submit(_load_logged, cfg, info)
    return None


def loaded(cfg: IndexConfig, version: str) -> bool:
    """Whether a copy of a collection of this index built from model ``version`` is held."""
    with _lock:
        return any(c is not None and k[0] == cfg.uri and c.version == str(version) and
                   k[1].startswith(f"{cfg.name}_v") for k, c in _copies.items())


def load(cfg: IndexConfig, info: CollectionInfo) -> ExactCopy | None:
    """Read the collection's rows now (``copy_of`` does this in the background) and keep the copy;
    None when it has more than ``cfg.exact_max_items`` rows."""
    key = (cfg.uri, info.name, info.published_at)
    try:
        try:
            copy = _read(cfg, info)
        except Exception:
            with _lock:
                _failed[key] = time.monotonic()
            raise
        with _lock:
            _failed.pop(key, None)
            _copies[key] = copy
            _copies.move_to_end(key)
            while len(_copies) > _KEEP:
                _copies.popitem(last=False)
        return copy
    finally:
        with _lock:
            _loading.discard(key)


def _load_logged(cfg: IndexConfig, info: CollectionInfo) -> None:
    try:
        copy = load(cfg, info)
    except Exception as e:  # noqa: BLE001 - Milvus keeps answering the searches; the next call retries
        log.warning("reading collection %s for in-process search failed (searching Milvus, retrying in %gs): %s",
                    info.name, _RETRY_S, e)
        return
    if copy is not None:
        log.info("collection %s: %d items copied in %.2fs, searched in process from now on", info.name,
                 len(copy.ids), copy.seconds)


def _read(cfg: IndexConfig, info: CollectionInfo) -> ExactCopy | None:
    t0 = time.perf_counter()
    c = client(cfg)
    n = int(c.get_collection_stats(info.name, timeout=cfg.timeout_s).get("row_count", -1))
    if n > cfg.exact_max_items:
        log.info("collection %s has %d items, more than index exact_max_items %d: searched in Milvus", info.name, n,
                 cfg.exact_max_items)
        return None
    fields = sorted(set(info.scenarios.values()))
    it = c.query_iterator(info.name, batch_size=4096, output_fields=[PK, VEC, *fields], timeout=cfg.timeout_s)
    rows: list[dict] = []
    try:
        while batch := it.next():
            rows.extend(batch)
            if len(rows) > cfg.exact_max_items:  # grown past the stats (a collection still being written?)
                return None
    finally:
        it.close()
    ids = np.array([str(r[PK]) for r in rows], dtype=object)
    dim = info.dim or (len(rows[0][VEC]) if rows else cfg.dim)
    vectors = np.asarray([r[VEC] for r in rows], dtype=np.float32).reshape(len(rows), dim)
    eligible = {f: np.fromiter((bool(r.get(f)) for r in rows), dtype=bool, count=len(rows)) for f in fields}
    return ExactCopy(info.name, info.version, info.metric or cfg.metric, ids, vectors, eligible,
                     {i: j for j, i in enumerate(ids)}, round(time.perf_counter() - t0, 3))


def forget_collection(uri: str, collection: str) -> None:
    """Drop the copy of one collection (items were added to it): the next search reads it again."""
    with _lock:
        for k in [k for k in _copies if k[0] == uri and k[1] == collection]:
            del _copies[k]


def forget(uri: str | None = None) -> None:
    """Drop the copies (of ``uri``, or all)."""
    with _lock:
        for k in [k for k in _copies if uri is None or k[0] == uri]:
            del _copies[k]
        for k in [k for k in _failed if uri is None or k[0] == uri]:
            del _failed[k]
