"""``redrec drift check`` (what the chart's CronJob runs) and ``redrec drift record-reference``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def _check(args) -> int:
    from redrec.drift.config import load_drift_config
    from redrec.drift.monitor import run_check

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "reference_dir": args.reference, "report_dir": args.out, "serving_log_dir": args.serving_log,
        "events": args.events or None, "window_hours": args.window_hours, "now": args.now,
        "kfp_host": args.kfp_host, "pipeline_id": args.pipeline_id, "pipeline_version_id": args.pipeline_version_id,
        "kfp_namespace": args.kfp_namespace, "local_pipeline": args.local_pipeline, "cooldown_hours": args.cooldown_hours,
        "trigger": False if args.no_trigger else None, "thresholds_path": args.thresholds,
    }
    try:
        cfg = load_drift_config(args.config, overrides)
    except ValueError as e:
        print(f"redrec drift check: {e}", file=sys.stderr)
        return 2
    summary, run_dir = run_check(cfg)
    print(f"{'scenario':<12} {'verdict':<18} {'drift share':>11}  top drifted")
    for s in summary["scenarios"]:
        share = "-" if s["drift_share"] is None else f"{s['drift_share']:.2f}"
        print(f"{s['scenario']:<12} {s['verdict']:<18} {share:>11}  {', '.join(s['top_drifted'][:4]) or '-'}")
    for p in summary["problems"]:
        print(f"problem: {p}", file=sys.stderr)
    if summary.get("trigger"):
        print(f"trigger: {'fired' if summary['trigger']['fired'] else 'not fired'}: {summary['trigger']['reason']}")
    print(f"report: {run_dir / 'index.html'} (status {summary['status']}, exit {summary['exit_code']})")
    return int(summary["exit_code"])


def _record(args) -> int:
    from redrec.data import load_dataset
    from redrec.drift.reference import record_reference

    if args.dataset:
        data = load_dataset(args.dataset)
        events, items = data.events, data.items
    elif args.events and args.items:
        import pandas as pd

        events, items = pd.read_parquet(args.events), pd.read_parquet(args.items)
    else:
        print("redrec drift record-reference: pass --dataset NAME, or --events and --items parquet files", file=sys.stderr)
        return 2
    if args.until is not None:
        events = events[events["ts"] < args.until]
    meta = {}
    if args.offline_metrics:
        meta["offline_metrics"] = json.loads(Path(args.offline_metrics).read_text())
    try:
        out = record_reference(events, items, args.out, model_dir=args.model, meta=meta, top_k=args.top_k, max_requests=args.max_requests,
                               requests_at=args.requests_at)
    except ValueError as e:
        print(f"redrec drift record-reference: {e}", file=sys.stderr)
        return 2
    print(f"reference written to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("drift", help="drift monitoring per scenario (Evidently) and the retraining trigger")
    sub = p.add_subparsers(dest="drift_cmd", required=True)

    c = sub.add_parser("check", help="compare the current window with the reference per scenario; retrain on drift")
    c.add_argument("--config", help="the chart's config.yaml (scenarios, serving.serving_log.dir, drift.*)")
    c.add_argument("--reference", help="reference dir written by record-reference / the pipeline (drift.reference_dir)")
    c.add_argument("--out", help="report dir; each run gets a sub-directory (drift.report_dir)")
    c.add_argument("--serving-log", help="serving log dir (env REDREC_SERVING_LOG_DIR)")
    c.add_argument("--events", action="append", type=Path, help="extra behaviour events (parquet/csv, canonical schema); repeatable")
    c.add_argument("--window-hours", type=float, help="length of the current window (default 24)")
    c.add_argument("--now", type=float, help="end of the current window, unix seconds (default: now)")
    c.add_argument("--thresholds", help="thresholds YAML (default monitoring/thresholds.yaml)")
    c.add_argument("--kfp-host", help="KFP API endpoint: start retraining on the cluster through kfp.Client")
    c.add_argument("--pipeline-id", help="ID of the uploaded training pipeline (cluster)")
    c.add_argument("--pipeline-version-id", help="pipeline version (default: its latest)")
    c.add_argument("--kfp-namespace", help="KFP namespace / profile (env REDREC_KFP_NAMESPACE)")
    c.add_argument("--local-pipeline", help="module:function of the pipeline run with kfp.local when no --kfp-host")
    c.add_argument("--cooldown-hours", type=float, help="minimum time between two retraining runs (default 6)")
    c.add_argument("--no-trigger", action="store_true", help="report only; never start retraining")
    c.set_defaults(func=_check)

    r = sub.add_parser("record-reference", help="record the training window as the drift reference")
    r.add_argument("--dataset", help="dataset adapter name (movielens-1m, synthetic)")
    r.add_argument("--events", help="events parquet (canonical schema)")
    r.add_argument("--items", help="items parquet (canonical schema)")
    r.add_argument("--until", type=int, help="only events before this unix time (the training window's end)")
    r.add_argument("--model", help="exported serving checkpoint dir: adds user-embedding and score references")
    r.add_argument("--offline-metrics", help="JSON {scenario: {'hr@10': ...}} from the offline evaluation")
    r.add_argument("--top-k", type=int, default=10)
    r.add_argument("--max-requests", type=int, default=2000, help="replayed requests per scenario for the model-side reference")
    r.add_argument("--requests-at", choices=["window-end", "events"], default="window-end",
                   help="model-side reference: sampled users as they stand at the window's end (returning users) "
                        "or at their past events (users arriving during the window)")
    r.add_argument("--out", required=True)
    r.set_defaults(func=_record)
