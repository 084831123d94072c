"""Render a report template. Autoescaped; only inline CSS and SVG, so every page is one
self-contained file that opens with no network."""

from __future__ import annotations

from datetime import datetime, timezone

import jinja2

# series colours of every report's plots, in order
PALETTE = ["#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#9467bd", "#8c564b", "#d62728", "#e377c2", "#17becf"]
STATUS_COLORS = {"drift": "#c62828", "ok": "#2e7d32", "insufficient_data": "#6d6d6d", "error": "#e65100",
                 "skipped": "#6d6d6d", "alert": "#ad1457"}
STATUS_LABELS = {"drift": "DRIFTED", "ok": "OK", "insufficient_data": "INSUFFICIENT DATA", "error": "ERROR",
                 "skipped": "skipped", "alert": "ALERT"}


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _iso(ts) -> str:
    return "-" if ts is None else datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


_env = jinja2.Environment(loader=jinja2.PackageLoader("redrec.reports", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]),
                          trim_blocks=True, lstrip_blocks=True)
_env.filters.update(num=_num, iso=_iso, pct=lambda v, d=2: f"{v:+.{d}%}")
_env.globals.update(status_color=lambda s: STATUS_COLORS.get(s, "#555"), status_label=lambda s: STATUS_LABELS.get(s, s))


def render(template: str, **context) -> str:
    return _env.get_template(template).render(**context)
