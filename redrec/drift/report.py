"""Write one run: a self-contained HTML page per scenario, ``summary.json`` for machines and an
``index.html`` listing the scenarios; then refresh the history page over all runs.

The run is assembled in a hidden temp dir and renamed into place, so a reader (or the history
page) never sees half a run. Each scenario page starts with a plain-HTML summary an on-call
engineer can read without scrolling: verdict, drift share, the drifted features worst first and
what the monitor did about it; Evidently's interactive dashboard for the scenario follows.
"""

from __future__ import annotations

import json
import os
import shutil
from html import escape
from pathlib import Path

from evidently.core.metric_types import render_widgets

from redrec.drift.checks import ScenarioResult
from redrec.reports import render
from redrec.reports.render import PALETTE

SUMMARY_FORMAT = "redrec-drift-summary/1"


def scenario_header(res: ScenarioResult, summary: dict, has_widgets: bool = True) -> str:
    b = res.check("behaviour")
    share = "-" if res.drift_share is None else (
        f"{res.drift_share:.2f} ({sum(f.drifted for f in b.features)} of {len(b.features)} behaviour features; "
        f"alarm at {b.threshold:.2f})")
    return render("drift_header.html", res=res, summary=summary, share=share, drifted=res.drifted_features(),
                  features=b.features if b else [], ref_window=summary["reference"].get("window") or {"start": None, "end": None},
                  has_widgets=has_widgets)


def scenario_html(res: ScenarioResult, summary: dict) -> str:
    """Evidently's own page for the scenario (one dashboard, one embedded JS bundle), with the
    plain summary an on-call engineer reads first at its top."""
    widgets = [w for snap in res.snapshots for w in snap._widgets]
    title = f"<title>{escape(res.scenario)} drift</title>"
    header = scenario_header(res, summary, has_widgets=bool(widgets))
    style = render("style.html")
    if not widgets:
        return f'<!DOCTYPE html><html lang="en"><head><meta charset="UTF-8">{title}{style}</head><body>{header}</body></html>'
    page = render_widgets(widgets)
    page = page.replace("<head>", f"<head>{title}{style}", 1)
    return page.replace("<body>", "<body>" + header, 1)


def index_html(summary: dict) -> str:
    return render("drift_index.html", summary=summary)


def _history_chart(runs: list[dict], w: int = 760, h: int = 240, left: int = 44) -> dict:
    """Per scenario, its behaviour drift share in each run (oldest first), as SVG coordinates."""
    ordered = list(reversed(runs))
    scen = sorted({x["scenario"] for r in ordered for x in r["scenarios"] if x.get("drift_share") is not None})
    alarm = next((c.get("threshold") for r in ordered for x in r["scenarios"] for c in x.get("checks", [])
                  if c.get("name") == "behaviour" and c.get("threshold")), 0.3)
    top, bottom = 12, h - 20
    xs = lambda i: left + (i + 0.5) * (w - left - 90) / max(len(ordered), 1)  # noqa: E731
    ys = lambda v: bottom - (bottom - top) * min(max(v, 0.0), 1.0)  # noqa: E731
    series = []
    for k, s in enumerate(scen):
        pts = [(round(xs(i), 1), round(ys(x["drift_share"]), 1)) for i, r in enumerate(ordered)
               for x in r["scenarios"] if x["scenario"] == s and x.get("drift_share") is not None]
        series.append({"name": s, "color": PALETTE[k % len(PALETTE)], "marks": pts,
                       "points": " ".join(f"{x},{y}" for x, y in pts), "label_y": top + 12 + 14 * k})
    return {"w": w, "h": h, "left": left, "series": series, "alarm": alarm, "alarm_y": round(ys(alarm), 1),
            "yticks": [(round(ys(v), 1), f"{v:.2f}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]}


def history_html(report_dir: Path) -> str:
    runs = []
    for d in sorted((p for p in report_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True):
        try:
            s = json.loads((d / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        trig = s.get("trigger") or {}
        runs.append({"name": d.name, "status": s.get("status", "?"), "scenarios": s.get("scenarios", []),
                     "drifted": ", ".join(x["scenario"] for x in s.get("scenarios", []) if x["verdict"] == "drift"),
                     "fired": bool(trig.get("fired")), "reason": trig.get("reason") or ""})
    return render("drift_history.html", runs=runs, chart=_history_chart(runs))


def write_run(report_dir: Path, summary: dict, results: list[ScenarioResult]) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    final = report_dir / summary["run_id"]
    n = 1
    while final.exists():  # two checks in one second (manual + CronJob) keep both
        final = report_dir / f"{summary['run_id']}-{n}"
        n += 1
    summary["run_id"] = final.name
    tmp = report_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary["reports"] = {r.scenario: f"{r.scenario}.html" for r in results}
        for r in results:
            (tmp / f"{r.scenario}.html").write_text(scenario_html(r, summary), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (tmp / "index.html").write_text(index_html(summary), encoding="utf-8")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hist = report_dir / ".index.html.tmp"
    hist.write_text(history_html(report_dir), encoding="utf-8")
    os.replace(hist, report_dir / "index.html")
    return final
