"""Shadow benchmark: served latency of the real `bentoml serve` stack with a candidate in shadow
(``redrec.serving.shadow``) vs none, in the same run, on the same server.

    python bench/shadow.py                       # trains bench/serving.py's small synthetic model first
    python bench/shadow.py --checkpoint DIR --dataset movielens-1m

Stack as in bench/serving.py (2 workers, Feast feature server, Milvus Lite, in-process exact
search). The candidate is the same checkpoint stored under a second version with its own
collection: its cost per mirrored request is a production request's (tower forward + search).
The shadow is switched by rewriting the serving config, which every worker reloads in place
(``wait_serving``), so every setting runs on the same processes; settings alternate over
``--rounds`` rounds to spread the shared machine's drift. Load: wrk, ``--clients`` closed-loop
connections. Reported per setting: the rounds' p50/p99 (median over rounds) and their ratio to
no shadow, and what the shadow log holds for the setting's windows (scored, errors, drops).
Target: p99 with the shadow at the default share within 10% of no shadow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
for k, v in {"BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)

from bench.serving import _cpu_model, synthetic_model, wrk  # noqa: E402


def shadow_lines_between(log_dir: Path, t0: float, t1: float) -> dict:
    from redrec.experiments.shadow_report import read_shadow_log

    lines, drops, _ = read_shadow_log(log_dir)
    out = {"scored": 0, "errors": 0, "dropped": 0, "latency_ms_p99": None, "queue_ms_p99": None}
    if len(lines):
        w = lines[(lines["ts"] >= t0) & (lines["ts"] < t1 + 5)]
        out["scored"] = int(w["error"].isna().sum())
        out["errors"] = int(w["error"].notna().sum())
        if len(w):
            out["latency_ms_p99"] = round(float(w["latency_ms"].quantile(0.99)), 2)
            out["queue_ms_p99"] = round(float(w["queue_ms"].quantile(0.99)), 2)
    if len(drops):
        out["dropped"] = int(drops[(drops["ts"] >= t0) & (drops["ts"] < t1 + 5)]["n"].sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="exported checkpoint dir (default: train a small synthetic model)")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 1.0], help="shadow shares to run (first: the default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shadow.json"))
    args = ap.parse_args()

    import httpx
    import yaml

    from redrec.data import load_dataset
    from redrec.index.lite import LiteServer
    from redrec.pipeline.deploy import wait_serving
    from redrec.serving.config import ShadowSpec
    from redrec.serving.feast_server import FeatureServer
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare, publish_checkpoint

    work = Path(tempfile.mkdtemp(prefix="redrec-bench-shadow-"))
    if args.checkpoint:
        data, ckpt, model_desc = load_dataset(args.dataset), Path(args.checkpoint), f"{args.dataset} checkpoint {args.checkpoint}"
    else:
        data, ckpt, model_desc = synthetic_model(work)
    users = data.events["user_id"].astype(str).unique().tolist()
    rng = random.Random(0)
    reqs = [(rng.choice(users), rng.choice(list(data.scenarios))) for _ in range(5000)]
    bodies = work / "requests.jsonl"
    bodies.write_text("".join(json.dumps({"user_id": u, "scenario": s, "k": args.k}) + "\n" for u, s in reqs))
    serving = {"max_k": 100, "torch_threads": 1, "workers": args.workers, "batch_max_concurrent": 1}
    settings = [("off", None)] + [(f"share {s:g}", s) for s in args.shares]
    results: dict[str, list[dict]] = {name: [] for name, _ in settings}
    load0 = os.getloadavg()
    with LiteServer(work / "milvus.db") as uri:
        publish_checkpoint(ckpt, data, uri, "redrec_items", "cand")  # the candidate's own collection, kept
        cfg_path = prepare(data, {"bench": ckpt, "cand": ckpt}, work, uri,
                           [{"name": "control", "model_version": "bench", "index_alias": "", "share": 1.0}],
                           seq_len=args.seq_len, serving=serving)
        with FeatureServer(work / "feast") as fs_url:
            base = yaml.safe_load(cfg_path.read_text())
            base["serving"]["feature_server_url"] = fs_url
            base["model_store"] = {"config_poll_s": 1.0}
            cfg_path.write_text(yaml.safe_dump(base, sort_keys=False))
            log_dir = Path(base["serving"]["serving_log"]["dir"])
            with LocalServer(cfg_path) as srv:
                for rnd in range(args.rounds):
                    for name, share in settings:
                        cfg = json.loads(json.dumps(base))
                        if share is not None:
                            cfg["shadow"] = {"model_version": "cand", "share": share}
                        text = yaml.safe_dump(cfg, sort_keys=False)
                        cfg_path.write_text(text)
                        wait_serving(srv.url, text, 120)
                        wrk(srv.url, bodies, 10, args.warmup_seconds)
                        r = wrk(srv.url, bodies, args.clients, args.seconds)
                        t0, t1 = r.pop("window")
                        time.sleep(1.0)  # the shadow worker writes its last lines of the window
                        r["shadow_log"] = shadow_lines_between(log_dir, t0, t1)
                        r["round"] = rnd
                        r["load_average_1m_after"] = round(os.getloadavg()[0], 2)
                        results[name].append(r)
                        print(f"round {rnd} {name:>10}: {r['throughput_rps']} rps, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                              f"fail {r['failures']}, shadow {r['shadow_log']}", flush=True)
                shadow_status = httpx.get(srv.url + "/ops/release", timeout=30).json().get("shadow")
    summary = {}
    for name, _ in settings:
        rs = results[name]
        summary[name] = {k: round(statistics.median(r[k] for r in rs), 2) for k in ("throughput_rps", "p50_ms", "p99_ms")}
        summary[name]["failures"] = sum(r["failures"] for r in rs)
    for name, _ in settings[1:]:
        for k in ("p50_ms", "p99_ms"):
            summary[name][f"{k}_ratio_vs_off"] = round(summary[name][k] / summary["off"][k], 3)
    default = settings[1][0]
    out = {
        "benchmark": "shadow", "model": model_desc + " (the candidate: the same checkpoint as version 'cand', its own "
                                                     "collection)",
        "clients": args.clients, "seconds_per_run": args.seconds, "rounds": args.rounds, "workers": args.workers,
        "shadow_defaults": ShadowSpec(model_version="x").model_dump(exclude={"model_version", "index_alias"}),
        "cpu_count": os.cpu_count(), "machine": f"{platform.machine()} {_cpu_model()}", "python": platform.python_version(),
        "note": "wrk shares the machine's cores with the server (2-core machine, shared with other work)",
        "load_average_at_start": [round(x, 2) for x in load0],
        "summary": summary, "runs": results, "shadow_status_one_worker": shadow_status,
        "target": {"p99_ratio_vs_off_at_default_share": 1.10, "default_share": settings[1][1],
                   "met": summary[default]["p99_ms_ratio_vs_off"] <= 1.10},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'setting':>10} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'p50 x':>6} {'p99 x':>6} {'fail':>5}")
    for name, _ in settings:
        s = summary[name]
        print(f"{name:>10} {s['throughput_rps']:>7} {s['p50_ms']:>7} {s['p99_ms']:>7} {s.get('p50_ms_ratio_vs_off', 1.0):>6} "
              f"{s.get('p99_ms_ratio_vs_off', 1.0):>6} {s['failures']:>5}")
    print(f"machine {out['machine']}, {os.cpu_count()} cores (shared); target met: {out['target']['met']}; results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
