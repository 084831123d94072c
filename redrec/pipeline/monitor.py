"""The monitoring pipeline's first step: per-scenario drift of the serving log vs the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

from redrec.pipeline.outputs import atomic_output, progress


def check_drift(workspace: str, serving_log_dir: str, scenarios: list, since_hours: float, report_out: str | Path) -> bool:
    """True when any scenario drifted (``redrec.drift.monitor.run_check``, with its trigger off:
    in this pipeline the retraining is the next steps, behind ``dsl.If``)."""
    from redrec.drift.config import DriftConfig
    from redrec.drift.monitor import run_check
    from redrec.drift.reference import load_reference

    with progress("drift-check"):
        ws = Path(workspace)
        ref_dir = ws / "drift" / "reference"
        if not scenarios:
            scenarios = list((load_reference(ref_dir).info.get("events_per_scenario") or {}).keys())
        cfg = DriftConfig(scenarios=scenarios, reference_dir=ref_dir, report_dir=ws / "drift" / "reports",
                          serving_log_dir=Path(serving_log_dir) if serving_log_dir else ws / "serving-log",
                          window_hours=since_hours, trigger=False)
        summary, report = run_check(cfg)
        if summary.get("status") == "error":
            raise RuntimeError(f"drift check failed: {summary.get('problems')}")
        report = Path(report)
        html = report if report.suffix == ".html" else next(iter(sorted(report.glob("*.html"))), None)
        with atomic_output(report_out) as tmp:
            if html is not None:
                shutil.copyfile(html, tmp)
            else:
                tmp.write_text(f"<pre>{summary}</pre>")
        drifted = list(summary.get("drifted") or [])
        print(f"[redrec-pipeline] drift: {drifted or 'none'} of {scenarios}", flush=True)
    return bool(drifted)
