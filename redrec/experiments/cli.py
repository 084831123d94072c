"""``redrec ab report``: the A/B analysis of a serving log directory."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cmd_report(args) -> int:
    from redrec.experiments.report import InterleavedLog, analyse, format_text, write_report

    spec = None
    if args.config:
        from redrec.serving.config import ConfigError, ServingConfig

        try:
            spec = ServingConfig.from_yaml(args.config).experiment
        except ConfigError as e:
            print(f"error: {e}")
            return 2
    log_dir = args.log_dir or os.environ.get("REDREC_SERVING_LOG_DIR")
    if not log_dir:
        print("error: --log-dir: give the serving log directory (or set REDREC_SERVING_LOG_DIR)")
        return 2
    if spec is not None and spec.interleaved:
        return _interleaving(log_dir, spec, args)
    try:
        rep = analyse(log_dir, spec, control=args.control, confidence=args.confidence, pre_days=args.pre_days,
                      seq_tau=args.seq_tau)
    except InterleavedLog:
        return _interleaving(log_dir, spec, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    _emit(write_report(rep, args.out), format_text(rep))
    breached = any(d["guardrails_breached"] for d in rep.decisions.values())
    return 1 if (args.fail_on_srm and rep.srm.get("mismatch")) or (args.fail_on_guardrail and breached) else 0


def _interleaving(log_dir: str, spec, args) -> int:
    from redrec.experiments.interleaving_report import (analyse_interleaving, format_interleaving,
                                                        write_interleaving_report)

    try:
        rep = analyse_interleaving(log_dir, spec, confidence=args.confidence)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    _emit(write_interleaving_report(rep, args.out), format_interleaving(rep))
    return 0


def _emit(paths: dict, text: str) -> None:
    """The report's table, then where its files are (one JSON line, for scripts)."""
    print(text)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def register(subparsers) -> None:
    p = subparsers.add_parser("ab", help="A/B experiments")
    sub = p.add_subparsers(dest="ab_command", required=True)
    r = sub.add_parser("report", help="per arm and scenario CTR / hit rate, lift with CI (raw and CUPED), always-valid p/CI, "
                                         "BH across the table, guardrails, SRM check; for an interleaving experiment "
                                         "(experiment.type) the preference per scenario; HTML + JSON")
    r.add_argument("--log-dir", help="serving log dir (default: $REDREC_SERVING_LOG_DIR)")
    r.add_argument("--config", help="serving config.yaml (arms, shares, holdout) for the SRM check and arm order")
    r.add_argument("--control", help="control arm (default: the first arm)")
    r.add_argument("--confidence", type=float, default=0.95)
    r.add_argument("--out", default="ab-report", type=Path, help="output dir for ab_report.{json,html} and ab_lift.svg")
    r.add_argument("--fail-on-srm", action="store_true", help="exit 1 when the sample ratio mismatches")
    r.add_argument("--pre-days", type=float, default=14.0,
                   help="CUPED covariate: each user's positive feedback in this many days before the experiment's first "
                        "response (0 = no adjustment; default 14)")
    r.add_argument("--seq-tau", type=float, default=0.1,
                   help="always-valid test: mixing standard deviation on the relative-lift scale, fixed before the "
                        "experiment (default 0.1)")
    r.add_argument("--fail-on-guardrail", action="store_true",
                   help="exit 1 when a guardrail (latency_ms, fallback share) is significantly worse in an arm (BH-adjusted)")
    r.set_defaults(func=cmd_report)
