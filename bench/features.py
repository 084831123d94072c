"""Feast timings on the embedded default (local provider, parquet offline, SQLite online).

    python bench/features.py [--users 5000] [--out bench/results/features.json]

Steps: build the parquet sources from a synthetic RecData, apply, materialise, historical join
(point-in-time, via get_historical_features) for 10k and 100k entity rows, online read of one
user's merged history and of a batch of 100 users (p50/p99), and a one-event push.

Peers in the same run: ``FeatureRepo.materialize`` next to Feast's own materialize of the same
views, the historical join next to a pandas ``merge_asof`` over the same parquet
files (the no-Feast floor; its rows are compared with Feast's), and the online read next to a
direct SQLite read of the same rows and value protos (the no-Feast floor of the online store).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redrec.data.synthetic import SyntheticConfig, generate  # noqa: E402
from redrec.features import FeatureRepo  # noqa: E402


def pct(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(xs)}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_avg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "2-core CPU shared with other work during the run; timings are indicative"}


def pandas_join(ent: pd.DataFrame, source_dir: Path, scenarios: list[str]) -> pd.DataFrame:
    """Point-in-time join (features strictly before the label) with pandas alone."""
    from redrec.features.sources import SourcePaths

    paths = SourcePaths(source_dir)
    left = ent.assign(event_timestamp=pd.to_datetime(ent["ts"], unit="s", utc=True).astype("datetime64[us, UTC]"),
                      _row=np.arange(len(ent))).sort_values("event_timestamp", kind="stable")
    for s in scenarios:
        right = pd.read_parquet(paths.seq(s)).sort_values("event_timestamp", kind="stable")
        right = right.rename(columns={c: f"seq_{s}__{c}" for c in ("item_ids", "actions", "timestamps")})
        left = pd.merge_asof(left, right, on="event_timestamp", by="user_id", allow_exact_matches=False)
    pop = pd.read_parquet(paths.item_popularity).sort_values("event_timestamp", kind="stable")
    left = pd.merge_asof(left, pop.rename(columns={"popularity": "item_popularity__popularity"}),
                         on="event_timestamp", by="item_id", allow_exact_matches=False)
    items = pd.read_parquet(paths.items).drop(columns="event_timestamp")
    left = left.merge(items.add_prefix("item_text__").rename(columns={"item_text__item_id": "item_id"}), on="item_id", how="left")
    return left.sort_values("_row").reset_index(drop=True)


def sqlite_floor(repo, user_ids: list[str]) -> int:
    """Read the same online rows Feast reads (one table per view), parsing the value protos."""
    import sqlite3

    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    cfg = repo.store.config
    con = sqlite3.connect(cfg.online_store.path)
    keys = [serialize_entity_key(EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]),
                                 entity_key_serialization_version=cfg.entity_key_serialization_version) for u in user_ids]
    n = 0
    marks = ",".join("?" * len(keys))
    for s in repo.scenarios:
        table = f"{cfg.project}_seq_{s}"
        for _, _, value in con.execute(f"SELECT entity_key, feature_name, value FROM {table} WHERE entity_key IN ({marks})", keys):
            n += len(Value.FromString(value).string_list_val.val)
    con.close()
    return n


def table(res: dict) -> str:
    rows = [("apply", f"{res['apply_s']:.2f} s", "", ""),
            ("materialise (peer: Feast's own)", f"{res['materialize_s']:.2f} s", f"{res['materialize_feast_s']:.2f} s",
             f"{res['materialize_s'] / max(res['materialize_feast_s'], 1e-9):.2f}")]
    for n, h in res["historical"].items():
        rows.append((f"historical join {n} rows", f"{h['seconds']:.2f} s", f"{h['pandas_merge_asof_s']:.2f} s",
                     f"{h['seconds'] / max(h['pandas_merge_asof_s'], 1e-9):.1f}"))
    for key, name in (("online_history_one_user", "online read, 1 user"), ("online_history_batch_100", "online read, 100 users")):
        r, f = res[key], res[key + "_sqlite_floor"]
        rows.append((name + " p50 / p99", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms", f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f} ms",
                     f"{r['p50_ms'] / max(f['p50_ms'], 1e-9):.1f}"))
    p = res["push_one_event_then_visible"]
    rows.append(("push 1 event p50 / p99", f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} ms", "", ""))
    head = f"{'step':<32} {'Feast':>22} {'floor (pandas / sqlite)':>24} {'ratio':>6}"
    mach = res["machine"]
    out = [f"machine: {mach['cpus']} CPUs, load average {mach.get('load_avg_1_5_15_at_start')} -> "
           f"{mach.get('load_avg_1_5_15_at_end')} ({mach['note']})", head, "-" * len(head)]
    out += [f"{a:<32} {b:>22} {c:>24} {d:>6}" for a, b, c, d in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--offline-store", default="duckdb", choices=["duckdb", "file"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "features.json"))
    args = ap.parse_args()
    import feast

    data = generate(SyntheticConfig(n_users=args.users, n_items=args.items, seed=0))
    res: dict = {"machine": machine(), "feast": feast.__version__, "dataset": data.describe(), "seq_len": args.seq_len}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        repo = FeatureRepo(Path(tmp) / "data", seq_len=args.seq_len, offline_store=args.offline_store)
        res["offline_store"] = f"parquet files via Feast's {args.offline_store} offline store"
        res["online_store"] = "sqlite"
        t = time.perf_counter()
        rep = repo.build_sources(data)
        res["build_sources_s"] = round(time.perf_counter() - t, 3)
        res["source_rows"] = rep.rows
        t = time.perf_counter()
        repo.apply()
        res["apply_s"] = round(time.perf_counter() - t, 3)
        # the peer: Feast's own materialize of every view (first: ours then overwrites its rows)
        from datetime import datetime, timezone

        from redrec.features.sources import EPOCH

        t = time.perf_counter()
        repo.store.materialize(EPOCH.to_pydatetime(), datetime.now(timezone.utc))
        res["materialize_feast_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        repo.materialize()
        res["materialize_s"] = round(time.perf_counter() - t, 3)
        res["materialize_entities"] = {"users": int(data.events["user_id"].nunique()), "items": len(data.items)}

        ev = data.events
        res["historical"] = {}
        for n in args.rows:
            pick = rng.integers(0, len(ev), n)
            ent = pd.DataFrame({"user_id": ev["user_id"].to_numpy()[pick], "item_id": ev["item_id"].to_numpy()[pick],
                                "ts": ev["ts"].to_numpy()[pick]})
            t = time.perf_counter()
            ts = repo.training_set(ent)
            dt = time.perf_counter() - t
            assert len(ts.df) == n
            t = time.perf_counter()
            ref = pandas_join(ent, repo.source_dir, repo.scenarios)
            dt_pd = time.perf_counter() - t
            # the floor must compute the same thing: compare every row's merged history
            col = "seq_homefeed__item_ids"
            same = float(np.mean([(a is None or (isinstance(a, float) and np.isnan(a)) or len(a) == 0) and
                                  (b is None or (isinstance(b, float) and np.isnan(b)) or len(b) == 0)
                                  or (not isinstance(a, float) and not isinstance(b, float) and a is not None
                                      and b is not None and list(a) == list(b))
                                  for a, b in zip(ts.df[col], ref[col])]))
            res["historical"][str(n)] = {"seconds": round(dt, 2), "rows_out": len(ts.df),
                                         "duplicate_rows_reported": ts.duplicates.n_duplicate_rows,
                                         "feature_views": len(repo.defs.views), "rows_per_s": round(n / dt),
                                         "pandas_merge_asof_s": round(dt_pd, 2),
                                         "rows_equal_to_pandas_seq_homefeed": same}
            print(f"historical {n}: {dt:.1f}s", flush=True)

        users = ev["user_id"].unique()
        for _ in range(5):  # warm up
            repo.online_history(str(users[0]))
        one, n_events = [], 0
        for u in rng.choice(users, 300):
            t = time.perf_counter()
            h = repo.online_history(str(u))
            one.append(time.perf_counter() - t)
            n_events += len(h)
        assert n_events > 0
        batch = []
        for _ in range(60):
            us = [str(u) for u in rng.choice(users, 100, replace=False)]
            t = time.perf_counter()
            repo.online_histories(us)
            batch.append(time.perf_counter() - t)
        res["online_history_one_user"] = {**pct(one), "mean_history_len": round(n_events / len(one), 1)}
        res["online_history_batch_100"] = pct(batch)
        floor_one, floor_batch = [], []
        for u in rng.choice(users, 300):
            t = time.perf_counter()
            sqlite_floor(repo, [str(u)])
            floor_one.append(time.perf_counter() - t)
        for _ in range(60):
            us = [str(u) for u in rng.choice(users, 100, replace=False)]
            t = time.perf_counter()
            sqlite_floor(repo, us)
            floor_batch.append(time.perf_counter() - t)
        res["online_history_one_user_sqlite_floor"] = pct(floor_one)
        res["online_history_batch_100_sqlite_floor"] = pct(floor_batch)
        push = []
        last = int(ev["ts"].max())
        for i, u in enumerate(rng.choice(users, 50)):
            e = pd.DataFrame({"user_id": [str(u)], "item_id": [data.items["item_id"].iloc[i]], "scenario": ["homefeed"],
                              "action": ["click"], "ts": [last + i + 1]})
            t = time.perf_counter()
            repo.push_events(e)
            push.append(time.perf_counter() - t)
        res["push_one_event_then_visible"] = pct(push)
    res["machine"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
