"""Offline quality: popularity, SASRec, single-scenario RED-Rec, RED-Rec and its ablations, under
the multi-scenario and the standard leave-one-out protocols.

Every model trains with the same trainer, loss family, stopping rule (validation NDCG@10,
patience, best weights kept) and full-ranking evaluation. Results merge into
bench/results/quality.json (one entry per dataset, protocol and model, with its validation curve,
wall time and machine), and bench/results/quality.html renders the tables and curves.

    python bench/quality.py                                   # everything (hours on 2 cores)
    python bench/quality.py --dataset movielens-1m --protocol loo --models sasrec
    python bench/quality.py --html-only                       # re-render the HTML
    python bench/quality.py --output build/q-loo.json ...     # parts in parallel, each to its own file,
    python bench/quality.py --merge-from build/q-loo.json     # then merged (rows, curves, ratios, HTML)
    python bench/quality.py --merge-from build/q-cpu.json --merge-as "2-core CPU"
                                                              # a whole run from another machine, kept
                                                              # as its own section beside the main rows
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

from bench.quality_report import base_protocol, write_html  # noqa: E402
from redrec.data import load_dataset  # noqa: E402
from redrec.experiment import ABLATIONS, ExperimentConfig, is_redrec_itself, run_protocol  # noqa: E402
from redrec.model.recommender import ModelConfig  # noqa: E402

SYNTHETIC = {
    "dataset": "synthetic",
    "dataset_args": {"n_users": 1000, "n_items": 800, "seed": 0},
    "model": {"item_source": "cache-finetune", "item_tower": {"backbone": "minilm"}, "cuts_per_sequence": 16,
              "user_tower": {"hidden_size": 64, "layers": 2, "heads": 2, "max_len": 50, "queries_per_scenario": 1, "dropout": 0.2}},
    "train": {"max_steps": 20000, "batch_size": 64, "lr": 0.002, "patience_steps": 120, "min_steps": 150, "progress": False},
    "out_dir": "build/bench/quality/synthetic",
}
MAIN = ["sasrec", "single-scenario", "redrec"]


def configs() -> dict[str, dict]:
    ml = yaml.safe_load((ROOT / "configs" / "ml1m-cpu.yaml").read_text())
    ml["out_dir"] = "build/bench/quality/ml1m"
    return {"synthetic": SYNTHETIC, "movielens-1m": ml}


def ratios(results: dict, ref: str = "sasrec", metric: str = "ndcg@10") -> dict:
    """Each model's metric over the reference's, overall and per scenario."""
    base = results.get(ref)
    if base is None:
        return {}
    out = {}
    for name, r in results.items():
        row = {"overall": r["overall"][metric] / max(base["overall"][metric], 1e-12)}
        for s, m in r["per_scenario"].items():
            if s in base["per_scenario"]:
                row[s] = m[metric] / max(base["per_scenario"][s][metric], 1e-12)
        out[name] = row
    return out


def merge_report(into: dict, other: dict, label: str | None = None) -> dict:
    """``other``'s rows replace same-named rows of ``into`` (per dataset and protocol); the
    protocol's description and ratios follow the merged rows.

    With ``label``, ``other``'s protocols land in sections of their own ("loo@<label>"), so a run
    on another machine sits beside the main rows instead of replacing them, and its ratios compare
    only models trained in that run."""
    if label is not None and (not label.strip() or "@" in label):
        raise ValueError(f"--merge-as {label!r}: give a non-empty label without '@' (e.g. '2-core CPU')")
    for ds, protocols in other.get("datasets", {}).items():
        for protocol, src in protocols.items():
            if label is not None:
                protocol = f"{base_protocol(protocol)}@{label.strip()}"
            entry = into.setdefault("datasets", {}).setdefault(ds, {}).setdefault(protocol, {"results": {}, "models": {}})
            entry["results"].update(src["results"])
            entry["models"].update(src["models"])
            entry.update({k: v for k, v in src.items() if k not in ("results", "models", "ndcg@10_ratio_to_sasrec")})
            entry["ndcg@10_ratio_to_sasrec"] = ratios(entry["results"])
    return into


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    import torch

    # the rows of one report can come from different machines (a GPU run merged into CPU rows)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "gpu": gpu, "torch": torch.__version__,
            "platform": platform.platform(), "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["synthetic", "movielens-1m"], action="append", help="repeatable; default both")
    ap.add_argument("--protocol", choices=["multi-scenario", "loo"], action="append", help="repeatable; default both")
    ap.add_argument("--models", help="comma-separated; default: " + ",".join(MAIN + ABLATIONS))
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--html-only", action="store_true")
    ap.add_argument("--merge-from", action="append", metavar="JSON",
                    help="merge another run's rows into --output (repeatable): runs in parallel must not share a file")
    ap.add_argument("--merge-as", metavar="LABEL",
                    help="with --merge-from: keep the merged runs as their own sections '<protocol>@LABEL' "
                         "(e.g. a rerun on another machine) instead of replacing same-named rows")
    ap.add_argument("--max-minutes", type=float, help="cap each model's training (reported as stopped: 'time cap')")
    args = ap.parse_args()

    path = Path(args.output)
    if args.html_only:
        print(f"written {write_html(json.loads(path.read_text()), path.with_suffix('.html'))}")
        return 0
    if args.merge_as is not None and not args.merge_from:
        ap.error("--merge-as labels the runs of --merge-from: give --merge-from JSON too")
    if args.merge_from:
        report = json.loads(path.read_text()) if path.exists() else {}
        for src in args.merge_from:
            try:
                merge_report(report, json.loads(Path(src).read_text()), label=args.merge_as)
            except ValueError as e:
                ap.error(str(e))
        path.write_text(json.dumps(report, indent=2))
        print(f"written {path} and {write_html(report, path.with_suffix('.html'))}")
        return 0
    models = args.models.split(",") if args.models else MAIN + ABLATIONS
    for name, raw in configs().items():
        if args.dataset and name not in args.dataset:
            continue
        data = None
        for protocol in args.protocol or ["multi-scenario", "loo"]:
            # no-mixing is RED-Rec itself once the scenarios are collapsed into one
            todo = [m for m in models if not (protocol == "loo" and m == "redrec-no-mixing")]
            template = ModelConfig.model_validate(raw["model"])
            same = [m for m in todo if is_redrec_itself(template, m)]
            if same:
                print(f"[{name}/{protocol}] skipped {same}: this config's redrec already is that")
                todo = [m for m in todo if m not in same]
            if not todo:
                continue
            if args.max_minutes:
                raw = {**raw, "train": {**raw["train"], "max_minutes": args.max_minutes}}
            cfg = ExperimentConfig.model_validate({**raw, "variants": todo, "protocols": [protocol]})
            data = data or load_dataset(cfg.dataset, **cfg.dataset_args)
            t0 = time.time()
            out = run_protocol(cfg, protocol, data)
            # re-read: another filtered run may have written meanwhile
            report = json.loads(path.read_text()) if path.exists() else {}
            part = {"results": out["results"], "models": {m: {**v, "machine": machine()} for m, v in out["models"].items()},
                    "protocol": out["protocol"], "scenarios": out["scenarios"], "dataset": data.describe(), "config": raw}
            merge_report(report, {"datasets": {name: {protocol: part}}})
            report["machine"] = machine()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            print(f"\n== {name} / {protocol}: {time.time() - t0:.0f}s wall on {os.cpu_count()} cores ==\n{out['table']}")
            write_html(report, path.with_suffix(".html"))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
