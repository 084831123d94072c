"""The evaluation step's metrics (``evaluate/metrics`` JSON) as a page: per-scenario bars per
model for NDCG@10 and HR@10, the candidate's validation curve and training loss against steps,
and the full table."""

from __future__ import annotations

from pathlib import Path

from redrec.reports.charts import finite, line_chart
from redrec.reports.render import PALETTE, render

METRICS = ("ndcg@10", "hr@10", "mrr")


def _chart(results: dict, scenarios: list[str], metric: str, w: int = 720, h: int = 240) -> dict:
    models = list(results)
    left, top, bottom = 20, 30, h - 34
    peak = max([results[m]["per_scenario"].get(s, {}).get(metric, 0.0) for m in models for s in scenarios] + [1e-9])
    gw = (w - left * 2) / len(scenarios)
    bw = gw * 0.8 / len(models)
    bars, groups = [], []
    for i, s in enumerate(scenarios):
        x0 = left + i * gw + gw * 0.1
        groups.append({"name": s, "x": round(left + i * gw + gw / 2, 1)})
        for j, m in enumerate(models):
            v = float(results[m]["per_scenario"].get(s, {}).get(metric, 0.0))
            hgt = (bottom - top) * v / peak
            bars.append({"x": round(x0 + j * bw, 1), "y": round(bottom - hgt, 1), "w": round(bw - 2, 1), "h": round(hgt, 1),
                         "color": PALETTE[j % len(PALETTE)], "value": v, "title": f"{m} {s} {metric} {v:.4f}"})
    legend = [{"name": m, "color": PALETTE[j % len(PALETTE)], "x": left + 110 * j} for j, m in enumerate(models)]
    return {"metric": metric, "w": w, "h": h, "bars": bars, "groups": groups, "legend": legend}


def _curves(curve: list[dict]) -> list[dict]:
    """Validation metrics and training loss per optimizer step, one chart each."""
    valid: dict[str, list] = {}
    loss: list = []
    for p in curve:
        step = finite(p.get("step"))
        if step is None:
            continue
        for k in ("ndcg@10", "hr@10"):
            v = finite((p.get("valid") or {}).get(k))
            if v is not None:
                valid.setdefault(f"valid {k}", []).append((step, v))
        if finite(p.get("loss")) is not None:
            loss.append((step, finite(p.get("loss"))))
    colors = {n: PALETTE[i] for i, n in enumerate([*valid, "loss"])}
    return [line_chart("candidate: validation metrics", valid, colors, "optimizer steps"),
            line_chart("candidate: training loss", {"loss": loss}, colors, "optimizer steps")]


def evaluation_html(metrics: dict) -> str:
    results = metrics["results"]
    first = next(iter(results.values()))
    scenarios = [*first["per_scenario"], "overall"]
    full = {m: {"per_scenario": {**r["per_scenario"], "overall": r["overall"]}} for m, r in results.items()}
    rows = [{"model": m, "scenario": s, "values": [float(full[m]["per_scenario"].get(s, {}).get(k, float("nan"))) for k in METRICS]}
            for m in results for s in scenarios]
    return render("evaluation.html", version=metrics.get("candidate_version"), production=metrics.get("production_version"),
                  charts=[_chart(full, scenarios, k) for k in ("ndcg@10", "hr@10")], rows=rows, metrics=METRICS,
                  curves=_curves(metrics.get("candidate_curve") or []), n_points=len(metrics.get("candidate_curve") or []))


def write_evaluation_html(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(evaluation_html(metrics), encoding="utf-8")
    return path
