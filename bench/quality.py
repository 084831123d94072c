"""Offline quality: popularity, content kNN, SASRec (id and text items), single-scenario RED-Rec,
RED-Rec and its ablations, under the multi-scenario, the standard leave-one-out and the new-items
(item cold start) protocols.

Every model trains with the same trainer, loss family, stopping rule (validation NDCG@10,
patience, best weights kept) and full-ranking evaluation. Results merge into
bench/results/quality.json (one entry per dataset, protocol and model, with its validation curve,
wall time and machine), and bench/results/quality.html renders the tables and curves.

    python bench/quality.py                                   # everything (hours on 2 cores)
    python bench/quality.py --dataset movielens-1m --protocol loo --models sasrec
    python bench/quality.py --html-only                       # re-render the HTML
    python bench/quality.py --baselines-only                  # popularity and content kNN rows only
    python bench/quality.py --to-history                      # move time-capped / unrunnable rows to
                                                              # "history" (every write does it too)
    python bench/quality.py --dataset synthetic --protocol new-items --models sasrec,sasrec-text,redrec --seeds 0,1,2
                                                              # each model once per training seed: mean,
                                                              # sd and every seed's metrics
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

import numpy as np  # noqa: E402

from bench.quality_report import base_protocol, write_html  # noqa: E402
from redrec.data import load_dataset  # noqa: E402
from redrec.experiment import ABLATIONS, ExperimentConfig, is_redrec_itself, run_protocol  # noqa: E402
from redrec.model.recommender import ModelConfig  # noqa: E402

SYNTHETIC = {
    "dataset": "synthetic",
    "dataset_args": {"n_users": 1000, "n_items": 800, "seed": 0},
    "model": {"item_source": "cache-residual", "item_tower": {"backbone": "minilm"}, "cuts_per_sequence": 16,
              "user_tower": {"hidden_size": 64, "layers": 2, "heads": 2, "max_len": 50, "queries_per_scenario": 1, "dropout": 0.2}},
    "train": {"max_steps": 20000, "batch_size": 64, "lr": 0.002, "patience_steps": 120, "min_steps": 150, "progress": False},
    "out_dir": "build/bench/quality/synthetic",
    # the new-items protocol on the arrivals below: items first seen in the last 15% of events
    "new_items_frac": 0.15,
}
# what a protocol needs of a dataset beyond its config: the synthetic world releases 15% of its
# catalogue late, or nothing would be new (every item is live from day one otherwise)
PROTOCOL_DATASET_ARGS = {("synthetic", "new-items"): {"new_item_share": 0.15}}
MAIN = ["sasrec", "sasrec-text", "single-scenario", "redrec"]
PROTOCOLS = ["multi-scenario", "loo", "new-items"]
RUN_KEYS = ("train_s", "total_s", "steps", "best_step", "stopped", "best_valid")


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


def _mean_sd(values: list[dict]) -> tuple[dict, dict]:
    keys = [k for k in values[0] if all(k in v for v in values)]
    arr = {k: np.array([v[k] for v in values], dtype=float) for k in keys}
    # sample sd (ddof 1): the seeds are a sample of training runs, not the population
    return {k: float(a.mean()) for k, a in arr.items()}, {k: float(a.std(ddof=1)) if len(a) > 1 else 0.0 for k, a in arr.items()}


def aggregate_seeds(runs: dict[int, dict]) -> dict:
    """``run_protocol`` outputs of one protocol, one per training seed -> one part whose trained
    models' ``overall`` and ``per_scenario`` are means over the seeds, with ``sd`` (same layout),
    ``n``, ``seeds`` and ``per_seed`` (each seed's own metrics); their model entries keep each
    seed's steps, stop and time in ``per_seed``, the means at the top level, the first seed's
    curve. Untrained baselines (popularity, content kNN) do not depend on the seed: the first
    run's rows. One seed returns that run's rows unchanged."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    if len(seeds) == 1:
        return {"results": first["results"], "models": first["models"]}
    results, models = dict(first["results"]), {}
    for name in first["models"]:
        per = {s: runs[s]["results"][name] for s in seeds}
        overall, sd_overall = _mean_sd([per[s]["overall"] for s in seeds])
        scen = [sc for sc in per[seeds[0]]["per_scenario"] if all(sc in per[s]["per_scenario"] for s in seeds)]
        per_scen, sd_scen = {}, {}
        for sc in scen:
            per_scen[sc], sd_scen[sc] = _mean_sd([per[s]["per_scenario"][sc] for s in seeds])
        results[name] = {"per_scenario": per_scen, "overall": overall, "counts": per[seeds[0]]["counts"],
                         "sd": {"overall": sd_overall, "per_scenario": sd_scen}, "n": len(seeds), "seeds": seeds,
                         "per_seed": {str(s): {"overall": per[s]["overall"], "per_scenario": per[s]["per_scenario"]} for s in seeds}}
        runs_of = [runs[s]["models"][name] for s in seeds]
        entry = dict(runs_of[0])
        for k in ("train_s", "total_s", "steps", "best_step", "best_valid"):
            vals = [r[k] for r in runs_of if r.get(k) is not None]
            entry[k] = float(np.mean(vals)) if vals else None
        stops = sorted({str(r.get("stopped")) for r in runs_of})
        entry["stopped"] = stops[0] if len(stops) == 1 else " / ".join(stops)
        entry["per_seed"] = [{"seed": s, **{k: r.get(k) for k in RUN_KEYS}} for s, r in zip(seeds, runs_of)]
        entry["curve_seed"] = seeds[0]
        models[name] = entry
    return {"results": results, "models": models}


def to_history(report: dict, runnable=None) -> dict:
    """Moves rows that do not belong in the tables to ``report["history"]`` (data kept, reason
    given), in place: a trained row whose model the bench cannot run any more (not in ``MODELS``,
    e.g. ``redrec-previous``: nothing can rerun or check it) and a row whose training hit a time
    cap (not trained to convergence, so not comparable; ML-1M's loo ``redrec-frozen-items``, which
    needs a GPU to rerun). Runs at every write, so such a row never reappears in a table; a rerun
    to convergence simply lands in the table again. Ratios follow the remaining rows."""
    from redrec.experiment import MODELS

    runnable = set(MODELS) if runnable is None else set(runnable)
    history = report.setdefault("history", [])
    for ds, protocols in (report.get("datasets") or {}).items():
        for protocol, entry in (protocols or {}).items():
            if not isinstance(entry, dict):
                continue
            models = entry.get("models") or {}
            moved = False
            for name in list(models):
                stopped = str((models[name] or {}).get("stopped") or "")
                reason = ("not runnable by this bench (no longer in redrec.experiment.MODELS)" if name not in runnable
                          else "time cap" if "time cap" in stopped else None)
                if reason is None:
                    continue
                row = {"dataset": ds, "protocol": protocol, "model": name, "reason": reason,
                       "result": (entry.get("results") or {}).pop(name, None), "run": models.pop(name)}
                history[:] = [h for h in history if (h["dataset"], h["protocol"], h["model"]) != (ds, protocol, name)] + [row]
                moved = True
            if moved and "results" in entry:
                entry["ndcg@10_ratio_to_sasrec"] = ratios(entry["results"])
    if not history:
        report.pop("history")
    return report


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
    ap.add_argument("--protocol", choices=PROTOCOLS, action="append", help="repeatable; default all three")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds; each model trains once per seed (mean, sd, per seed)")
    ap.add_argument("--models", help="comma-separated; default: " + ",".join(MAIN + ABLATIONS))
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--html-only", action="store_true")
    ap.add_argument("--to-history", action="store_true", help="move rows that are no table's (to_history) to 'history' in --output, re-render")
    ap.add_argument("--merge-from", action="append", metavar="JSON",
                    help="merge another run's rows into --output (repeatable): runs in parallel must not share a file")
    ap.add_argument("--merge-as", metavar="LABEL",
                    help="with --merge-from: keep the merged runs as their own sections '<protocol>@LABEL' "
                         "(e.g. a rerun on another machine) instead of replacing same-named rows")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the untrained rows (popularity, new-item popularity, content kNN): seconds, no model trains")
    ap.add_argument("--max-minutes", type=float, help="cap each model's training (reported as stopped: 'time cap')")
    args = ap.parse_args()

    path = Path(args.output)
    if args.to_history:
        report = to_history(json.loads(path.read_text()))
        path.write_text(json.dumps(report, indent=2))
        print(f"written {path} and {write_html(report, path.with_suffix('.html'))}")
        return 0
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
        to_history(report)
        path.write_text(json.dumps(report, indent=2))
        print(f"written {path} and {write_html(report, path.with_suffix('.html'))}")
        return 0
    models = [] if args.baselines_only else args.models.split(",") if args.models else MAIN + ABLATIONS
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated integers")
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds {args.seeds!r}: a seed twice")
    for name, raw in configs().items():
        if args.dataset and name not in args.dataset:
            continue
        loaded: dict[str, object] = {}
        for protocol in args.protocol or PROTOCOLS:
            # no-mixing is RED-Rec itself once the scenarios are collapsed into one
            todo = [m for m in models if not (protocol != "multi-scenario" and m == "redrec-no-mixing")]
            template = ModelConfig.model_validate(raw["model"])
            same = [m for m in todo if is_redrec_itself(template, m)]
            if same:
                print(f"[{name}/{protocol}] skipped {same}: this config's redrec already is that")
                todo = [m for m in todo if m not in same]
            if not todo and not args.baselines_only:
                continue
            if args.max_minutes:
                raw = {**raw, "train": {**raw["train"], "max_minutes": args.max_minutes}}
            run_raw = {**raw, "dataset_args": {**raw.get("dataset_args", {}), **PROTOCOL_DATASET_ARGS.get((name, protocol), {})}}
            key = json.dumps(run_raw.get("dataset_args", {}), sort_keys=True)
            t0 = time.time()
            outs = {}
            for seed in seeds:
                seeded = {**run_raw, "train": {**run_raw["train"], "seed": seed}}
                if len(seeds) > 1:
                    seeded["out_dir"] = str(Path(run_raw["out_dir"]) / f"seed{seed}")
                cfg = ExperimentConfig.model_validate({**seeded, "variants": todo, "protocols": [protocol]})
                if key not in loaded:
                    loaded[key] = load_dataset(cfg.dataset, **cfg.dataset_args)
                data = loaded[key]
                outs[seed] = run_protocol(cfg, protocol, data)
                print(f"\n== {name} / {protocol} / seed {seed} ==\n{outs[seed]['table']}")
            out = outs[seeds[0]]
            agg = aggregate_seeds(outs)
            # re-read: another filtered run may have written meanwhile
            report = json.loads(path.read_text()) if path.exists() else {}
            part = {"results": agg["results"], "models": {m: {**v, "machine": machine()} for m, v in agg["models"].items()},
                    "protocol": out["protocol"], "scenarios": out["scenarios"], "dataset": data.describe(), "config": run_raw,
                    **{k: out[k] for k in ("cutoff_ts", "new_items", "test_users", "new_items_hours") if k in out}}
            if args.baselines_only:
                part.pop("config")  # the section's trained rows keep the config they were trained with
            merge_report(report, {"datasets": {name: {protocol: part}}})
            to_history(report)
            report["machine"] = machine()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            print(f"\n== {name} / {protocol}: {time.time() - t0:.0f}s wall on {os.cpu_count()} cores, seeds {seeds} ==")
            for m, r in agg["results"].items():
                sd = (r.get("sd") or {}).get("overall", {}).get("ndcg@10")
                print(f"{m:<22} ndcg@10 {r['overall']['ndcg@10']:.4f}" + (f" ± {sd:.4f} ({r['n']})" if sd is not None else ""))
            write_html(report, path.with_suffix(".html"))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
