"""Renders bench/results/quality.json as one self-contained HTML page.

For every dataset and protocol the page shows a results table (NDCG@10 / HR@10 / MRR per scenario
and overall, NDCG@10 ratio to SASRec, steps, stopping reason, best step, train minutes; best
NDCG@10 per column in bold), inline-SVG charts of validation NDCG@10 and of training loss against
training minutes, and a calibration line against the published references and our targets.
A row trained over several seeds reads "mean ± sd (n)". Rows moved out of the tables (a model the
bench can no longer run, a time-capped run) are listed under "history" with the reason.
Only inline CSS and SVG: the page is read from CI artefacts and laptops with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import jinja2

from redrec.reports.charts import finite, line_chart

ORDER = ["popularity", "new-item-popularity", "content-knn", "content-knn-whitened", "sasrec", "sasrec-text", "single-scenario", "redrec", "redrec-no-mixing", "redrec-no-side-info",
         "redrec-no-queries", "redrec-k2", "redrec-id-items", "redrec-frozen-items", "redrec-query-tokens",
         "redrec-next-item", "redrec-next-window"]
COLORS = ["#000000", "#aec7e8", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22", "#dbdb8d", "#9edae5",
          "#c5b0d5", "#f7b6d2"]
METRICS = [("ndcg@10", "NDCG@10"), ("hr@10", "HR@10"), ("mrr", "MRR")]
# published MovieLens-1M leave-one-out SASRec NDCG@10, and the targets this project holds itself to
REFERENCES = {"RecBole 1.2.1 SASRec": 0.1494, "gSASRec paper": 0.1726}
SASREC_TARGET, REDREC_TARGET, RATIO_TARGET = 0.145, 0.18, 1.25

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RED-Rec offline quality</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td.name{text-align:left;font-weight:600} tr.abl td.name{font-weight:normal;padding-left:1.2em}
.muted{color:#777} .pass{color:#1a7f37;font-weight:600} .fail{color:#c62828;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:1em} svg{background:#fff;border:1px solid #ddd}
svg text{font:11px system-ui,sans-serif} ul.cal{margin:.3em 0}
</style></head><body>
<h1>RED-Rec offline quality</h1>
<p class="muted">{{ machine }}</p>
{% from "macros.html" import line_chart as chart %}
{% for s in sections %}
<h2>{{ s.dataset }} &mdash; {{ s.protocol }}</h2>
<p class="muted">{{ s.description }}</p>
<table><thead><tr><th rowspan="2">model</th>{% for g in s.groups %}<th colspan="3">{{ g }}</th>{% endfor %}
<th rowspan="2">steps</th><th rowspan="2">stopped</th><th rowspan="2">best step</th><th rowspan="2">train min</th><th rowspan="2">machine</th></tr>
<tr>{% for g in s.groups %}{% for m in metrics %}<th>{{ m[1] }}</th>{% endfor %}{% endfor %}</tr></thead><tbody>
{% for r in s.rows %}<tr{% if r.ablation %} class="abl"{% endif %}><td class="name">{{ r.name }}</td>
{% for cell in r.cells %}<td>{% if cell.best %}<b>{{ cell.text }}</b>{% else %}{{ cell.text }}{% endif %}{% if cell.ratio %} <span class="muted">({{ cell.ratio }})</span>{% endif %}</td>{% endfor %}
<td>{{ r.steps }}</td><td>{{ r.stopped }}</td><td>{{ r.best_step }}</td><td>{{ r.minutes }}</td><td class="muted">{{ r.machine }}</td></tr>
{% endfor %}</tbody></table>
<div class="charts">{{ chart(s.valid_chart) }}{{ chart(s.loss_chart) }}</div>
<p><b>Calibration</b></p><ul class="cal">{% for line in s.calibration %}<li>{% for text, cls in line %}<span{% if cls %} class="{{ cls }}"{% endif %}>{{ text }}</span>{% endfor %}</li>{% endfor %}</ul>
{% else %}<p>No results yet.</p>{% endfor %}
{% if history %}<h2>history</h2>
<p class="muted">Rows kept for the record but out of the tables above: not comparable to them (see the reason).</p>
<table><thead><tr><th>dataset</th><th>protocol</th><th>model</th><th>reason</th>{% for m in metrics %}<th>{{ m[1] }}</th>{% endfor %}<th>steps</th><th>stopped</th><th>train min</th><th>machine</th></tr></thead><tbody>
{% for h in history %}<tr><td class="name">{{ h.dataset }}</td><td class="name">{{ h.protocol }}</td><td class="name">{{ h.model }}</td><td class="name">{{ h.reason }}</td>
{% for c in h.cells %}<td>{{ c }}</td>{% endfor %}<td>{{ h.steps }}</td><td>{{ h.stopped }}</td><td>{{ h.minutes }}</td><td class="muted">{{ h.machine }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
</body></html>
"""
# the reports' environment: its macros draw the charts
_PAGE = jinja2.Environment(loader=jinja2.PackageLoader("redrec.reports", "templates"), autoescape=True,
                           trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE)


_num = finite


def _fmt(x, digits: int = 4) -> str:
    x = _num(x)
    return "—" if x is None else f"{x:.{digits}f}"


def _cell_text(result: dict, col: str, key: str) -> str:
    """The metric, or "mean ± sd (n)" for a row averaged over training seeds."""
    src = result.get("overall") if col == "overall" else (result.get("per_scenario") or {}).get(col)
    v = _num((src or {}).get(key))
    sd_src = (result.get("sd") or {}).get("overall") if col == "overall" else ((result.get("sd") or {}).get("per_scenario") or {}).get(col)
    sd = _num((sd_src or {}).get(key))
    if v is None or sd is None:
        return _fmt(v)
    return f"{_fmt(v)} ± {_fmt(sd)} ({result.get('n', '?')})"


def _per_seed(m: dict, key: str):
    """Steps of a multi-seed row: every seed's, "a/b/c"; else the single run's."""
    runs = m.get("per_seed")
    if runs:
        return "/".join(str(r.get(key, "—")) for r in runs)
    return m.get(key, "—")


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _verdict(value, target: float) -> tuple[str, str]:
    if value is None:
        return ("not run", "muted")
    return ("pass", "pass") if value >= target else ("FAIL", "fail")


def base_protocol(key: str) -> str:
    """"loo@2-core CPU" -> "loo": a labelled section (a whole run from another machine, merged
    beside the main rows) follows the protocol its key starts with."""
    return key.split("@", 1)[0]


def _calibration(dataset: str, protocol: str, entry: dict, nd) -> list[list[tuple[str, str]]]:
    if base_protocol(protocol) == "new-items":
        line = f"{entry.get('new_items', '?')} new items, {entry.get('test_users', '?')} test users; no published reference. "
        line += "Cold-start bars: " + ", ".join(f"{n} {_fmt(nd(n, 'overall'))}" for n in ("new-item-popularity", "content-knn", "content-knn-whitened"))
        return [[(line, "muted")]]
    if base_protocol(protocol) == "loo":
        if "movielens" not in dataset.lower():
            return [[("published references and targets are MovieLens-1M figures; none apply here", "muted")]]
        sas, red = nd("sasrec", "overall"), nd("redrec", "overall")
        refs = ", ".join(f"{k} {v:.4f}" for k, v in REFERENCES.items())
        return [[(f"SASRec NDCG@10 {_fmt(sas)} (references: {refs}; target ≥ {SASREC_TARGET:.4f}) — ", ""),
                 _verdict(sas, SASREC_TARGET)],
                [(f"RED-Rec NDCG@10 {_fmt(red)} (target ≥ {REDREC_TARGET:.4f}) — ", ""), _verdict(red, REDREC_TARGET)]]
    lines = []
    for sc in entry.get("scenarios") or []:
        red, sas, single = nd("redrec", sc), nd("sasrec", sc), nd("single-scenario", sc)
        ratio = red / sas if red is not None and sas else None
        line = [(f"{sc}: RED-Rec/SASRec {_fmt(ratio, 2)}× (target ≥ {RATIO_TARGET:.2f}×) — ", ""),
                _verdict(ratio, RATIO_TARGET)]
        if red is not None and single is not None:
            line.append((f"; RED-Rec {_fmt(red)} vs single-scenario {_fmt(single)} — ", ""))
            line.append(("ahead", "pass") if red > single else ("behind", "fail"))
        lines.append(line)
    return lines or [[("no scenarios recorded", "muted")]]


def _section(dataset: str, protocol: str, entry: dict) -> dict:
    results, models = entry.get("results") or {}, entry.get("models") or {}
    names = _ordered(set(results) | set(models))
    colors = {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}
    scenarios = list(entry.get("scenarios") or []) if base_protocol(protocol) != "loo" else []
    cols = scenarios + ["overall"]

    def metrics(name: str, col: str) -> dict:
        r = results.get(name) or {}
        return (r.get("overall") if col == "overall" else (r.get("per_scenario") or {}).get(col)) or {}

    def nd(name: str, col: str) -> float | None:
        return _num(metrics(name, col).get("ndcg@10"))

    best = {c: max((v for v in (nd(n, c) for n in names) if v is not None), default=None) for c in cols}
    rows = []
    for name in names:
        cells = []
        for col in cols:
            for key, _ in METRICS:
                v = _num(metrics(name, col).get(key))
                cell = {"text": _cell_text(results.get(name) or {}, col, key), "best": False, "ratio": None}
                if key == "ndcg@10" and v is not None:
                    cell["best"] = v == best[col]
                    base = nd("sasrec", col)
                    if base and name != "sasrec":
                        cell["ratio"] = f"{v / base:.2f}×"
                cells.append(cell)
        m = models.get(name) or {}
        rows.append({"name": name, "cells": cells, "ablation": name.startswith("redrec-"),
                     "steps": _per_seed(m, "steps"), "best_step": _per_seed(m, "best_step"),
                     "stopped": (m.get("stopped") or "epochs") if m else "—",
                     "minutes": _fmt(_num(m.get("train_s")) / 60, 1) if _num(m.get("train_s")) is not None else "—",
                     "machine": machine_label(m.get("machine"), short=True) or "—"})
    valid, loss = {}, {}
    for name in names:
        for p in (models.get(name) or {}).get("curve") or []:
            t = _num(p.get("seconds"))
            if t is None:
                continue
            v = _num((p.get("valid") or {}).get("ndcg@10"))
            if v is not None:
                valid.setdefault(name, []).append((t / 60, v))
            if _num(p.get("loss")) is not None:
                loss.setdefault(name, []).append((t / 60, _num(p.get("loss"))))
    ds = entry.get("dataset") or {}
    desc = ", ".join(f"{k} {ds[k]:,}" for k in ("users", "items", "events") if isinstance(ds.get(k), int))
    return {"dataset": dataset, "protocol": protocol, "groups": cols, "rows": rows,
            "description": "; ".join(x for x in (entry.get("protocol", ""), desc) if x),
            "valid_chart": line_chart("validation NDCG@10", valid, colors, "training minutes"),
            "loss_chart": line_chart("training loss", loss, colors, "training minutes"),
            "calibration": _calibration(dataset, protocol, entry, nd)}


def machine_label(m: dict | None, short: bool = False) -> str:
    """Where a row was measured. Rows of one report can come from different machines (GPU runs
    merged into CPU ones), and a training minute on one is not a minute on the other."""
    m = m or {}
    parts = [m.get("gpu"), m.get("cpu"), f"{m['cpu_count']} cores" if m.get("cpu_count") else None]
    if not short:
        parts += [m.get("platform"), f"Python {m['python']}" if m.get("python") else None]
    return " · ".join(str(x) for x in parts if x)


def render(report: dict) -> str:
    # the report's own machine is only the last run's: name every machine its rows came from
    seen = {machine_label(m.get("machine"), short=True) for protocols in (report.get("datasets") or {}).values()
            if isinstance(protocols, dict) for entry in protocols.values() if isinstance(entry, dict)
            for m in (entry.get("models") or {}).values() if isinstance(m, dict)} - {""}
    machine = ("rows measured on: " + "; ".join(sorted(seen))) if len(seen) > 1 else machine_label(report.get("machine"))
    sections = []
    for dataset, protocols in (report.get("datasets") or {}).items():
        if isinstance(protocols, dict) and "results" in protocols:  # pre-protocol layout: one entry per dataset
            protocols = {"multi-scenario": protocols}
        for protocol, entry in (protocols or {}).items():
            if isinstance(entry, dict):
                sections.append(_section(dataset, protocol, entry))
    history = []
    for h in report.get("history") or []:
        res, m = h.get("result") or {}, h.get("run") or {}
        history.append({"dataset": h.get("dataset"), "protocol": h.get("protocol"), "model": h.get("model"), "reason": h.get("reason"),
                        "cells": [_cell_text(res, "overall", k) for k, _ in METRICS], "steps": m.get("steps", "—"),
                        "stopped": m.get("stopped") or "—",
                        "minutes": _fmt(_num(m.get("train_s")) / 60, 1) if _num(m.get("train_s")) is not None else "—",
                        "machine": machine_label(m.get("machine"), short=True) or "—"})
    return _PAGE.render(machine=machine or "machine unknown", sections=sections, metrics=METRICS, history=history)


def write_html(report: dict, path: Path | str) -> Path:
    """Renders `report` to `path` atomically, so a browser refresh mid-run never sees half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(report), encoding="utf-8")
    os.replace(tmp, path)
    return path
