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
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from evidently.core.metric_types import render_widgets

from redrec.drift.checks import ScenarioResult

SUMMARY_FORMAT = "redrec-drift-summary/1"
_COLORS = {"drift": "#c62828", "ok": "#2e7d32", "insufficient_data": "#6d6d6d", "error": "#e65100", "skipped": "#6d6d6d", "alert": "#ad1457"}
_LABEL = {"drift": "DRIFTED", "ok": "OK", "insufficient_data": "INSUFFICIENT DATA", "error": "ERROR", "skipped": "skipped", "alert": "ALERT"}
_STYLE = """<style>
.rr{font-family:system-ui,Arial,sans-serif;margin:16px 24px;color:#222}
.rr table{border-collapse:collapse;margin:8px 0 16px}
.rr td,.rr th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
.rr th{background:#f3f3f3}.rr .badge{color:#fff;padding:2px 8px;border-radius:4px;font-weight:bold}
.rr .drifted{background:#fdecea}.rr h1{font-size:22px}.rr h2{font-size:18px;margin-top:18px}
</style>"""


def _iso(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def badge(status: str) -> str:
    return f'<span class="badge" style="background:{_COLORS.get(status, "#555")}">{_LABEL.get(status, escape(status))}</span>'


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else escape(str(v))


def _trigger_line(trigger: dict | None) -> str:
    if not trigger:
        return "no trigger evaluated"
    what = "retraining STARTED" if trigger.get("fired") else "retraining not started"
    extra = f" (run {escape(str(trigger['run_id']))}, state {escape(str(trigger.get('state')))})" if trigger.get("fired") and trigger.get("run_id") else ""
    return f"<b>{what}</b>{extra}: {escape(trigger.get('reason') or '')}"


def scenario_header(res: ScenarioResult, summary: dict) -> str:
    drifted = res.drifted_features()
    b = res.check("behaviour")
    share = "-" if res.drift_share is None else f"{res.drift_share:.2f} ({sum(f.drifted for f in b.features)} of {len(b.features)} behaviour features; alarm at {b.threshold:.2f})"
    top = "".join(
        f"<li><b>{escape(f.name)}</b>: {escape(f.method)} {_num(f.score)} vs threshold {_num(f.threshold)}</li>" for f in drifted
    ) or "<li>none</li>"
    checks = "".join(
        f'<tr class="{"drifted" if c.status == "drift" else ""}"><td>{escape(c.name)}</td><td>{badge(c.status)}</td><td>{escape(c.method or "-")}</td>'
        f"<td>{_num(c.score)}</td><td>{_num(c.threshold)}</td><td>{c.n_reference}</td><td>{c.n_current}</td><td>{escape(c.message or '')}</td></tr>"
        for c in res.checks
    )
    feats = "".join(
        f'<tr class="{"drifted" if f.drifted else ""}"><td>{escape(f.name)}</td><td>{"DRIFT" if f.drifted else "ok"}</td><td>{escape(f.method)}</td>'
        f"<td>{_num(f.score)}</td><td>{_num(f.threshold)}</td><td>{f.n_reference}</td><td>{f.n_current}</td></tr>"
        for f in (b.features if b else [])
    )
    problems = "".join(f"<li>{escape(p)}</li>" for p in res.problems)
    notes = "".join(f"<li>{escape(n)}</li>" for n in res.notes)
    win = summary.get("window", {})
    return f"""<div class="rr" id="redrec-summary">
<h1 id="verdict">Scenario <b>{escape(res.scenario)}</b> {badge(res.verdict)}</h1>
<p>Run {escape(summary['run_id'])} &middot; current window {_iso(win.get('start'))} to {_iso(win.get('end'))} &middot;
reference {_iso(summary['reference'].get('window', {}).get('start'))} to {_iso(summary['reference'].get('window', {}).get('end'))}</p>
<p><b>Drift share</b>: {share}</p>
<h2>Drifted (worst first)</h2><ul id="top-drifted">{top}</ul>
{f'<h2>Notes</h2><ul id="notes">{notes}</ul>' if notes else ''}
<h2>What happened next</h2><p id="next">{_trigger_line(summary.get('trigger'))}</p>
<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>method</th><th>score</th><th>threshold</th><th>n ref</th><th>n current</th><th>note</th></tr>{checks}</table>
<h2>Behaviour features</h2><table><tr><th>feature</th><th>drift</th><th>method</th><th>score</th><th>threshold</th><th>n ref</th><th>n current</th></tr>{feats}</table>
{f'<h2>Problems</h2><ul id="problems">{problems}</ul>' if problems else ''}
<p><a href="index.html">all scenarios of this run</a> &middot; <a href="summary.json">summary.json</a></p>
<h2>Evidently details</h2></div>"""


def scenario_html(res: ScenarioResult, summary: dict) -> str:
    header = scenario_header(res, summary)
    widgets = [w for snap in res.snapshots for w in snap._widgets]  # one dashboard, one embedded JS bundle
    if not widgets:
        return f'<!DOCTYPE html><html lang="en"><head><meta charset="UTF-8"><title>{escape(res.scenario)} drift</title>{_STYLE}</head><body>{header}<p class="rr">no Evidently report: nothing was compared (see the checks above)</p></body></html>'
    page = render_widgets(widgets)
    page = page.replace("<head>", f"<head><title>{escape(res.scenario)} drift</title>{_STYLE}", 1)
    return page.replace("<body>", "<body>" + header, 1)


def index_html(summary: dict) -> str:
    rows = "".join(
        f'<tr class="{"drifted" if s["verdict"] == "drift" else ""}"><td><a href="{escape(summary["reports"].get(s["scenario"], ""))}">{escape(s["scenario"])}</a></td>'
        f'<td>{badge(s["verdict"])}</td><td>{_num(s["drift_share"])}</td><td>{escape(", ".join(s["top_drifted"][:5]) or "-")}</td>'
        f'<td>{escape("; ".join(s["problems"] + s["notes"])[:400])}</td></tr>'
        for s in summary["scenarios"]
    )
    problems = "".join(f"<li>{escape(p)}</li>" for p in summary.get("problems", []))
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="UTF-8"><title>RED-Rec drift {escape(summary['run_id'])}</title>{_STYLE}</head>
<body><div class="rr"><h1>RED-Rec drift check {escape(summary['run_id'])} {badge(summary['status'])}</h1>
<p>current window {_iso(summary['window'].get('start'))} to {_iso(summary['window'].get('end'))} &middot; exit code {summary['exit_code']}</p>
<p id="next">{_trigger_line(summary.get('trigger'))}</p>
<table id="scenarios"><tr><th>scenario</th><th>verdict</th><th>drift share</th><th>top drifted features</th><th>problems / notes</th></tr>{rows}</table>
{f'<h2>Problems</h2><ul id="problems">{problems}</ul>' if problems else ''}
<p><a href="summary.json">summary.json</a> &middot; <a href="../index.html">all runs</a></p></div></body></html>"""


def history_html(report_dir: Path) -> str:
    rows = []
    for d in sorted((p for p in report_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True):
        try:
            s = json.loads((d / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        drifted = ", ".join(x["scenario"] for x in s.get("scenarios", []) if x["verdict"] == "drift") or "-"
        trig = s.get("trigger") or {}
        rows.append(f'<tr><td><a href="{escape(d.name)}/index.html">{escape(d.name)}</a></td><td>{badge(s.get("status", "?"))}</td>'
                    f'<td>{escape(drifted)}</td><td>{"started" if trig.get("fired") else "-"}</td><td>{escape(trig.get("reason") or "")}</td></tr>')
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="UTF-8"><title>RED-Rec drift history</title>{_STYLE}</head>
<body><div class="rr"><h1>RED-Rec drift checks</h1><table><tr><th>run</th><th>status</th><th>drifted scenarios</th><th>retraining</th><th>why</th></tr>{''.join(rows)}</table></div></body></html>"""


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
