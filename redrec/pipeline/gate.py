"""The promotion gate: does the candidate beat popularity, and the production model by the configured margin?"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GateDecision:
    passed: bool
    reason: str
    checks: list[dict] = field(default_factory=list)


def metric_value(result: dict, metric: str) -> float | None:
    """``ndcg@10`` reads the overall value, ``ndcg@10:search`` the search scenario's."""
    name, _, scenario = metric.partition(":")
    src = result.get("per_scenario", {}).get(scenario, {}) if scenario else result.get("overall", {})
    v = src.get(name)
    return None if v is None else float(v)


def decide(candidate: dict, production: dict | None, metrics: list[str], margin: float,
           popularity: dict | None = None) -> GateDecision:
    """Pass iff, for every metric, candidate > popularity and candidate >= production * (1 + margin).

    Popularity is the floor: when its results are given, the candidate must be strictly above
    them on every gate metric, first run included (a model that does not beat "most popular
    items" is never promoted). With no production model (first run) only that floor applies;
    with neither, the candidate passes. A metric the candidate lacks (e.g. a scenario it was not
    evaluated on) fails the gate: promotion must be earned, not assumed. A metric popularity or
    production lacks is not a bar.

    Each check names its reference (``against``: "popularity" or "production").
    """
    if production is None and popularity is None:
        return GateDecision(True, "no production model yet: the candidate becomes production")
    checks: list[dict] = []
    failed: dict[str, list[str]] = {"popularity": [], "production": []}
    refs = [(name, res) for name, res in (("popularity", popularity), ("production", production)) if res is not None]
    for m in metrics:
        c = metric_value(candidate, m)
        for name, res in refs:
            r = metric_value(res, m)
            if name == "popularity":
                required, ok = r, c is not None and (r is None or c > r)
            else:
                required = None if r is None else r * (1.0 + margin)
                ok = c is not None and (required is None or c >= required)
            checks.append({"metric": m, "against": name, "candidate": c, "reference": r, "required": required, "passed": ok})
            if not ok:
                failed[name].append(m)
    missing = [m for m in metrics if metric_value(candidate, m) is None]
    problems = []
    if missing:
        problems.append(f"candidate has no value for {', '.join(missing)}")
    if bad := [m for m in failed["popularity"] if m not in missing]:
        problems.append(f"candidate does not beat popularity on {', '.join(bad)}")
    if bad := [m for m in failed["production"] if m not in missing]:
        problems.append(f"candidate does not beat production by {margin:+.1%} on {', '.join(bad)}")
    if problems:
        return GateDecision(False, "; ".join(problems), checks)
    on = ", ".join(metrics)
    if production is None:
        return GateDecision(True, f"no production model yet: the candidate beats popularity on {on} and becomes production", checks)
    pop = f"popularity on {on} and " if popularity is not None else ""
    return GateDecision(True, f"candidate beats {pop}production by {margin:+.1%} on {on}", checks)


def format_gate(d: GateDecision, candidate_version: str | None, production_version: str | None) -> str:
    vs = f"production {production_version or 'none'}"
    if any(c["against"] == "popularity" for c in d.checks):
        vs += " and popularity"
    lines = [f"# Gate: {'PASSED' if d.passed else 'REJECTED'}", "", f"candidate {candidate_version} vs {vs}: {d.reason}", ""]
    if d.checks:
        lines += ["| metric | against | candidate | reference | required | ok |", "| --- | --- | --- | --- | --- | --- |"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        # popularity is a strict floor (candidate > reference), production a margin (candidate >= required)
        req = lambda c: "-" if c["required"] is None else f"{'>' if c['against'] == 'popularity' else '>='} {c['required']:.4f}"  # noqa: E731
        lines += [f"| {c['metric']} | {c['against']} | {fmt(c['candidate'])} | {fmt(c['reference'])} | {req(c)} | "
                  f"{'yes' if c['passed'] else 'no'} |" for c in d.checks]
    return "\n".join(lines) + "\n"
