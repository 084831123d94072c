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
    from redrec.features.spark_sources import build_sources_spark, event_log_scenarios

    spark = spark_session(SparkSettings(master="local[2]", conf={"spark.driver.memory": driver_memory,
                                                                 "spark.sql.shuffle.partitions": "64"}))
    t = time.perf_counter()
    rep = build_sources_spark(spark, events, items, out, seq_len, event_log_scenarios(spark, events), name="scale")
    print(json.dumps({"build_s": round(time.perf_counter() - t, 1), "rows": rep.rows}))


def child_reader(path: str, batch_rows: int) -> None:
    from redrec.train.shards import reader_peak_rss

    print(json.dumps(reader_peak_rss(path, rank=0, world=2, batch_rows=batch_rows)))


# ---- the series ----------------------------------------------------------------------------------


def run_size(n_events: int, args, work: Path) -> dict:
    from redrec.data.synthetic import write_scale_log

    n_users = max(1, n_events // args.events_per_user)
    log = work / f"log-{n_events}"
    t = time.perf_counter()
    gen = write_scale_log(log, n_events=n_events, n_users=n_users, n_items=args.items, seed=0)
    row: dict = {"events": n_events, "users": n_users, "items": args.items, "seq_len": args.seq_len,
                 "log_write_s": round(time.perf_counter() - t, 1), "log_bytes": sum(f.stat().st_size for f in log.rglob("*") if f.is_file())}
    events, items = str(gen["events"]), str(gen["items"])
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
    ts = work / f"ts-{n_events}"
    from redrec.train.shards import write_synthetic_training_set

    write_synthetic_training_set(ts, n_users=n_users, n_items=args.items, seq_len=args.seq_len, files=8, seed=0)
    row["training_reader_rank0_of_2"] = measured(me + ["_reader", str(ts), "4096"], args.limit_gib, args.timeout_s)
    print(f"  {n_events:>11,} events  reader: {brief(row['training_reader_rank0_of_2'])}", flush=True)
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
    head = f"{'events':>12} {'pandas s':>9} {'pandas GiB':>10} {'spark s':>8} {'spark py GiB':>12} {'spark jvm GiB':>13} {'spark/pandas s':>14} {'reader GiB':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        pd_, sp, rd = r["pandas"], r["spark_local2"], r["training_reader_rank0_of_2"]
        ok = lambda x: "skipped" not in x and x.get("rc") == 0  # noqa: E731
        pd_s = f"{pd_['wall_s']:.0f}" if ok(pd_) else ("OOM" if pd_.get("killed_at_limit") else "-")
        pd_m = f"{pd_['total_peak_gib']:.2f}" if "total_peak_gib" in pd_ else "-"
        ratio = f"{sp['wall_s'] / pd_['wall_s']:.2f}" if ok(pd_) and ok(sp) else "-"
        out.append(f"{r['events']:>12,} {pd_s:>9} {pd_m:>10} {sp['wall_s']:>8.0f} {sp['python_peak_gib']:>12.2f} "
                   f"{sp['jvm_peak_gib']:>13.2f} {ratio:>14} {rd.get('total_peak_gib', float('nan')):>10.3f}")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        kind, rest = sys.argv[1], sys.argv[2:]
        {"_pandas": lambda: child_pandas(rest[0], rest[1], rest[2], int(rest[3])),
         "_spark": lambda: child_spark(rest[0], rest[1], rest[2], int(rest[3]), rest[4]),
         "_reader": lambda: child_reader(rest[0], int(rest[1]))}[kind]()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    ap.add_argument("--events-per-user", type=int, default=30)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--limit-gib", type=float, default=20.0, help="a process tree past this is killed (the box has 23 GiB)")
    ap.add_argument("--pandas-max-events", type=int, default=10**12)
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "features.json"))
    args = ap.parse_args()
    from bench.features import machine

    work = Path(args.work or tempfile.mkdtemp(prefix="redrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.events:
            rows.append(run_size(n, args, work))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res = {"machine": {**machine(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
           "method": __doc__.split("\n\n", 2)[2].strip(), "limit_gib": args.limit_gib, "rows": rows}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old["scale"] = res
    out.write_text(json.dumps(old, indent=1))
    print(table(rows))
    print(f"results written to {out} (key 'scale')")


if __name__ == "__main__":
    main()
