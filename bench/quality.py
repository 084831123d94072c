"""Offline quality: popularity, SASRec, single-scenario RED-Rec and full RED-Rec on one split.

Runs MovieLens-1M (configs/ml1m-cpu.yaml) and the synthetic three-scenario set with the same
trainer, loss, negatives and full-ranking evaluation for every variant, then writes
bench/results/quality.json and prints each table with ratios to SASRec.

    python bench/quality.py                 # both datasets
    python bench/quality.py --only synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("REDREC_CACHE", str(ROOT / "build" / "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from redrec.experiment import ExperimentConfig, run_experiment  # noqa: E402

SYNTHETIC = {
    "dataset": "synthetic",
    "dataset_args": {"n_users": 1000, "n_items": 800, "seed": 0},
    "model": {"item_source": "cache-finetune", "item_tower": {"backbone": "minilm"},
              "user_tower": {"hidden_size": 64, "layers": 2, "heads": 2, "max_len": 50, "queries_per_scenario": 2}},
    "train": {"epochs": 16, "batch_size": 64, "negatives": 256, "progress": False, "warmup_steps": 20},
    "leave_one_out": False,
    "out_dir": "build/bench/quality/synthetic",
}


def configs(only: str | None) -> dict[str, ExperimentConfig]:
    ml = yaml.safe_load((ROOT / "configs" / "ml1m-cpu.yaml").read_text())
    ml["out_dir"] = "build/bench/quality/ml1m"
    out = {"synthetic": ExperimentConfig.model_validate(SYNTHETIC), "movielens-1m": ExperimentConfig.model_validate(ml)}
    return {k: v for k, v in out.items() if only in (None, k)}


def ratios(results: dict, ref: str = "sasrec", metric: str = "ndcg@10") -> dict:
    """Each variant's metric over SASRec's, overall and per scenario."""
    base = results.get(ref)
    if base is None:
        return {}
    out = {}
    for name, r in results.items():
        row = {"overall": r["overall"][metric] / max(base["overall"][metric], 1e-12)}
        for s, m in r["per_scenario"].items():
            row[s] = m[metric] / max(base["per_scenario"][s][metric], 1e-12)
        out[name] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["synthetic", "movielens-1m"])
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = ap.parse_args()

    path = Path(args.output)
    report = json.loads(path.read_text()) if path.exists() and args.only else {}
    report.setdefault("datasets", {})
    report["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for name, cfg in configs(args.only).items():
        t0 = time.time()
        out = run_experiment(cfg)
        out["ndcg@10_ratio_to_sasrec"] = ratios(out["results"])
        out["wall_s"] = time.time() - t0
        best = out["ndcg@10_ratio_to_sasrec"].get("redrec", {})
        out["redrec_beats_sasrec_every_scenario"] = bool(best) and all(v > 1.0 for k, v in best.items())
        report["datasets"][name] = out
        print(f"\n== {name}: {out['wall_s']:.0f}s wall on {os.cpu_count()} cores ==")
        print(out["table"])
        if "table_loo" in out:
            print("\nleave-one-out protocol (whole catalogue):\n" + out["table_loo"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
