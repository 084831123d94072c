"""Serving benchmark: the real `bentoml serve` stack under wrk and locust, next to its in-process floor.

    python bench/serving.py --checkpoint build/pipeline/ml1m/runs/<run>/train/model --dataset movielens-1m
    python bench/serving.py            # no checkpoint: trains a small synthetic model first

Stack (all on 127.0.0.1): `bentoml serve` (``--workers`` processes, 2 by default, each with one
micro-batch in flight; each micro-batch does one Feast read and one user-tower forward for all its
requests, then searches the index: in process over the copy it holds of a collection of at most
milvus.exact_search_max_items items, else in Milvus) -> `feast serve`
(remote online store, SQLite behind it) -> `milvus-lite server` (the alias, and the copied rows).

Load: C closed-loop connections (back to back) per ``--clients`` entry from wrk (Debian's package,
``bench/wrk_recommend.lua``: one event-loop thread in C, 0.04-0.07 ms of CPU per request on a
2-core Intel Xeon, where locust's Python users took 0.33-0.54 ms there and 1.6 ms on a slower
AMD EPYC: a third of the 2 cores at the target rate), then an
open-loop run at ``--rate`` requests/s from locust headless (``bench/locustfile.py``,
``constant_throughput`` over ``--open-users`` users: wrk has no fixed-rate mode; the arrival rate
holds while the p99 stays below open-users/rate seconds). Both run as subprocesses, so their CPU
is measured apart from ours. Each run is preceded by the same warm-up. Reported per run:
throughput, p50/p90/p99, failures, the load generator's CPU per request, and the server-side stage
timings of the requests of that run read back from the serving log (queue, Feast, tower, search,
total).

Floor, in the same run: for the same (user, scenario) requests, the same user-tower forward
(history already in memory, one user at a time) plus an exact in-process search (numpy dot
product over the scenario's eligible items, seen items excluded): no HTTP, no Feast, no Milvus;
torch with the server's intra-op thread count (``--torch-threads``).
The load generator shares the machine's cores with the server (noted in the JSON).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
for k, v in {"BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)

STAGES = ("queue_ms", "feast_ms", "tower_ms", "search_ms", "latency_ms")


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q)) if len(xs) else float("nan")


def locust(url: str, spec_path: Path, users: int, seconds: float, out_prefix: Path, rate_per_user: float = 0.0) -> dict:
    """One headless locust run; its aggregated stats and its own CPU time per request."""
    env = {**os.environ, "REDREC_BENCH_REQUESTS": str(spec_path), "REDREC_BENCH_RATE": str(rate_per_user)}
    cmd = [str(Path(sys.executable).with_name("locust")), "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
           "--host", url, "-u", str(users), "-r", str(max(users, 1)), "-t", f"{int(seconds)}s", "--csv", str(out_prefix),
           "--only-summary", "--loglevel", "ERROR", "--stop-timeout", "5"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    t1 = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = Path(f"{out_prefix}_stats.csv")
    if not stats.is_file():
        raise RuntimeError(f"locust wrote no stats (rc {proc.returncode}): {proc.stderr[-2000:]}")
    row = next(r for r in csv.DictReader(stats.open()) if r["Name"] == "Aggregated")
    n, failures = int(row["Request Count"]), int(row["Failure Count"])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"users": users, "seconds": round(t1 - t0, 1), "requests": n, "failures": failures,
            "throughput_rps": round(float(row["Requests/s"]), 1), "p50_ms": float(row["50%"]),
            "p90_ms": float(row["90%"]), "p99_ms": float(row["99%"]), "max_ms": float(row["Max Response Time"]),
            "load_generator": "locust " + _locust_version(),
            "load_generator_cpu_ms_per_request": round(cpu * 1000 / max(n, 1), 3), "window": [t0, t1]}


def wrk(url: str, bodies_path: Path, connections: int, seconds: float) -> dict:
    """One wrk run of closed-loop connections; its counts, percentiles and its own CPU per request."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed: `apt-get install wrk` (Debian's package; `make services` installs it)")
    cmd = [exe, "-t", "1", "-c", str(connections), "-d", f"{int(seconds)}s", "--timeout", "10s",
           "-s", str(ROOT / "bench" / "wrk_recommend.lua"), url, "--", str(bodies_path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    t1 = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    w = json.loads(line.split(" ", 1)[1])
    n = w["requests"]
    # socket errors and timeouts are failures too: a request wrk gave up on never got its 200
    failures = w["failures"] + w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"users": connections, "seconds": round(t1 - t0, 1), "requests": n, "failures": failures,
            "throughput_rps": round(n / (w["duration_us"] / 1e6), 1), "p50_ms": round(w["p50_us"] / 1000, 2),
            "p90_ms": round(w["p90_us"] / 1000, 2), "p99_ms": round(w["p99_us"] / 1000, 2),
            "max_ms": round(w["max_us"] / 1000, 2), "load_generator": "wrk " + _wrk_version(exe),
            "load_generator_cpu_ms_per_request": round(cpu * 1000 / max(n, 1), 3), "window": [t0, t1]}


def stages_between(log_dir: Path, t0: float, t1: float) -> dict:
    """p50/p99 of each server-side stage over the responses logged in [t0, t1)."""
    from redrec.experiments.log import read_log

    df = read_log(log_dir, start=t0, end=t1).requests
    out = {"responses": int(len(df))}
    for c in STAGES:
        if c in df and df[c].notna().any():
            col = df[c].dropna()
            out[c] = {"p50": round(float(col.median()), 2), "p99": round(float(col.quantile(0.99)), 2)}
    if "batch_size" in df and df["batch_size"].notna().any():
        out["batch_size_mean"] = round(float(df["batch_size"].mean()), 1)
    return out


def floor(ckpt: Path, data, reqs: list[tuple[str, str]], k: int, seq_len: int, n: int) -> dict:
    import torch

    from redrec.features.store import merge_histories
    from redrec.model.checkpoint import load_for_serving
    from redrec.serving.history import Vocab, collate, encode_row

    model, info = load_for_serving(ckpt)
    vocab = Vocab.from_info(info)
    emb = np.load(ckpt / "item_embeddings.npy")
    ids = np.array(info["item_ids"])
    scen_of = dict(zip(data.items["item_id"].astype(str), data.items["scenarios"]))
    elig = {s: np.array([s in list(scen_of[i]) for i in ids]) for s in data.scenarios}
    ev = data.events
    users = {u for u, _ in reqs[:n]}
    hist = {}
    for u, e in ev[ev["user_id"].isin(users)].groupby("user_id", sort=False, observed=True):
        windows = {s: {"item_ids": g["item_id"].tail(seq_len).tolist(), "actions": g["action"].tail(seq_len).tolist(),
                       "timestamps": g["ts"].tail(seq_len).tolist()} for s, g in e.groupby("scenario")}
        hist[u] = merge_histories(windows, list(data.scenarios))
    lat = []
    for u, s in reqs[:n]:
        t = time.perf_counter()
        row = encode_row(vocab, hist[u])
        with torch.inference_mode():
            v = model.user_vectors(collate([row], [vocab.scenario_index[s]]))[0, 0].numpy()
        scores = (emb @ v.T).max(1)
        mask = elig[s].copy()
        seen = {h.item_id for h in hist[u]}
        mask &= ~np.isin(ids, list(seen))
        scores = np.where(mask, scores, -np.inf)
        top = np.argpartition(-scores, k)[:k]
        _ = ids[top[np.argsort(-scores[top])]]
        lat.append(time.perf_counter() - t)
    total = sum(lat)
    return {"requests": len(lat), "throughput_rps": round(len(lat) / total, 1), "p50_ms": round(pct(lat, 50), 3),
            "p99_ms": round(pct(lat, 99), 3)}


def synthetic_model(work: Path):
    """The small model the benchmarks train when given no checkpoint: (data, checkpoint dir, description)."""
    from redrec.data import chronological_split, encode, load_dataset
    from redrec.experiment import ExperimentConfig, train_variant
    from redrec.model.checkpoint import export_checkpoint

    data = load_dataset("synthetic", n_users=2000, n_items=2000, seed=0)
    cfg = ExperimentConfig.model_validate({"dataset": "synthetic", "variants": ["redrec"],
                                           "train": {"epochs": 1, "max_steps": 30, "progress": False}, "out_dir": str(work)})
    enc = encode(data)
    trainer, _ = train_variant(cfg, "redrec", data, enc, chronological_split(enc), work / "redrec", resume=False)
    ckpt = export_checkpoint(trainer.module, work / "model", enc.item_ids, {"variant": "redrec"})
    return data, ckpt, "synthetic 2000 users x 2000 items, 30 steps"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="exported checkpoint dir (default: train a small synthetic model)")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop arrival rate, requests/s (0: skip)")
    ap.add_argument("--open-users", type=int, default=200, help="locust users sharing the open-loop rate")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--torch-threads", type=int, default=1, help="serving.torch_threads, also used by the floor")
    ap.add_argument("--workers", type=int, default=2, help="serving.workers: server processes")
    ap.add_argument("--serving", default="{}", help="JSON overrides of the serving section (e.g. batch sizes)")
    ap.add_argument("--milvus", default="{}", help='JSON overrides of the milvus section (e.g. '
                    '\'{"exact_search_max_items": 0}\': every search through Milvus)')
    ap.add_argument("--label", default="", help="a name for this configuration, kept in the JSON")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = ap.parse_args()

    import httpx
    import yaml

    from redrec.data import load_dataset
    from redrec.index.lite import LiteServer
    from redrec.serving.feast_server import FeatureServer
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare

    work = Path(tempfile.mkdtemp(prefix="redrec-bench-serving-"))
    if args.checkpoint:
        data = load_dataset(args.dataset)
        ckpt = Path(args.checkpoint)
        model_desc = f"{args.dataset} checkpoint {ckpt}"
    else:
        data, ckpt, model_desc = synthetic_model(work)
    users = data.events["user_id"].astype(str).unique().tolist()
    rng = random.Random(0)
    reqs = [(rng.choice(users), rng.choice(list(data.scenarios))) for _ in range(5000)]
    spec = work / "requests.json"
    spec.write_text(json.dumps({"k": args.k, "requests": reqs}))
    bodies = work / "requests.jsonl"  # wrk's: one /recommend body per line
    bodies.write_text("".join(json.dumps({"user_id": u, "scenario": s, "k": args.k}) + "\n" for u, s in reqs))
    # one batch in flight per worker: with two workers, the 2 cores are taken (serving.batch_max_concurrent)
    serving = {"max_k": 100, "torch_threads": args.torch_threads, "workers": args.workers, "batch_max_concurrent": 1,
               **json.loads(args.serving)}

    load0 = os.getloadavg()
    t = time.perf_counter()
    runs = []
    with LiteServer(work / "milvus.db") as uri:
        cfg_path = prepare(data, {"bench": ckpt}, work, uri,
                           [{"name": "control", "model_version": "bench", "index_alias": "", "share": 1.0}],
                           seq_len=args.seq_len, serving=serving)
        with FeatureServer(work / "feast") as fs_url:
            c = yaml.safe_load(cfg_path.read_text())
            c["serving"]["feature_server_url"] = fs_url
            c["milvus"].update(json.loads(args.milvus))
            cfg_path.write_text(yaml.safe_dump(c))
            log_dir = Path(c["serving"]["serving_log"]["dir"])
            setup_s = time.perf_counter() - t
            plan = [("closed", n, 0.0) for n in args.clients]
            if args.rate > 0:
                plan.append(("open", args.open_users, args.rate / args.open_users))
            with LocalServer(cfg_path) as srv:
                for mode, n, per_user in plan:
                    wrk(srv.url, bodies, 10, args.warmup_seconds)
                    if mode == "closed":
                        r = wrk(srv.url, bodies, n, args.seconds)
                    else:
                        r = locust(srv.url, spec, n, args.seconds, work / f"{mode}-{n}", per_user)
                    r["mode"] = mode
                    if mode == "open":
                        r["target_rps"] = args.rate
                    r["load_average_1m_after"] = round(os.getloadavg()[0], 2)
                    runs.append(r)
                # one worker answers: its own micro-batches (the log's batch_size_mean covers all)
                batching = httpx.post(srv.url + "/batching_stats", json={}).json()
                searched = httpx.get(srv.url + "/ops/release", timeout=30).json()["arms"]["control"].get("searched")
            for r in runs:
                r["server_stages"] = stages_between(log_dir, *r.pop("window"))
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # the floor runs the forward as the server does
    fl = floor(ckpt, data, reqs, args.k, args.seq_len, 2000)
    for r in runs:
        r["p50_vs_floor"] = round(r["p50_ms"] / fl["p50_ms"], 1)
    out = {
        "benchmark": "serving", "label": args.label, "model": model_desc, "k": args.k, "seq_len": args.seq_len,
        "cpu_count": os.cpu_count(), "machine": f"{platform.machine()} {_cpu_model()}", "python": platform.python_version(),
        "note": "the load generator (wrk closed-loop, locust open-loop; its CPU reported per run) shares the "
                "machine's cores with the server",
        "torch_threads": args.torch_threads, "serving_overrides": serving,
        "milvus_overrides": json.loads(args.milvus), "searched": searched,
        "load_average_at_start": [round(x, 2) for x in load0], "setup_seconds": round(setup_s, 1),
        "server": runs, "floor_in_process": fl, "batching": batching,
        "targets": {"p50_vs_floor_at_1_client": 2.0, "throughput_rps_at_100_clients": 400, "p99_ms_at_100_clients": 250,
                    "failures": 0},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'run':>10} {'rps':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'fail':>5} {'p50/fl':>6} {'gen cpu':>7}  "
          "server p50 ms: queue feast tower search")
    for r in runs:
        st = r["server_stages"]
        stage = " ".join(f"{st[c]['p50']:>5}" if c in st else "    -" for c in STAGES[:4])
        name = f"{r['mode']} {r['users']}" if r["mode"] == "closed" else f"open {r.get('target_rps'):g}/s"
        print(f"{name:>10} {r['throughput_rps']:>7} {r['p50_ms']:>7g} {r['p90_ms']:>7g} {r['p99_ms']:>7g} {r['failures']:>5} "
              f"{r['p50_vs_floor']:>6} {r['load_generator_cpu_ms_per_request']:>7}  {stage}")
    print(f"{'floor':>10} {fl['throughput_rps']:>7} {fl['p50_ms']:>7} {'':>7} {fl['p99_ms']:>7}  (in-process forward + exact search)")
    print(f"index searched {searched}")
    print(f"micro-batches: {batching}; cpu_count={os.cpu_count()} (shared); results: {args.out}")
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _wrk_version(exe: str) -> str:
    out = subprocess.run([exe, "-v"], capture_output=True, text=True)
    words = (out.stdout + out.stderr).split()
    return words[1] if len(words) > 1 else "?"


def _locust_version() -> str:
    from importlib.metadata import version

    return version("locust")


if __name__ == "__main__":
    raise SystemExit(main())
