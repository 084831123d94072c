"""Geometry of the reports' inline-SVG line charts (the ``line_chart`` macro in macros.html draws
it): no plotting library and no script, so a page renders the same offline and in a screenshot."""

from __future__ import annotations

import math


def finite(x) -> float | None:
    """``x`` as a float, or None for missing/non-numeric/NaN (json NaN from a failed validation
    must not poison a chart)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    raw = (hi - lo) / n or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], colors: dict[str, str], xlabel: str) -> dict:
    """One chart: a polyline per series of (x, y) points, ticks on both axes, a legend."""
    w, h, left, right, top, bottom = 560, 300, 52, 410, 24, 262
    series = {k: v for k, v in series.items() if v}
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    x0, x1 = 0.0, max(max(xs), 1e-3)
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 0.05
    y0, y1 = min(ys) - pad, max(ys) + pad
    sx = lambda x: round(left + (x - x0) / (x1 - x0) * (right - left), 1)  # noqa: E731
    sy = lambda y: round(bottom - (y - y0) / (y1 - y0) * (bottom - top), 1)  # noqa: E731
    out = []
    for name, pts in series.items():
        px = [(sx(x), sy(y)) for x, y in sorted(pts)]
        out.append({"name": name, "color": colors[name], "points": " ".join(f"{a},{b}" for a, b in px),
                    "single": px[0] if len(px) == 1 else None})
    yd = max(0, 2 - math.floor(math.log10(max(y1 - y0, 1e-9))))
    return {"title": title, "xlabel": xlabel, "w": w, "h": h, "left": left, "right": right, "top": top, "bottom": bottom,
            "series": out, "xticks": [(sx(t), f"{t:g}") for t in ticks(x0, x1)],
            "yticks": [(sy(t), f"{t:.{yd}f}") for t in ticks(y0, y1) if y0 <= t <= y1]}
