"""Feast for real: apply (CLI and library), materialise, historical join, online read, push."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import feast  # noqa: E402,F401  (the platform extra is part of make test)

from redrec.data.synthetic import SyntheticConfig, generate  # noqa: E402
from redrec.features import DuplicateEntityRowsError, FeatureRepo, HistoryEvent  # noqa: E402
from redrec.features.sources import sequence_table  # noqa: E402
from services_util import Postgres, Redis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 6


@pytest.fixture(scope="module")
def data():
    return generate(SyntheticConfig(n_users=120, n_items=200, events_per_user=25, seed=3))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, data):
    r = FeatureRepo(tmp_path_factory.mktemp("feast") / "data", seq_len=SEQ_LEN)
    r.build_sources(data)
    r.apply()
    r.materialize()
    return r


def naive_history(events: pd.DataFrame, user: str, before_ts: int | None, scenarios, seq_len=SEQ_LEN, inclusive=False):
    """Reference: per scenario, the last seq_len events (ts < t, or <= t) merged by time."""
    ev = events[events["user_id"] == user]
    if before_ts is not None:
        ev = ev[ev["ts"] <= before_ts] if inclusive else ev[ev["ts"] < before_ts]
    rows = []
    for j, s in enumerate(scenarios):
        es = ev[ev["scenario"] == s].tail(seq_len)
        rows += [(int(t), j, p, i, s, a) for p, (i, a, t) in enumerate(zip(es["item_id"], es["action"], es["ts"]))]
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return [HistoryEvent(r[3], r[4], r[5], r[0]) for r in rows]


def test_materialize_keeps_every_event_of_the_last_second_and_stops_at_end(tmp_path, data):
    """The online window is the user's last events, also when several share their last second
    (MovieLens logs bursts): Feast's own materialize keeps an arbitrary one of the same-second
    rows, whose window can lack the others. ``end`` excludes what happened at or after it."""
    import dataclasses
    from datetime import datetime, timezone

    ev = data.events.copy()
    u = ev["user_id"].iloc[0]
    mine = ev.index[(ev["user_id"] == u) & (ev["scenario"] == "homefeed")]
    ev.loc[mine[-3:], "ts"] = int(ev.loc[mine[-3], "ts"])  # the last three in one second
    ev = ev.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    r = FeatureRepo(tmp_path / "data", seq_len=SEQ_LEN)
    r.build_sources(dataclasses.replace(data, events=ev))
    r.apply()
    users = list(ev["user_id"].unique()[:5])
    t = int(ev.loc[ev["user_id"] == users[1], "ts"].iloc[10])
    r.materialize(end=datetime.fromtimestamp(t, timezone.utc))
    got = r.online_histories(users)
    for v in users:
        assert got[v] == naive_history(ev, v, t, r.scenarios)
    r.materialize()
    got = r.online_histories(users)
    for v in users:
        assert got[v] == naive_history(ev, v, None, r.scenarios) and got[v]
    last_second = [h for h in got[u] if h.scenario == "homefeed"][-3:]
    assert len({h.ts for h in last_second}) == 1


def test_training_set_after_a_same_second_burst_sees_the_whole_burst(tmp_path, data):
    """A point-in-time join after a burst of events in one second (MovieLens rates in bursts)
    must see the window after the whole burst: with one source row per event, the rows of that
    second tie on the join's timestamp and DuckDB picked the burst's first state."""
    import dataclasses

    ev = data.events.copy()
    u = ev["user_id"].iloc[0]
    mine = ev.index[(ev["user_id"] == u) & (ev["scenario"] == "homefeed")]
    burst_ts = int(ev.loc[mine[-3], "ts"])
    ev.loc[mine[-3:], "ts"] = burst_ts
    ev = ev.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    r = FeatureRepo(tmp_path / "data", seq_len=SEQ_LEN)
    r.build_sources(dataclasses.replace(data, events=ev))
    r.apply()
    ask = pd.DataFrame({"user_id": [u], "ts": [burst_ts + 1]})
    got = r.training_set(ask).histories(r.scenarios)[0]
    assert got == naive_history(ev, u, burst_ts + 1, r.scenarios)
    assert [h.ts for h in got if h.scenario == "homefeed"][-3:] == [burst_ts] * 3


def test_sequence_table_matches_a_python_loop(data):
    ev = data.events[data.events["scenario"] == "homefeed"]
    t = sequence_table(ev, 4).to_pandas()
    t = t[t["event_timestamp"] > pd.Timestamp(0, tz="UTC")].reset_index(drop=True)  # skip the epoch rows
    assert len(t) == len(ev.drop_duplicates(["user_id", "ts"]))  # one row per (user, second)
    for k, (u, grp) in enumerate(ev.groupby("user_id", sort=False)):
        if k > 10:
            break
        items, stamps = grp["item_id"].tolist(), grp["ts"].tolist()
        last_of_second = [i for i in range(len(stamps)) if i + 1 == len(stamps) or stamps[i + 1] != stamps[i]]
        rows = t[t["user_id"] == u]
        assert len(rows) == len(last_of_second)
        for i, (_, row) in zip(last_of_second, rows.iterrows()):
            assert list(row["item_ids"]) == items[max(0, i - 3) : i + 1]
            assert list(row["timestamps"]) == stamps[max(0, i - 3) : i + 1]


def test_feast_cli_applies_the_repo_as_is(tmp_path, data):
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "feature_repo", proj / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("REDREC_FEAST_SOURCES", None)
    env.pop("REDREC_SCENARIOS", None)
    feast = [sys.executable, "-m", "feast.cli.cli"] if not shutil.which("feast") else [shutil.which("feast")]
    # with no data yet (fresh checkout) ...
    out = subprocess.run(feast + ["-c", "feature_repo", "apply"], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "seq_homefeed" in out.stdout and "redrec_serving" in out.stdout
    # ... and against sources built by the library into <project>/data: the same store
    lib = FeatureRepo(proj / "data", seq_len=SEQ_LEN)
    lib.build_sources(data)
    out = subprocess.run(feast + ["-c", "feature_repo", "apply"], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {fv.name for fv in lib.store.list_feature_views()} >= {"seq_homefeed", "seq_search", "seq_ads", "item_text", "item_popularity"}
    assert {s.name for s in lib.store.list_feature_services()} == {"redrec_training", "redrec_training_user", "redrec_serving"}
    lib.materialize(views=["seq_search"])
    u = data.events.loc[data.events["scenario"] == "search", "user_id"].iloc[0]
    assert lib.online_history(u, ["search"]) == naive_history(data.events, u, None, ["search"])


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres()
    if pg.bin is None or not shutil.which("openssl"):
        shutil.rmtree(pg.root, ignore_errors=True)
        pytest.fail("no PostgreSQL server binaries (initdb, postgres) or openssl: `make test` installs Debian's postgresql")
    try:
        yield pg.start()
    finally:
        pg.stop()


def test_postgres_online_store_needs_only_the_k8s_yaml(tmp_path, data, monkeypatch, postgres):
    """feature_repo/k8s/feature_store.postgres.yaml, unchanged, against a real Postgres (online
    store and SQL registry): apply, materialise, online read, cold start, push, historical join."""
    for k, v in postgres.env().items():
        monkeypatch.setenv(k, v)
    r = FeatureRepo(tmp_path / "data", fs_yaml=ROOT / "feature_repo" / "k8s" / "feature_store.postgres.yaml", seq_len=SEQ_LEN)
    assert type(r.store.config.online_store).__name__ == "PostgreSQLOnlineStoreConfig"
    assert r.store.config.registry.registry_type == "sql"
    r.build_sources(data)
    r.apply()
    r.materialize()
    ev = data.events
    users = list(ev["user_id"].unique()[:4])
    got = r.online_histories(users + ["never-seen"])
    for u in users:
        assert got[u] == naive_history(ev, u, None, r.scenarios) and got[u]
    assert got["never-seen"] == []
    last = int(ev["ts"].max())
    r.push_events(pd.DataFrame({"user_id": [users[0]], "item_id": [data.items["item_id"].iloc[0]], "scenario": ["search"],
                                "action": ["like"], "ts": [last + 1]}))
    assert r.online_history(users[0])[-1] == HistoryEvent(data.items["item_id"].iloc[0], "search", "like", last + 1)
    t = int(ev.loc[ev["user_id"] == users[1], "ts"].iloc[7])
    ts = r.training_set(pd.DataFrame({"user_id": [users[1]], "ts": [t]}))
    assert ts.histories(r.scenarios) == [naive_history(ev, users[1], t, r.scenarios)]
    # the rows live in Postgres, in the yaml's schema, one table per view
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="feast", dbname="postgres", sslmode="require") as c:
        tables = {row[0] for row in c.execute("select table_name from information_schema.tables where table_schema='redrec'")}
    assert {"redrec_seq_homefeed", "redrec_item_popularity"} <= tables, tables


def test_redis_yaml_is_a_valid_feast_config(tmp_path, monkeypatch):
    """Feast's own config loader reads the Redis variant (after the same ${VAR} expansion a pod
    does), with a password holding YAML-special characters (the real server: the next tests)."""
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.repo_config import load_repo_config

    monkeypatch.setenv("FEAST_REGISTRY_URL", "postgresql+psycopg://feast:p%40ss@pg:5432/feast")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis-master:6379,password=a: #b'\"")
    cfg = load_repo_config(tmp_path, ROOT / "feature_repo" / "k8s" / "feature_store.redis.yaml")
    assert isinstance(cfg.online_store, RedisOnlineStoreConfig)
    assert cfg.online_store.connection_string == "redis-master:6379,password=a: #b'\""
    assert cfg.registry.registry_type == "sql" and cfg.registry.path.endswith("@pg:5432/feast")
    assert cfg.project == "redrec" and cfg.offline_store.type == "duckdb"


@pytest.fixture(scope="module")
def redis_server():
    r = Redis()
    try:
        yield r
    finally:
        r.stop()


def test_pipeline_features_step_fills_the_redis_store_the_config_names(tmp_path, monkeypatch, postgres, redis_server):
    """The training pipeline's features step with the cluster's Feast config
    (feature_repo/k8s/feature_store.redis.yaml, unchanged: Redis online store, SQL registry)
    against a real redis-server and Postgres: serving's online reads come back from Redis."""
    from redrec.pipeline import steps
    from redrec.pipeline.config import PipelineParams

    for k, v in postgres.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("REDIS_CONNECTION_STRING", f"127.0.0.1:{redis_server.port}")
    yaml_path = ROOT / "feature_repo" / "k8s" / "feature_store.redis.yaml"
    p = PipelineParams(dataset="synthetic", dataset_args={"n_users": 60, "n_items": 80, "seed": 4},
                       experiment={"model": {"user_tower": {"max_len": SEQ_LEN}}}, workspace=str(tmp_path / "ws"),
                       feature_store_yaml=str(yaml_path))
    assert redis_server.client.dbsize() == 0
    steps.prepare_data(p, tmp_path / "data")
    rep = steps.build_features(p, tmp_path / "data", tmp_path / "ts")
    assert rep["online_store"] == "RedisOnlineStoreConfig" and rep["rows"] == 60
    assert redis_server.client.dbsize() >= 60  # one hash per user entity (and per item)
    assert not (tmp_path / "ws" / "feast" / "feast_online.db").exists()  # nothing went to an embedded SQLite
    r = FeatureRepo(tmp_path / "ws" / "feast", fs_yaml=yaml_path)
    ev = steps.load_prepared(tmp_path / "data").events
    users = list(ev["user_id"].unique()[:3])
    got = r.online_histories(users)
    for u in users:
        assert got[u] == naive_history(ev, u, None, r.scenarios) and got[u]
    with pytest.raises(ValueError, match="feature_store_yaml.*does not exist"):
        steps.build_features(p.model_copy(update={"feature_store_yaml": str(tmp_path / "nope.yaml")}),
                             tmp_path / "data", tmp_path / "ts2")


def test_k8s_configs_only_swap_the_online_store():
    base = yaml.safe_load((ROOT / "feature_repo" / "feature_store.yaml").read_text())
    for name, kind in (("redis", "redis"), ("postgres", "postgres")):
        k8s = yaml.safe_load((ROOT / "feature_repo" / "k8s" / f"feature_store.{name}.yaml").read_text())
        assert k8s["project"] == base["project"] and k8s["provider"] == base["provider"]
        assert k8s["online_store"]["type"] == kind
        assert k8s["offline_store"] == base["offline_store"]
        assert k8s["entity_key_serialization_version"] == base["entity_key_serialization_version"]


def test_training_set_is_point_in_time_correct(repo, data):
    ev = data.events
    users = ev["user_id"].unique()[:25]
    rows = []
    for u in users:
        e = ev[ev["user_id"] == u]
        rows.append((u, int(e["ts"].iloc[len(e) // 2])))  # label = a mid-history event
    ent = pd.DataFrame(rows, columns=["user_id", "ts"])
    ts = repo.training_set(ent)
    assert len(ts.df) == len(ent) and ts.df["user_id"].tolist() == ent["user_id"].tolist()
    hist = ts.histories(repo.scenarios)
    for (u, t), h in zip(rows, hist):
        assert h == naive_history(ev, u, t, repo.scenarios)
        assert all(x.ts < t for x in h)  # the label event and later ones never leak
    # a user's later events exist in the offline tables, yet stay out of an earlier label's row
    u, t = rows[0]
    later = ev[(ev["user_id"] == u) & (ev["ts"] > t)]
    assert len(later) > 0 and not set(zip(later["item_id"], later["ts"])) & {(x.item_id, x.ts) for x in hist[0]}
    incl = repo.training_set(ent.iloc[:3], inclusive=True).histories(repo.scenarios)
    for (u, t), h in zip(rows[:3], incl):
        assert h == naive_history(ev, u, t, repo.scenarios, inclusive=True)
        assert h[-1].ts == t


def test_training_set_keeps_duplicates_and_rows_feast_would_drop(repo, data, caplog):
    ev = data.events
    u0, u1 = ev["user_id"].unique()[:2]
    first0 = int(ev.loc[ev["user_id"] == u0, "ts"].min())
    t1 = int(ev.loc[ev["user_id"] == u1, "ts"].iloc[5])
    item = data.items["item_id"].iloc[0]
    ent = pd.DataFrame({
        "user_id": [u1, u0, u1, "ghost", u1],
        "item_id": [item, item, item, item, item],
        "ts": [t1, first0 - 10, t1, t1, t1 + 1],
    })
    with caplog.at_level("WARNING"):
        ts = repo.training_set(ent)
    assert ts.duplicates.n_duplicate_rows == 1 and ts.duplicates.n_groups == 1
    assert "1 of 5 rows repeat" in caplog.text
    assert len(ts.df) == 5 and ts.df["user_id"].tolist() == ent["user_id"].tolist()
    h = ts.histories(repo.scenarios)
    assert h[0] == h[2] == naive_history(ev, u1, t1, repo.scenarios) and len(h[0]) > 0
    # u0 before its first event: Feast 0.67's file store would drop this row; it comes back empty
    assert h[1] == [] and h[3] == []
    # item features are point-in-time too: popularity counts events strictly before the label
    pop = ts.df["item_popularity__popularity"].fillna(0).astype(int).tolist()
    assert pop[0] == int(((ev["item_id"] == item) & (ev["ts"] < t1)).sum())
    assert ts.df["item_text__title"].iloc[0] == data.items["title"].iloc[0]
    assert "view by view" not in caplog.text  # the epoch rows kept Feast from dropping u0's row
    with pytest.raises(DuplicateEntityRowsError, match="1 of 5 rows repeat"):
        repo.training_set(ent, on_duplicate="raise")
    assert len(repo.training_set(ent.drop(columns="item_id"), on_duplicate="drop").df) == 4


def test_dask_file_store_reads_the_same_sources_to_the_same_rows(repo, data, tmp_path):
    """Same parquet files through Feast's Dask ``file`` store, which drops duplicate entity rows
    and rows whose entity only has later feature rows: the output must not change."""
    dask = FeatureRepo(tmp_path / "data", source_dir=repo.source_dir, offline_store="file")
    assert dask.scenarios == repo.scenarios and dask.seq_len == SEQ_LEN
    dask.apply()
    ev = data.events
    u0, u1 = ev["user_id"].unique()[:2]
    t1 = int(ev.loc[ev["user_id"] == u1, "ts"].iloc[4])
    ent = pd.DataFrame({"user_id": [u1, u0, u1, "ghost"], "item_id": data.items["item_id"].iloc[:4].tolist(),
                        "ts": [t1, int(ev.loc[ev["user_id"] == u0, "ts"].min()) - 1, t1, t1]})
    a, b = repo.training_set(ent), dask.training_set(ent)
    assert b.histories(dask.scenarios) == a.histories(repo.scenarios)
    assert b.histories(dask.scenarios)[1] == []
    pd.testing.assert_series_equal(b.df["item_popularity__popularity"].fillna(0).astype(int),
                                   a.df["item_popularity__popularity"].fillna(0).astype(int))


def test_rows_missing_from_feast_are_refetched_view_by_view(repo, data, monkeypatch, caplog):
    ev = data.events
    u = ev["user_id"].iloc[0]
    t = int(ev.loc[ev["user_id"] == u, "ts"].iloc[3])
    ent = pd.DataFrame({"user_id": [u, "ghost"], "ts": [t, t]})
    real = repo.store.get_historical_features

    class Lossy:  # what Feast's file store does to some rows: silently leave them out
        def __init__(self, job):
            self.job = job

        def to_df(self):
            df = self.job.to_df()
            return df[df["user_id"] != u]

    def lossy(entity_df, features, **kw):
        job = real(entity_df=entity_df, features=features, **kw)
        return Lossy(job) if not isinstance(features, list) else job

    monkeypatch.setattr(repo.store, "get_historical_features", lossy)
    with caplog.at_level("WARNING"):
        ts = repo.training_set(ent)
    assert "returned 1 of 2 entity rows" in caplog.text
    assert ts.histories(repo.scenarios) == [naive_history(ev, u, t, repo.scenarios), []]


def test_online_history_and_cold_start(repo, data):
    ev = data.events
    users = list(ev["user_id"].unique()[:5])
    got = repo.online_histories(users + ["never-seen"])
    for u in users:
        assert got[u] == naive_history(ev, u, None, repo.scenarios)
        assert [x.ts for x in got[u]] == sorted(x.ts for x in got[u])
    assert got["never-seen"] == []
    assert repo.online_history("never-seen") == []
    assert repo.online_history(users[0], ["ads"]) == naive_history(ev, users[0], None, ["ads"])
    with pytest.raises(KeyError, match="'shop'"):
        repo.online_history(users[0], ["shop"])


def test_pushed_events_reach_the_next_online_read(repo, data):
    ev = data.events
    u = ev["user_id"].iloc[0]
    last = int(ev["ts"].max())
    before = repo.online_history(u)
    items = data.items["item_id"].tolist()
    pop0 = repo.online_popularity(items[:2])
    fresh = pd.DataFrame({
        "user_id": [u] * (SEQ_LEN + 1) + ["brand-new"],
        "item_id": [items[i % 2] for i in range(SEQ_LEN + 1)] + [items[1]],
        "scenario": ["ads"] * (SEQ_LEN + 1) + ["search"],
        "action": ["click"] * (SEQ_LEN + 2),
        "ts": [last + 10 + i for i in range(SEQ_LEN + 1)] + [last + 5],
    })
    rep = repo.push_events(fresh)
    assert rep.events == SEQ_LEN + 2 and rep.rows_pushed["seq_ads"] == 1 and rep.rows_pushed["seq_search"] == 1
    after = repo.online_history(u)
    ads = [x for x in after if x.scenario == "ads"]
    assert len(ads) == SEQ_LEN and ads[-1] == HistoryEvent(items[SEQ_LEN % 2], "ads", "click", last + 10 + SEQ_LEN)
    assert [x for x in after if x.scenario != "ads"] == [x for x in before if x.scenario != "ads"]
    assert repo.online_history("brand-new") == [HistoryEvent(items[1], "search", "click", last + 5)]
    pop1 = repo.online_popularity(items[:2])
    assert pop1[items[0]] - pop0[items[0]] == (SEQ_LEN + 2) // 2 and pop1[items[1]] - pop0[items[1]] == (SEQ_LEN + 1) // 2 + 1
    # an older event arriving late is placed in time order; a re-push is skipped, not duplicated
    late = fresh.iloc[[SEQ_LEN]].assign(ts=last + 10 + SEQ_LEN - 1, item_id=items[2], action="like")
    pop_late = repo.online_popularity([items[2]])[items[2]]
    rep2 = repo.push_events(pd.concat([late, fresh.iloc[[SEQ_LEN]]]))
    assert rep2.skipped_duplicates == 1
    # the re-pushed event counts once for popularity, the late one adds one
    pop2 = repo.online_popularity(items[:3])
    assert pop2[items[SEQ_LEN % 2]] == pop1[items[SEQ_LEN % 2]]
    assert pop2[items[2]] == pop_late + 1
    rep3 = repo.push_events(late)
    assert rep3.skipped_duplicates == 1 and repo.online_popularity([items[2]]) == {items[2]: pop2[items[2]]}
    ads2 = [x for x in repo.online_history(u) if x.scenario == "ads"]
    assert [x.ts for x in ads2] == sorted(x.ts for x in ads2) and len(ads2) == SEQ_LEN
    assert ads2[-2] == HistoryEvent(items[2], "ads", "like", last + 10 + SEQ_LEN - 1)
    with pytest.raises(KeyError, match="'shop'"):
        repo.push_events(fresh.iloc[:1].assign(scenario="shop"))
    # a new store object (another process) sees the pushed state too
    other = FeatureRepo(repo.data_dir)
    assert other.online_history("brand-new") == [HistoryEvent(items[1], "search", "click", last + 5)]
    assert np.isfinite(rep.seconds)


def test_cli_build_apply_materialize_and_history(tmp_path, capsys):
    from redrec.cli import main

    d = tmp_path / "data"
    args = ["--data-dir", str(d)]
    assert main(["features", "build", *args, "--dataset", "synthetic", "--dataset-arg", "n_users=30",
                 "--dataset-arg", "n_items=60", "--dataset-arg", "seed=4", "--seq-len", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["materialized"] and out["seq_len"] == 5 and out["rows"]["items"] == 60
    data = generate(SyntheticConfig(n_users=30, n_items=60, seed=4))
    u = data.events["user_id"].iloc[0]
    assert main(["features", "history", *args, u, "never-seen"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [HistoryEvent(**h) for h in got[u]] == naive_history(data.events, u, None, out["scenarios"], seq_len=5)
    assert got["never-seen"] == []
    assert main(["features", "apply", *args]) == 0
    assert "redrec_serving" in json.loads(capsys.readouterr().out)["feature_services"]
    assert main(["features", "materialize", *args, "--views", "seq_ads"]) == 0
    capsys.readouterr()
    assert main(["features", "history", *args, u, "--scenario", "shop"]) == 2
    assert "'shop'" in capsys.readouterr().err
