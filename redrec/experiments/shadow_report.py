"""The shadow report: how a candidate in shadow (``redrec.serving.shadow``) answered the mirrored
live requests, next to what production answered them, and whether that agrees with what its
offline evaluation promised. ``redrec release shadow-report`` writes it; ``redrec release promote
--require-shadow`` reads its JSON (``gate``).

Per scenario: overlap@10 (the share of production's top 10 the candidate also ranks in its top
10) and Kendall's tau-b over the union of the two top-k lists (an item missing from one list is
ranked just below that list's end, tied with the other missing ones); the score distributions
(quantiles over every listed item); the candidate's latency (its user-tower forward and search,
for the shadow batch the request was in: p50/p95/p99); error and drop rates (drops come from the
shadow's bounded queue, and are not attributed to a scenario).

Offline vs shadow: the candidate's offline NDCG@10 delta vs production's (their release records
in the model store) next to an on-traffic replay: of the items users acted on positively after a
mirrored response (feedback joined by request_id), the share in the candidate's top-k vs in
production's. The replay favours production (users could only click what production showed), so
the pair "agrees" when the signs match; a disagreement is a prompt to look, not a verdict.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from redrec.experiments.log import read_feedback, shadow_files
from redrec.experiments.report import POSITIVE_ACTIONS

TOP = 10
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
OFFLINE_METRIC = "ndcg@10"
REPORT_JSON = "shadow_report.json"


def read_shadow_log(log_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(scored lines, drop lines, malformed lines skipped) of every ``shadow-*.jsonl`` under ``log_dir``."""
    d = Path(log_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"serving log dir {d} does not exist")
    scored, drops, bad = [], [], 0
    for path in shadow_files(d):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1  # a torn last line
                    continue
                if not isinstance(rec, dict):
                    bad += 1
                elif rec.get("event") == "dropped":
                    drops.append(rec)
                elif rec.get("request_id") and rec.get("candidate_version"):
                    scored.append(rec)
                else:
                    bad += 1
    return pd.DataFrame(scored), pd.DataFrame(drops, columns=["ts", "event", "reason", "n"]), bad


def overlap_at(a: list, b: list, k: int = TOP) -> float:
    """|a[:k] & b[:k]| / the shorter list's length (at most k); NaN when either is empty."""
    a, b = list(a)[:k], list(b)[:k]
    n = min(len(a), len(b))
    return len(set(a) & set(b)) / n if n else math.nan


def union_tau(a: list, b: list) -> float:
    """Kendall's tau-b of the two rankings over the union of their items (a missing item ranked
    just below the list's end, tied with the others missing); NaN below two items."""
    union = list(dict.fromkeys([*a, *b]))
    if len(union) < 2:
        return math.nan
    ra = {it: r for r, it in enumerate(a)}
    rb = {it: r for r, it in enumerate(b)}
    x = [ra.get(it, len(a)) for it in union]
    y = [rb.get(it, len(b)) for it in union]
    tau = kendalltau(x, y).statistic
    return float(tau) if tau is not None and np.isfinite(tau) else math.nan


def _quantiles(values) -> dict:
    v = np.asarray([float(s) for s in values], dtype=float)
    return {f"q{int(q * 100):02d}": (float(np.quantile(v, q)) if len(v) else None) for q in QUANTILES}


def _pct(values, q) -> float | None:
    v = np.asarray(values, dtype=float)
    return float(np.percentile(v, q)) if len(v) else None


def _nanmean(values) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def _block(df: pd.DataFrame, clicks: dict[str, set[str]]) -> dict:
    ok = df[df["error"].isna()] if len(df) else df
    out = {"requests": int(len(df)), "errors": int(len(df) - len(ok)),
           "error_rate": float((len(df) - len(ok)) / len(df)) if len(df) else None}
    out["overlap@10"] = _nanmean([overlap_at(c, p) for c, p in zip(ok["candidate_items"], ok["production_items"])])
    out["kendall_tau_b"] = _nanmean([union_tau(c, p) for c, p in zip(ok["candidate_items"], ok["production_items"])])
    out["candidate_scores"] = _quantiles(s for row in ok["candidate_scores"] for s in row)
    out["production_scores"] = _quantiles(s for row in ok["production_scores"] for s in row)
    lat = df["latency_ms"].dropna() if len(df) else []
    out["latency_ms"] = {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99)}
    out["queue_ms_p99"] = _pct(df["queue_ms"].dropna(), 99) if len(df) else None
    # the replay: positive feedback on a mirrored response, per side whether the item was in its list
    hit_c = hit_p = n = 0
    for rid, c, p in zip(ok["request_id"], ok["candidate_items"], ok["production_items"]):
        for item in clicks.get(rid, ()):
            n += 1
            hit_c += item in c
            hit_p += item in p
    out["replay"] = {"clicked_items": n, "in_candidate": (hit_c / n) if n else None, "in_production": (hit_p / n) if n else None}
    return out


def _offline(store, candidate: str, production: str | None) -> dict:
    """The candidate's and production's offline metric from their release records in the store."""
    out = {"metric": OFFLINE_METRIC, "candidate": None, "production": None, "delta": None}
    if store is None:
        out["note"] = "no model store given (--config): offline metrics not read"
        return out
    for side, v in (("candidate", candidate), ("production", production)):
        try:
            rel = (store.manifest(v).get("release") or {}) if v and store.has(v) else {}
        except Exception:  # noqa: BLE001 - a missing record is reported, not fatal
            rel = {}
        out[side] = ((rel.get("metrics") or {}).get("overall") or {}).get(OFFLINE_METRIC)
    if out["candidate"] is not None and out["production"] is not None:
        out["delta"] = out["candidate"] - out["production"]
    else:
        out["note"] = "a release record without offline metrics (stored outside the pipeline's deploy step?)"
    return out


def _agreement(offline: dict, replay: dict) -> dict:
    if offline.get("delta") is None or replay.get("in_candidate") is None:
        return {"replay_delta": None, "verdict": "unknown", "why": "needs both the offline delta and replayed clicks"}
    rd = replay["in_candidate"] - replay["in_production"]
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    agree = sign(rd) == sign(offline["delta"])
    return {"replay_delta": rd, "verdict": "agree" if agree else "disagree",
            "why": f"offline {OFFLINE_METRIC} delta {offline['delta']:+.4f}, replay hit delta {rd:+.4f}"}


def analyse(log_dir: str | Path, version: str | None = None, store=None,
            positive_actions: tuple[str, ...] = POSITIVE_ACTIONS) -> dict:
    """The report as a JSON-ready dict, for candidate ``version`` (default: the one with the most
    mirrored requests in the log)."""
    lines, drops, bad = read_shadow_log(log_dir)
    if lines.empty:
        raise ValueError(f"no shadow log lines under {log_dir} (files shadow-*.jsonl): is a candidate in shadow "
                         "(`redrec release shadow <version>`), and has it taken traffic?")
    versions = lines["candidate_version"].astype(str).value_counts()
    version = version or str(versions.index[0])
    if version not in versions.index:
        raise ValueError(f"--version: no shadow lines of candidate {version!r}; the log holds {sorted(versions.index)}")
    df = lines[lines["candidate_version"].astype(str) == version].copy()
    if "error" not in df:
        df["error"] = None
    df["error"] = df["error"].where(df["error"].notna(), None)
    try:
        fb = read_feedback(log_dir)
    except FileNotFoundError:
        fb = pd.DataFrame(columns=["request_id", "item_id", "action"])
    fb = fb[fb["action"].isin(positive_actions) & fb["request_id"].notna()]
    fb = fb[fb["request_id"].isin(set(df["request_id"]))]
    clicks: dict[str, set[str]] = {}
    for rid, item in zip(fb["request_id"], fb["item_id"]):
        clicks.setdefault(str(rid), set()).add(str(item))
    prod_versions = df["production_version"].astype(str).value_counts()
    production = str(prod_versions.index[0]) if len(prod_versions) else None
    overall = _block(df, clicks)
    # drop lines name no candidate: in a log of one candidate at a time they are its; a time
    # filter keeps another candidate's stretch out
    t0, t1 = float(df["ts"].min()), float(df["ts"].max())
    dropped = int(drops[(drops["ts"] >= t0 - 60) & (drops["ts"] <= t1 + 60)]["n"].sum()) if len(drops) else 0
    overall["dropped"] = dropped
    overall["drop_rate"] = dropped / (dropped + len(df)) if (dropped + len(df)) else None
    offline = _offline(store, version, production)
    return {
        "candidate_version": version, "production_version": production,
        "production_versions": {str(k): int(v) for k, v in prod_versions.items()},
        "log_dir": str(log_dir), "generated": time.time(), "window": [t0, t1], "skipped_lines": bad,
        "overall": overall,
        "per_scenario": {str(s): _block(g, clicks) for s, g in df.groupby("scenario")},
        "offline": offline, "agreement": _agreement(offline, overall["replay"]),
        "rank_correlation": "Kendall's tau-b over the union of the two top-k lists (a missing item ranked just below "
                            "the list's end, tied)",
        "histogram": _histogram(df[df["error"].isna()]),
    }


def _histogram(df: pd.DataFrame, bins: int = 20) -> dict | None:
    c = [float(s) for row in df["candidate_scores"] for s in row] if len(df) else []
    p = [float(s) for row in df["production_scores"] for s in row] if len(df) else []
    if not c and not p:
        return None
    lo, hi = min(c + p), max(c + p)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    return {"edges": edges.tolist(), "candidate": np.histogram(c, edges)[0].tolist(),
            "production": np.histogram(p, edges)[0].tolist()}


# ---- the gate ---------------------------------------------------------------------------------
def gate_failures(rep: dict, version: str, gate) -> list[str]:
    """Why ``rep`` does not pass ``gate`` (``redrec.pipeline.config.ShadowGate``) for ``version``; [] passes."""
    if rep.get("candidate_version") != version:
        return [f"the report is of candidate {rep.get('candidate_version')!r}, not {version!r}"]
    o = rep.get("overall") or {}
    out = []
    n = o.get("requests") or 0
    if n < gate.min_requests:
        out.append(f"{n} mirrored requests < release.shadow_gate.min_requests {gate.min_requests}: let the shadow "
                   "take more traffic (or raise its share) and write the report again")
    checks = (("error_rate", "max_error_rate", lambda v, t: v > t, "errors"),
              ("drop_rate", "max_drop_rate", lambda v, t: v > t, "mirrors dropped (raise shadow.max_in_flight?)"))
    for key, field, bad, what in checks:
        v, t = o.get(key), getattr(gate, field)
        if v is not None and bad(v, t):
            out.append(f"{key} {v:.4f} > release.shadow_gate.{field} {t:g}: {what}")
    p99 = (o.get("latency_ms") or {}).get("p99")
    if p99 is not None and p99 > gate.max_p99_latency_ms:
        out.append(f"p99 latency {p99:.1f} ms > release.shadow_gate.max_p99_latency_ms {gate.max_p99_latency_ms:g}")
    ov = o.get("overlap@10")
    if gate.min_overlap > 0 and (ov is None or ov < gate.min_overlap):
        out.append(f"overlap@10 {ov if ov is None else round(ov, 4)} < release.shadow_gate.min_overlap {gate.min_overlap:g}")
    return out


# ---- rendering --------------------------------------------------------------------------------
def _hist_chart(h: dict | None, w: int = 640, height: int = 220) -> dict | None:
    if not h:
        return None
    left, right, top, bottom = 48, w - 10, 24, height - 34
    peak = max(max(h["candidate"]), max(h["production"]), 1)
    n = len(h["candidate"])
    bw = (right - left) / n
    bars = []
    for side, color, off in (("production", "#7f7f7f", 0.0), ("candidate", "#1f77b4", 0.5)):
        for i, c in enumerate(h[side]):
            hh = (bottom - top) * c / peak
            bars.append({"x": round(left + i * bw + off * bw, 1), "y": round(bottom - hh, 1), "w": round(max(bw / 2 - 1, 1), 1),
                         "h": round(hh, 1), "color": color,
                         "title": f"{side}: {c} scores in [{h['edges'][i]:.3g}, {h['edges'][i + 1]:.3g})"})
    labels = [{"x": round(left + i * bw, 1), "text": f"{h['edges'][i]:.3g}"} for i in range(0, n + 1, max(1, n // 5))]
    return {"w": w, "h": height, "bottom": bottom, "left": left, "peak": peak, "bars": bars, "labels": labels}


def render_html(rep: dict, gate_result: dict | None = None) -> str:
    from redrec.reports import render

    return render("shadow_report.html", rep=rep, hist=_hist_chart(rep.get("histogram")), gate=gate_result)


def write_report(rep: dict, out_dir: str | Path, gate=None) -> dict[str, Path]:
    """``shadow_report.json`` and ``shadow_report.html`` in ``out_dir``; with ``gate`` the JSON
    records its verdict as well (promote re-checks against the thresholds it is run with)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if gate is not None:
        fails = gate_failures(rep, rep["candidate_version"], gate)
        rep = {**rep, "gate": {"passed": not fails, "failures": fails, "thresholds": gate.model_dump()}}
    paths = {"json": out / REPORT_JSON, "html": out / "shadow_report.html"}
    paths["json"].write_text(json.dumps(rep, indent=2, default=float))
    paths["html"].write_text(render_html(rep, rep.get("gate")))
    return paths


def format_text(rep: dict) -> str:
    o = rep["overall"]
    lines = [f"candidate {rep['candidate_version']} vs production {rep['production_version']}: {o['requests']} mirrored, "
             f"errors {o['errors']}, dropped {o['dropped']}",
             f"{'scope':<12} {'requests':>8} {'overlap@10':>10} {'tau_b':>7} {'p50 ms':>8} {'p99 ms':>8} {'err':>6}"]
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for scope, b in [("overall", o), *rep["per_scenario"].items()]:
        lines.append(f"{scope:<12} {b['requests']:>8} {f(b['overlap@10']):>10} {f(b['kendall_tau_b'], 3):>7} "
                     f"{f(b['latency_ms']['p50'], 1):>8} {f(b['latency_ms']['p99'], 1):>8} {f(b['error_rate'], 3):>6}")
    a = rep["agreement"]
    lines.append(f"offline vs shadow: {a['verdict']} ({a['why']})")
    if rep.get("gate"):
        lines.append("gate: " + ("PASSED" if rep["gate"]["passed"] else "FAILED: " + "; ".join(rep["gate"]["failures"])))
    return "\n".join(lines)
