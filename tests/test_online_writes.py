"""Online writes that cannot go backwards, against a real redis-server (Feast's Redis online store,
which skips a write whose row timestamp is <= the stored one) and the embedded SQLite store."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import yaml

from redrec.data.synthetic import SyntheticConfig, generate
from redrec.features import FeatureRepo, HistoryEvent
from services_util import readme_event_log_acl
from test_features import redis_server  # noqa: F401  (a fixture)

SEQ_LEN = 8


@pytest.fixture(scope="module")
def data():
    return generate(SyntheticConfig(n_users=30, n_items=60, events_per_user=10, seed=5))


def redis_repo(root, port: int, data, seq_len=SEQ_LEN) -> FeatureRepo:
    """The production online store (Redis) with a file registry: nothing else differs from the
    cluster's feature_repo/k8s/feature_store.redis.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    fs = root / "feature_store.yaml"
    fs.write_text(yaml.safe_dump({
        "project": "redrec", "provider": "local",
        "registry": {"registry_type": "file", "path": str(root / "registry.db"), "cache_ttl_seconds": 60},
        "online_store": {"type": "redis", "redis_type": "redis", "connection_string": f"127.0.0.1:{port}"},
        "offline_store": {"type": "duckdb"}, "entity_key_serialization_version": 3}))
    r = FeatureRepo(root, fs_yaml=fs, seq_len=seq_len)
    r.build_sources(data)
    r.apply()
    return r


def sqlite_repo(root, data, seq_len=SEQ_LEN) -> FeatureRepo:
    r = FeatureRepo(root, seq_len=seq_len)
    r.build_sources(data)
    r.apply()
    return r


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path, data, redis_server):
    if request.param == "redis":
        redis_server.client.flushall()
        return redis_repo(tmp_path / "feast", redis_server.port, data)
    return sqlite_repo(tmp_path / "feast", data)


def one(user, item, ts, action="click", scenario="homefeed") -> pd.DataFrame:
    return pd.DataFrame({"user_id": [user], "item_id": [item], "scenario": [scenario], "action": [action], "ts": [ts]})


def test_every_accepted_event_lands_whatever_its_ts_order(store, data):
    """Feast 0.67's Redis store skips a row whose timestamp is <= the stored one. Stamping a window
    with its newest event time lost a late event and a second push within the same second; the
    row timestamps are now monotonic per key, so each push lands, in time order."""
    items = data.items["item_id"].tolist()
    now = int(time.time())
    u = "u-writes"
    pop0 = store.online_popularity(items[:4])
    store.push_events(one(u, items[0], now))
    store.push_events(one(u, items[1], now))  # same second
    store.push_events(one(u, items[2], now - 100))  # late
    store.push_events(one(u, items[3], now + 1))
    assert store.online_history(u) == [HistoryEvent(items[2], "homefeed", "click", now - 100),
                                       HistoryEvent(items[0], "homefeed", "click", now),
                                       HistoryEvent(items[1], "homefeed", "click", now),
                                       HistoryEvent(items[3], "homefeed", "click", now + 1)]
    # popularity is pushed per item with the newest event time as well: every count lands
    store.push_events(one("u-other", items[0], now - 50))
    store.push_events(one("u-third", items[0], now - 50, scenario="search"))
    pop = store.online_popularity(items[:4])
    assert {i: pop[i] - pop0[i] for i in items[:4]} == {items[0]: 3, items[1]: 1, items[2]: 1, items[3]: 1}


def test_a_ts_beyond_the_allowed_skew_is_refused_and_freezes_nothing(store, data):
    """One event far in the future used to stamp the row so late that no later write landed (and
    a ts after 2262 raised pandas' OutOfBoundsDatetime). It is refused, naming ts."""
    items = data.items["item_id"].tolist()
    now = int(time.time())
    for ts in (now + 10 * 365 * 86400, 7_258_118_400, 253402300799):  # 10 years ahead, year 2200, year 9999
        with pytest.raises(ValueError, match=r"\bts\b.*future"):
            store.push_events(one("u-future", items[0], ts))
    assert store.online_history("u-future") == []
    store.push_events(one("u-future", items[1], now + 60))  # within the skew: accepted
    store.push_events(one("u-future", items[2], now))
    assert [h.item_id for h in store.online_history("u-future")] == [items[2], items[1]]


def test_the_event_log_applies_in_order_once_and_survives_a_worker_that_died(tmp_path, data, redis_server):
    """RedisStreamLog + IngestWorker in process (the multi-process run is in test_serving.py): a
    worker that read and counted a batch and died before its online write leaves it pending; the
    next worker takes the partition, re-applies it, and nothing is counted twice."""
    from redrec.features.eventlog import EventLogConfig, RedisStreamLog
    from redrec.features.ingest import IngestWorker

    redis_server.client.flushall()
    repo = sqlite_repo(tmp_path / "feast", data)
    cfg = EventLogConfig(log="redis", redis_url=f"redis://127.0.0.1:{redis_server.port}/0", partitions=2,
                         lease_ttl_s=0.5, block_ms=10, popularity_copy_s=0)
    items = data.items["item_id"].tolist()
    now = int(time.time())
    ev = pd.DataFrame({"user_id": ["a", "b", "a", "a", "b", "a"], "item_id": [items[i] for i in (0, 1, 2, 3, 1, 0)],
                       "scenario": "homefeed", "action": "click", "ts": [now, now, now, now - 60, now, now]})
    pop0 = repo.online_popularity(items[:4])
    log = RedisStreamLog(cfg)
    log.append(ev.iloc[:3])
    class DiesAtTheWrite:
        """The fault: the worker counts the batch's popularity, then dies before its online write."""

        def __init__(self, repo):
            self.repo = repo

        def __getattr__(self, name):
            return getattr(self.repo, name)

        def write_windows(self, update):
            raise RuntimeError("killed before the online write")

    dead = IngestWorker(cfg, DiesAtTheWrite(repo), "dead")
    with pytest.raises(RuntimeError, match="killed"):
        for _ in range(5):
            dead.step()
    assert sum(int(v) for v in redis_server.client.hvals(cfg.key("pop:counts"))) == 3  # counted, never written
    log.append(ev.iloc[3:])
    live = IngestWorker(cfg, repo, "live")
    time.sleep(0.6)  # the dead worker's leases expire
    for _ in range(20):
        live.step()
    assert sorted(live.owned) == [0, 1]
    assert [(h.item_id, h.ts) for h in repo.online_history("a")] == [(items[3], now - 60), (items[0], now), (items[2], now)]
    assert [(h.item_id, h.ts) for h in repo.online_history("b")] == [(items[1], now)]
    pop = repo.online_popularity(items[:4])
    assert {i: pop[i] - pop0[i] for i in items[:4]} == {items[0]: 1, items[1]: 1, items[2]: 1, items[3]: 1}
    assert live.stats.duplicates == 2 and live.stats.applied == 6
    assert sum(redis_server.client.xlen(cfg.stream(p)) for p in range(2)) == 0  # applied entries are trimmed


def test_the_readme_acl_user_can_append_and_ingest_and_nothing_else(tmp_path, data, redis_server):
    """The least-privilege Redis user the README gives the operator, as written: serving's append
    and a worker's whole cycle work under it; keys outside the log's prefix are refused."""
    import redis as redis_py

    from redrec.features.eventlog import EventLogConfig, RedisStreamLog
    from redrec.features.ingest import IngestWorker

    words = readme_event_log_acl("s3cret")
    assert {"reset", "on", "~redrec:events:*"} <= set(words) and not any(w in ("allkeys", "+@all", "~*") for w in words)
    admin = redis_server.client
    admin.flushall()
    admin.execute_command(*words)
    repo = sqlite_repo(tmp_path / "feast", data)
    cfg = EventLogConfig(log="redis", redis_url=f"redis://127.0.0.1:{redis_server.port}/0", redis_username="redrec-events",
                         redis_password="s3cret", partitions=2, block_ms=10, popularity_copy_s=0)
    items = data.items["item_id"].tolist()
    now = int(time.time())
    RedisStreamLog(cfg).append(pd.DataFrame({"user_id": ["acl-a", "acl-a"], "item_id": items[:2], "scenario": "search",
                                             "action": "click", "ts": [now, now - 5]}))
    worker = IngestWorker(cfg, repo, "acl")
    for _ in range(5):
        worker.step()
    assert worker.stats.applied == 2 and worker.stats.errors == 0
    assert [h.item_id for h in repo.online_history("acl-a")] == [items[1], items[0]]
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        cfg.client().set("feast-online-key", "x")
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        cfg.client().flushall()
    admin.execute_command("ACL", "DELUSER", "redrec-events")
