"""The promotion gate: does the candidate beat the production model by the configured margin?"""

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


def decide(candidate: dict, production: dict | None, metrics: list[str], margin: float) -> GateDecision:
    """Pass iff, for every metric, candidate >= production * (1 + margin).

    With no production model (first run) the candidate passes. A metric the candidate lacks
    (e.g. a scenario it was not evaluated on) fails the gate: promotion must be earned, not
    assumed.
    """
    if production is None:
        return GateDecision(True, "no production model yet: the candidate becomes production")
    checks, failed = [], []
    for m in metrics:
        c, p = metric_value(candidate, m), metric_value(production, m)
        if c is None:
            failed.append(m)
            checks.append({"metric": m, "candidate": None, "production": p, "required": None, "passed": False})
            continue
        required = None if p is None else p * (1.0 + margin)
        ok = required is None or c >= required
        checks.append({"metric": m, "candidate": c, "production": p, "required": required, "passed": ok})
        if not ok:
            failed.append(m)
    if failed:
        return GateDecision(False, f"candidate does not beat production by {margin:+.1%} on {', '.join(failed)}", checks)
    return GateDecision(True, f"candidate beats production by {margin:+.1%} on {', '.join(metrics)}", checks)


def format_gate(d: GateDecision, candidate_version: str | None, production_version: str | None) -> str:
    lines = [f"# Gate: {'PASSED' if d.passed else 'REJECTED'}", "",
             f"candidate {candidate_version} vs production {production_version or 'none'}: {d.reason}", ""]
    if d.checks:
        lines += ["| metric | candidate | production | required | ok |", "| --- | --- | --- | --- | --- |"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines += [f"| {c['metric']} | {fmt(c['candidate'])} | {fmt(c['production'])} | {fmt(c['required'])} | "
                  f"{'yes' if c['passed'] else 'no'} |" for c in d.checks]
    return "\n".join(lines) + "\n"
