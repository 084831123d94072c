"""Bytes per serving-log line on the `make run` service, and what a log volume holds.

The chart's serving-log volume must hold ``retentionHours`` of every pod's lines: its size
follows from the bytes one request writes. This starts the ML-1M service `make run` deployed
(its model store, Feast repo and Milvus Lite file, with a serving log of its own), sends
``--requests`` /recommend calls per scenario at k=10 (the default) for ML-1M users (1m_<id> in its Feast repo), plus
/record_events, and measures the lines written. The peer, in the same run: the same requests
with ``serving.log_user_embedding: false`` (the embedding is most of a line).

    make run && python bench/log_volume.py [--workspace build/pipeline/ml1m] [--requests 200]

Writes bench/results/log_volume.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.quality import machine  # noqa: E402

GIB = 2**30


def sizes(path: Path) -> list[int]:
    return [len(line) + 1 for line in path.read_bytes().splitlines() if line.strip()]


def run(cfg: dict, work: Path, users: list[str], items: list[str], n: int, label: str) -> dict:
    import httpx
    import yaml

    from redrec.serving.local import LocalServer

    log_dir = work / f"log-{label}"
    cfg = json.loads(json.dumps(cfg))
    cfg["serving"]["serving_log"] = {"dir": str(log_dir)}
    path = work / f"config-{label}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rnd = random.Random(0)
    cold = 0
    with LocalServer(path) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for scenario in cfg["scenarios"]:
            for _ in range(n):
                r = c.post("/recommend", json={"user_id": rnd.choice(users), "scenario": scenario, "k": 10})
                r.raise_for_status()
                cold += r.json()["cold_start"]
        for _ in range(n // 10):
            events = [{"user_id": rnd.choice(users), "item_id": rnd.choice(items), "scenario": rnd.choice(cfg["scenarios"]),
                       "action": "click"} for _ in range(10)]
            c.post("/record_events", json={"events": events}).raise_for_status()
    out = {}
    for kind in ("serving", "feedback"):
        b = [x for f in sorted(log_dir.glob(f"{kind}-*.jsonl")) for x in sizes(f)]
        q = statistics.quantiles(b, n=100)
        out[kind] = {"lines": len(b), "mean_bytes": round(statistics.mean(b), 1), "p50_bytes": q[49], "p99_bytes": q[98],
                     "max_bytes": max(b)}
    out["cold_start_share"] = round(cold / (n * len(cfg["scenarios"])), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(ROOT / "build" / "pipeline" / "ml1m"))
    ap.add_argument("--requests", type=int, default=200, help="per scenario")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "log_volume.json"))
    args = ap.parse_args()

    import yaml

    from redrec.index.lite import LiteServer

    ws = Path(args.workspace)
    cfg_path = ws / "serving" / "config.yaml"
    if not cfg_path.exists():
        print(f"{cfg_path} does not exist: run `make run` first (it deploys the ML-1M service this measures)")
        return 2
    cfg = yaml.safe_load(cfg_path.read_text())
    from redrec.release.model_store import ModelStore

    model = ModelStore(cfg["model_store"]["uri"]).path(cfg["experiment"]["arms"][0]["model_version"])
    users, items = [f"1m_{u}" for u in range(1, 6041)], json.loads((model / "item_ids.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="redrec-bench-logvol-"))
    lite = LiteServer(ws / "milvus.db")
    lite.start()
    try:
        cfg["milvus"]["uri"] = lite.uri
        rows = {}
        for label, emb in (("default", True), ("no-user-embedding", False)):
            c = json.loads(json.dumps(cfg))
            c["serving"]["log_user_embedding"] = emb
            rows[label] = run(c, work, users, items, args.requests, label)
    finally:
        lite.stop()
    per_req = rows["default"]["serving"]["mean_bytes"]
    # what a volume holds over the chart's default retention, all pods together (one shared claim)
    sizing = {f"{gib}Gi": round(gib * GIB / (72 * 3600 * per_req), 1) for gib in (20, 50, 100, 200)}
    result = {"machine": machine(), "dataset": "ml-1m (the make run service)", "k": 10,
              "requests_per_scenario": args.requests, "rows": rows,
              "ratio_default_to_peer": round(per_req / rows["no-user-embedding"]["serving"]["mean_bytes"], 2),
              "max_sustained_rps_for_72h_retention": sizing}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'setting':<20}{'serving B/line':>16}{'p99':>8}{'feedback B/line':>17}{'cold share':>12}")
    for label, r in rows.items():
        print(f"{label:<20}{r['serving']['mean_bytes']:>16}{r['serving']['p99_bytes']:>8}"
              f"{r['feedback']['mean_bytes']:>17}{r['cold_start_share']:>12}")
    print("72 h of requests per volume size (requests/s, all pods):", sizing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
