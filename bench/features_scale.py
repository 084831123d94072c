"""The offline side at scale: pandas/DuckDB vs Spark local[2] on synthetic logs of growing size.

    python bench/features_scale.py [--events 1000000 10000000 50000000] [--limit-gib 20]
                                   [--out bench/results/features.json]

For each size: a synthetic event log is written as parquet in chunks (``write_scale_log``), then
the sequence-window sources are built by each engine in a process of its own while a sampler
reads the resident memory of the process tree every 0.2 s: the Python process and, for Spark,
the JVM it starts (in ``local[2]`` the executors are threads of that JVM: driver and executors
are one process, reported as ``jvm``). A process that passes ``--limit-gib`` is killed and the
size at which the pandas path stops is recorded. Then the sharded training reader streams rank 0
of 2 of a training set with one row per user of that size (written directly with pyarrow, full
windows) and reports its peak RSS. Results go under ``scale`` in features.json (the other keys,
from ``bench/features.py``, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


class TreeSampler:
    """Peak RSS of a process and its descendants, split into the Python process and JVMs."""

    def __init__(self, pid: int, limit_bytes: int | None, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process(pid)
        self.limit = limit_bytes
        self.interval = interval
        self.peak = {"python": 0, "jvm": 0, "total": 0}
        self.killed_at_limit = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                py = jvm = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        if p.name() == "java":
                            jvm += rss
                        elif p.pid == self.proc.pid:
                            py += rss
                    except psutil.Error:
                        pass
                total = py + jvm
                self.peak = {"python": max(self.peak["python"], py), "jvm": max(self.peak["jvm"], jvm),
                             "total": max(self.peak["total"], total)}
                if self.limit and total > self.limit and not self.killed_at_limit:
                    self.killed_at_limit = True
                    for p in reversed(procs):
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {k + "_peak_gib": round(v / GIB, 3) for k, v in self.peak.items()}


def measured(cmd: list[str], limit_gib: float | None, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    sampler = TreeSampler(p.pid, int(limit_gib * GIB) if limit_gib else None)
    try:
        out, _ = p.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        timed_out = True
    mem = sampler.stop()
    res = {"wall_s": round(time.perf_counter() - t0, 1), "rc": p.returncode, **mem,
           "killed_at_limit": sampler.killed_at_limit, "timed_out": timed_out}
    if p.returncode != 0:
        res["tail"] = out[-1500:]
    else:
        last = [ln for ln in out.splitlines() if ln.startswith("{")]
        if last:
            res["result"] = json.loads(last[-1])
    return res


# ---- the measured children ----------------------------------------------------------------------


def child_pandas(events: str, items: str, out: str, seq_len: int) -> None:
    """The embedded path: the whole log in one pandas frame, then ``build_sources``."""
    import pandas as pd

    from redrec.data.dataset import RecData
    from redrec.features.sources import build_sources

    t = time.perf_counter()
    ev = pd.read_parquet(events).sort_values("seq", kind="stable").drop(columns=["seq"], errors="ignore")
    ev = ev[["user_id", "item_id", "scenario", "action", "ts"]]
    it = pd.read_parquet(items)
    data = RecData("scale", ev, it, sorted(ev["scenario"].unique()), sorted(ev["action"].unique()))
    t_load = time.perf_counter() - t
    rep = build_sources(data, out, seq_len)
    print(json.dumps({"load_s": round(t_load, 1), "build_s": round(time.perf_counter() - t - t_load, 1),
                      "rows": rep.rows}))


def child_spark(events: str, items: str, out: str, seq_len: int, driver_memory: str) -> None:
    from redrec.features.spark import SparkSettings, spark_session
    from redrec.features.spark_sources import build_sources_spark

    spark = spark_session(SparkSettings(master="local[2]", conf={"spark.driver.memory": driver_memory}))
    t = time.perf_counter()
    rep = build_sources_spark(spark, events, items, out, seq_len, name="scale")
    print(json.dumps({"build_s": round(time.perf_counter() - t, 1), "rows": rep.rows}))


# ---- ML-1M: both paths, compared row for row ---------------------------------------------------


def _sorted_rows(table, keys: list[str]) -> list[tuple]:
    import pyarrow.compute as pc

    table = table.select(sorted(table.column_names))
    if "seq" in table.column_names:
        table = table.drop(["seq"])
    idx = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
    # rows of one key and second keep their file order (each engine writes a user's rows in order)
    return [tuple(r.values()) for r in table.take(idx).to_pylist()]


def ml1m_equal(work: Path, seq_len: int) -> dict:
    """The real data through both paths: every source table and the training set, row for row."""
    import warnings

    import pandas as pd

    from redrec.data import chronological_split, encode
    from redrec.data.movielens import load_movielens_1m
    from redrec.features.sources import SourcePaths
    from redrec.features.spark_sources import build_sources_spark, read_source_table, write_event_log, write_items
    from redrec.features.spark_training import repo_spark_session, write_training_set_spark
    from redrec.features.store import FeatureRepo
    from redrec.pipeline.steps import label_rows

    warnings.filterwarnings("ignore", message="The spark offline store is an experimental feature")
    data = load_movielens_1m()
    out: dict = {"events": len(data.events), "users": int(data.events["user_id"].nunique()), "seq_len": seq_len}
    t = time.perf_counter()
    duck = FeatureRepo(work / "ml1m-pandas", seq_len=seq_len)
    duck.build_sources(data)
    duck.apply()
    out["pandas_build_s"] = round(time.perf_counter() - t, 1)
    spark_repo = FeatureRepo(work / "ml1m-spark", offline_store="spark", seq_len=seq_len)
    spark = repo_spark_session(spark_repo)
    log, items = write_event_log(data, work / "ml1m-log"), write_items(data.items, work / "ml1m-items.parquet")
    t = time.perf_counter()
    rep = build_sources_spark(spark, log, items, spark_repo.source_dir, seq_len, list(data.scenarios), name=data.name)
    out["spark_build_s"] = round(time.perf_counter() - t, 1)
    spark_repo.scenarios = rep.scenarios
    spark_repo.refresh_definitions()
    spark_repo.apply()
    tables = {}
    for name, keys in [("events", ["user_id", "ts"]), ("items", ["item_id"]), ("item_popularity", ["item_id", "event_timestamp"])] + \
            [(f"seq_{s}", ["user_id", "event_timestamp"]) for s in rep.scenarios]:
        a = _sorted_rows(read_source_table(duck.source_dir, name), keys)
        b = _sorted_rows(read_source_table(spark_repo.source_dir, name), keys)
        tables[name] = {"rows": len(a), "equal": a == b}
    out["source_tables"] = tables
    enc = encode(data)
    ent = label_rows(enc, chronological_split(enc, 1, 1))
    t = time.perf_counter()
    a = duck.training_set(ent).df
    out["training_set_duckdb_s"] = round(time.perf_counter() - t, 1)
    ts = write_training_set_spark(spark_repo, ent, work / "ml1m-shards", parts=8)
    out["training_set_spark_s"] = round(ts.seconds, 1)
    b = pd.read_parquet(work / "ml1m-shards")
    import pyarrow as pa

    cols = list(a.columns)
    ta = pa.Table.from_pandas(a[cols].assign(event_timestamp=pd.to_datetime(a["event_timestamp"], utc=True).astype("datetime64[us, UTC]")), preserve_index=False)
    tb = pa.Table.from_pandas(b[cols].assign(event_timestamp=pd.to_datetime(b["event_timestamp"], utc=True).astype("datetime64[us, UTC]")), preserve_index=False)
    ra, rb = _sorted_rows(ta, ["user_id"]), _sorted_rows(tb, ["user_id"])
    out["training_set"] = {"rows": len(ra), "equal": ra == rb, "spark_files": ts.files, "leaks": ts.leaks}
    print(f"ML-1M: sources equal {all(v['equal'] for v in tables.values())}, training set equal {ra == rb} "
          f"({len(ra)} users)", flush=True)
    return out


# ---- the series ----------------------------------------------------------------------------------


def run_size(n_events: int, args, work: Path) -> dict:
    from redrec.data.scale_log import write_scale_log

    n_users = max(1, n_events // args.events_per_user)
    log = work / f"log-{n_events}"
    t = time.perf_counter()
    gen = write_scale_log(log, n_events=n_events, n_users=n_users, n_items=args.items, seed=0)
    row: dict = {"events": n_events, "users": n_users, "items": args.items, "seq_len": args.seq_len,
                 "log_write_s": round(time.perf_counter() - t, 1), "log_bytes": sum(f.stat().st_size for f in log.rglob("*") if f.is_file())}
    events, items = str(gen.events_dir), str(gen.items_path)
    me = [sys.executable, str(Path(__file__).resolve())]
    if n_events <= args.pandas_max_events:
        row["pandas"] = measured(me + ["_pandas", events, items, str(work / "pd"), str(args.seq_len)], args.limit_gib, args.timeout_s)
    else:
        row["pandas"] = {"skipped": f"above --pandas-max-events {args.pandas_max_events}"}
    shutil.rmtree(work / "pd", ignore_errors=True)
    print(f"  {n_events:>11,} events  pandas: {brief(row['pandas'])}", flush=True)
    row["spark_local2"] = measured(me + ["_spark", events, items, str(work / "sp"), str(args.seq_len), args.driver_memory],
                                   args.limit_gib, args.timeout_s)
    row["spark_local2"]["driver_memory"] = args.driver_memory
    print(f"  {n_events:>11,} events  spark:  {brief(row['spark_local2'])}", flush=True)
    shutil.rmtree(work / "sp", ignore_errors=True)
    # the training reader: rank 0 of 2 streaming one epoch of batches from its shard, next to
    # today's whole-set reader (its peer) where that fits
    # (sampled from outside: a child's ru_maxrss starts at its parent's, Linux keeps it across exec)
    from bench.training_shards import write_synthetic_training_set

    ts = work / f"ts-{n_events}"
    cat = write_synthetic_training_set(ts, n_users, n_items=min(args.items, 20000), window=args.seq_len, n_files=8)
    (work / "catalogue.json").write_text(json.dumps(cat))
    shards_bench = [sys.executable, str(ROOT / "bench" / "training_shards.py")]
    row["training_reader"] = {"users_in_set": n_users, "streamed_rank0_of_2": measured(
        shards_bench + ["streamed", str(ts), str(work / "catalogue.json"), "0", "2", "1024", "128", "4", str(args.seq_len), "10"],
        args.limit_gib, args.timeout_s)}
    if n_users <= args.whole_max_users:
        row["training_reader"]["whole_set_peer"] = measured(shards_bench + ["whole", str(ts), str(work / "catalogue.json")],
                                                            args.limit_gib, args.timeout_s)
    else:
        row["training_reader"]["whole_set_peer"] = {"skipped": f"above --whole-max-users {args.whole_max_users}"}
    print(f"  {n_events:>11,} events  reader rank 0/2: {brief(row['training_reader']['streamed_rank0_of_2'])}; "
          f"whole set: {brief(row['training_reader']['whole_set_peer'])}", flush=True)
    shutil.rmtree(ts, ignore_errors=True)
    shutil.rmtree(log, ignore_errors=True)
    return row


def brief(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    state = "killed at the memory limit" if r.get("killed_at_limit") else ("timed out" if r.get("timed_out") else f"rc {r['rc']}")
    return (f"{r['wall_s']:.0f} s, peak python {r['python_peak_gib']:.2f} GiB, jvm {r['jvm_peak_gib']:.2f} GiB, "
            f"total {r['total_peak_gib']:.2f} GiB ({state})")


def table(rows: list[dict]) -> str:
    head = f"{'events':>12} {'pandas s':>9} {'pandas GiB':>10} {'spark s':>8} {'spark py GiB':>12} {'spark jvm GiB':>13} {'spark/pandas s':>14} {'reader rank0 GiB':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        pd_, sp = r["pandas"], r["spark_local2"]
        rd = r["training_reader"]["streamed_rank0_of_2"]
        ok = lambda x: "skipped" not in x and x.get("rc") == 0  # noqa: E731
        pd_s = f"{pd_['wall_s']:.0f}" if ok(pd_) else ("OOM" if pd_.get("killed_at_limit") else "-")
        pd_m = f"{pd_['total_peak_gib']:.2f}" if "total_peak_gib" in pd_ else "-"
        ratio = f"{sp['wall_s'] / pd_['wall_s']:.2f}" if ok(pd_) and ok(sp) else "-"
        out.append(f"{r['events']:>12,} {pd_s:>9} {pd_m:>10} {sp['wall_s']:>8.0f} {sp['python_peak_gib']:>12.2f} "
                   f"{sp['jvm_peak_gib']:>13.2f} {ratio:>14} {rd['python_peak_gib']:>10.3f}")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        kind, rest = sys.argv[1], sys.argv[2:]
        {"_pandas": lambda: child_pandas(rest[0], rest[1], rest[2], int(rest[3])),
         "_spark": lambda: child_spark(rest[0], rest[1], rest[2], int(rest[3]), rest[4]),
         "_ml1m": lambda: print(json.dumps(ml1m_equal(Path(rest[0]), int(rest[1]))))}[kind]()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    ap.add_argument("--events-per-user", type=int, default=30)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--limit-gib", type=float, default=20.0, help="a process tree past this is killed (the box has 23 GiB)")
    ap.add_argument("--pandas-max-events", type=int, default=10**12)
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--whole-max-users", type=int, default=400_000, help="the whole-set reader peer up to this many users")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--no-ml1m", action="store_true", help="skip the ML-1M row-for-row comparison")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "features.json"))
    args = ap.parse_args()
    from bench.features import machine

    work = Path(args.work or tempfile.mkdtemp(prefix="redrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    ml1m = None
    try:
        if not args.no_ml1m:  # in a child of its own, so this process stays small while it samples others
            ml1m = measured([sys.executable, str(Path(__file__).resolve()), "_ml1m", str(work), str(args.seq_len)], None, args.timeout_s)
        for n in args.events:
            rows.append(run_size(n, args, work))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res = {"machine": {**machine(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
           "method": __doc__.split("\n\n", 2)[2].strip(), "limit_gib": args.limit_gib, "ml1m_pandas_vs_spark": ml1m,
           "rows": rows}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old["scale"] = res
    out.write_text(json.dumps(old, indent=1))
    print(table(rows))
    print(f"results written to {out} (key 'scale')")


if __name__ == "__main__":
    main()
