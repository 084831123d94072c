"""Time of a full drift check on MovieLens-1M with an ML-1M RED-Rec model.

    python bench/drift.py [--model build/bench-serving/ml1m/redrec/model] [--requests 3000]

Reference = the first 90% of ML-1M ratings by time (the training window, ~900k events), recorded
with the model (replayed requests give the user-embedding and score references). Current = the
last 10% (~100k events) as serving-log feedback, plus `--requests` served requests per scenario
computed by the model (serve_like). The check runs with the trigger off (its cost is the
pipeline's, not the monitor's).

Peer in the same run: the no-Evidently floor, the same per-feature distances (normed
Wasserstein, Jensen-Shannon) computed with scipy on the same frames, and the ratio.
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
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redrec.data import load_dataset  # noqa: E402
from redrec.drift.config import BEHAVIOUR_FEATURES, NUMERIC_FEATURES, load_drift_config  # noqa: E402
from redrec.drift.features import behaviour_features  # noqa: E402
from redrec.drift.model_side import serve_like  # noqa: E402
from redrec.drift.monitor import run_check  # noqa: E402
from redrec.drift.reference import load_reference, record_reference  # noqa: E402


def floor_distances(ref: pd.DataFrame, cur: pd.DataFrame) -> dict:
    """The same distances Evidently computes, straight from scipy: the no-Evidently floor."""
    out = {}
    for f in BEHAVIOUR_FEATURES:
        if f in NUMERIC_FEATURES:
            r, c = ref[f].to_numpy(float), cur[f].to_numpy(float)
            out[f] = wasserstein_distance(r, c) / max(np.std(r), 1e-12)
        else:
            keys = sorted(set(ref[f]) | set(cur[f]))
            p = ref[f].value_counts(normalize=True).reindex(keys, fill_value=0).to_numpy()
            q = cur[f].value_counts(normalize=True).reindex(keys, fill_value=0).to_numpy()
            out[f] = float(jensenshannon(p, q))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "build/bench-serving/ml1m/redrec/model"))
    ap.add_argument("--requests", type=int, default=3000, help="served requests per scenario in the current window")
    ap.add_argument("--out", default=str(ROOT / "bench/results/drift.json"))
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"--model {args.model}: no exported ML-1M checkpoint there; train one with "
                         "`redrec train --config configs/ml1m-cpu.yaml` and pass <out_dir>/redrec/model")
    work = Path(tempfile.mkdtemp(prefix="redrec-drift-bench-"))
    t = {}
    t0 = time.perf_counter()
    data = load_dataset("movielens-1m")
    t["load_ml1m_s"] = time.perf_counter() - t0
    ev = data.events.sort_values("ts", kind="stable").reset_index(drop=True)
    cut = int(ev["ts"].quantile(0.9))
    ref_ev, cur_ev = ev[ev["ts"] < cut], ev[ev["ts"] >= cut]

    t0 = time.perf_counter()
    ref_dir = record_reference(ref_ev, data.items, work / "reference", model_dir=args.model, max_requests=2000)
    t["record_reference_s"] = time.perf_counter() - t0

    # the serving log of the current window: requests served by the model, every event as feedback
    rng = np.random.default_rng(0)
    picks = np.concatenate([rng.choice(np.flatnonzero(cur_ev["scenario"].to_numpy() == s),
                                       size=min(args.requests, int((cur_ev["scenario"] == s).sum())), replace=False)
                            for s in data.scenarios])
    rid = np.array([f"fb-{i}" for i in range(len(cur_ev))], dtype=object)
    rid[picks] = [f"req-{i}" for i in picks]
    req = pd.DataFrame({"request_id": rid[picks], "user_id": cur_ev["user_id"].to_numpy()[picks],
                        "scenario": cur_ev["scenario"].to_numpy()[picks], "ts": cur_ev["ts"].to_numpy()[picks] - 0.5})
    t0 = time.perf_counter()
    served, _ = serve_like(args.model, ev, data.items, req)
    t["serve_like_s"] = time.perf_counter() - t0
    log_dir = work / "serving-log"
    log_dir.mkdir()
    served.to_json(log_dir / "serving-bench.jsonl", orient="records", lines=True)
    cur_ev.assign(request_id=rid).to_json(log_dir / "feedback-bench.jsonl", orient="records", lines=True)

    offline = {s: {"hr@10": m["hr@10"]} for s, m in
               json.loads((Path(args.model) / "config.json").read_text()).get("metrics", {}).get("per_scenario", {}).items()}
    info = json.loads((ref_dir / "reference.json").read_text())
    info["offline_metrics"] = offline
    (ref_dir / "reference.json").write_text(json.dumps(info))

    now = float(ev["ts"].max() + 1)
    cfg = load_drift_config(None, {
        "scenarios": data.scenarios, "reference_dir": ref_dir, "report_dir": work / "reports", "serving_log_dir": log_dir,
        "now": now, "window_hours": (now - cut) / 3600 + 1, "trigger": False,
    })
    t0 = time.perf_counter()
    summary, run_dir = run_check(cfg)
    t["full_check_s"] = time.perf_counter() - t0

    # peer: the same distances without Evidently (features computed once more, timed with it)
    t0 = time.perf_counter()
    ref = load_reference(ref_dir)
    feats = behaviour_features(cur_ev, ref.items, ref.info["seq_lookback_hours"])
    floor = {s: floor_distances(ref.features[ref.features["scenario"] == s], feats[feats["scenario"] == s]) for s in data.scenarios}
    t["floor_scipy_s"] = time.perf_counter() - t0

    agree = {}
    for s in summary["scenarios"]:
        b = next(c for c in s["checks"] if c["name"] == "behaviour")
        agree[s["scenario"]] = {f["name"]: [round(f["score"], 4), round(floor[s["scenario"]][f["name"]], 4)] for f in b["features"]}
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2-core machine shared with other jobs: timings are noisy"},
        "data": {"reference_events": int(len(ref_ev)), "current_events": int(len(cur_ev)), "requests": int(len(req)),
                 "reference_requests_replayed": int(info["model"]["n_requests"])},
        "timings_s": {k: round(v, 2) for k, v in t.items()},
        "ratio_full_check_over_floor": round(t["full_check_s"] / t["floor_scipy_s"], 1),
        "verdicts": {s["scenario"]: s["verdict"] for s in summary["scenarios"]},
        "top_drifted": {s["scenario"]: s["top_drifted"] for s in summary["scenarios"]},
        "behaviour_scores_evidently_vs_scipy": agree,
        "html_bytes": {p.name: p.stat().st_size for p in run_dir.glob("*.html")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if out.exists() and "volume" in (old := json.loads(out.read_text())):
        result["volume"] = old["volume"]  # bench/drift_volume.py's section
    out.write_text(json.dumps(result, indent=2))
    print(f"{'step':<24} {'seconds':>9}")
    for k, v in result["timings_s"].items():
        print(f"{k:<24} {v:>9.2f}")
    print(f"full check / scipy floor: {result['ratio_full_check_over_floor']}x  (cpu_count={os.cpu_count()}, shared)")
    print(f"{'scenario':<10} {'verdict':<18} top drifted")
    for s in summary["scenarios"]:
        print(f"{s['scenario']:<10} {s['verdict']:<18} {', '.join(s['top_drifted'][:4]) or '-'}")
    print(f"report: {run_dir / 'index.html'}; results: {args.out}")


if __name__ == "__main__":
    main()
