"""The interleaving analysis of a serving log: which of the two arms users preferred, per scenario.

A response of an interleaving experiment logs ``teams`` (the arm that placed each shown item);
positive feedback joined by request id is credited to the item's team. The unit is the user, as in
the A/B analysis (a user's impressions are correlated): a user prefers the arm whose items they
clicked more over the experiment (per scenario: over that scenario's impressions); equal credit is
a tie, no click says nothing. Reported per scope:
- wins / ties / losses of the treatment (the second arm) over users, and the same over impressions;
- the preference share: wins / (wins + losses), with the Wilson score interval, and the two-sided
  exact binomial (sign) test of share = 1/2, the interleaving test of Chapelle et al. (2012);
- Chapelle's delta_AB = (wins + ties / 2) / (wins + ties + losses) - 1/2;
- p-values adjusted by Benjamini-Hochberg across the scopes (overall is not independent of the
  scenarios, BH holds under their positive dependence);
- the draft's fairness: the share of impressions whose first item the treatment placed (the coin
  flip of the draft: about 1/2, else the draft or the log is broken);
- with the experiment's config, the sample-ratio check of interleaved vs held-out users.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from redrec.experiments.assignment import INTERLEAVED, ExperimentSpec
from redrec.experiments.log import read_feedback, read_serving_log
from redrec.experiments.report import POSITIVE_ACTIONS, srm_check


@dataclass
class Preference:
    scope: str
    users: int  # users with at least one interleaved impression
    impressions: int
    clicked_impressions: int
    wins: int  # users preferring the treatment
    ties: int
    losses: int
    impression_wins: int
    impression_ties: int
    impression_losses: int
    credit_control: int  # clicks credited to each team
    credit_treatment: int
    share: float  # wins / (wins + losses); nan when nobody decided
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float
    delta_ab: float
    significant: bool
    first_pick_treatment: float  # share of impressions whose first item the treatment placed


@dataclass
class InterleavingReport:
    experiment: str | None
    control: str
    treatment: str
    confidence: float
    n_responses: int  # interleaved responses (the holdout, cold starts and fallbacks not counted)
    n_other_responses: int
    n_feedback: int
    n_feedback_unjoined: int
    preferences: dict[str, Preference]  # "overall" / scenario
    verdict: str
    type: str = "interleaving"
    problems: list[str] = field(default_factory=list)
    srm: dict = field(default_factory=dict)  # users interleaved vs held out, against the configured holdout

    def as_dict(self) -> dict:
        return asdict(self)


def _outcome(treat: np.ndarray, ctrl: np.ndarray) -> tuple[int, int, int]:
    decided = (treat + ctrl) > 0
    return (int((treat > ctrl).sum()), int(((treat == ctrl) & decided).sum()), int((treat < ctrl).sum()))


def preference(scope: str, per_imp: pd.DataFrame, confidence: float) -> Preference:
    """``per_imp``: one row per interleaved impression with ``user_id``, ``c_control``,
    ``c_treatment`` (credited clicks) and ``first`` (1 when the treatment placed the first item)."""
    from statsmodels.stats.proportion import proportion_confint

    users = per_imp.groupby("user_id")[["c_control", "c_treatment"]].sum()
    w, t, l = _outcome(users["c_treatment"].to_numpy(), users["c_control"].to_numpy())
    iw, it, il = _outcome(per_imp["c_treatment"].to_numpy(), per_imp["c_control"].to_numpy())
    nan = float("nan")
    n = w + l
    if n:
        share = w / n
        lo, hi = proportion_confint(w, n, alpha=1 - confidence, method="wilson")
        p = float(stats.binomtest(w, n, 0.5).pvalue)
    else:
        share, lo, hi, p = nan, nan, nan, nan
    delta = (w + t / 2) / (w + t + l) - 0.5 if (w + t + l) else nan
    clicked = int(((per_imp["c_control"] + per_imp["c_treatment"]) > 0).sum())
    return Preference(scope, int(len(users)), int(len(per_imp)), clicked, w, t, l, iw, it, il,
                      int(per_imp["c_control"].sum()), int(per_imp["c_treatment"].sum()), float(share), float(lo),
                      float(hi), p, p, float(delta), False,
                      float(per_imp["first"].mean()) if len(per_imp) else nan)


def impressions(responses: pd.DataFrame, feedback: pd.DataFrame, control: str, treatment: str,
                positive: tuple[str, ...] = POSITIVE_ACTIONS) -> tuple[pd.DataFrame, int]:
    """One row per interleaved response with the clicks credited to each team, and the number of
    feedback lines that name a request id the log does not have."""
    r = responses[responses["teams"].apply(lambda t: isinstance(t, list) and len(t) > 0)]
    r = r[[len(t) == len(i) for t, i in zip(r["teams"], r["items"])]]
    shown = r[["request_id", "items", "teams"]].explode(["items", "teams"]).rename(columns={"items": "item_id"})
    unjoined = 0
    if not feedback.empty:
        fb = feedback[feedback["request_id"].notna()]
        unjoined = int((~fb["request_id"].isin(set(responses["request_id"]))).sum())
        fb = fb[fb["action"].isin(positive)][["request_id", "item_id"]].drop_duplicates()
        hits = shown.merge(fb, on=["request_id", "item_id"])
    else:
        hits = shown.iloc[:0]
    credit = hits.groupby(["request_id", "teams"]).size().unstack(fill_value=0)
    out = r[["request_id", "user_id", "scenario"]].copy()
    for col, arm in (("c_control", control), ("c_treatment", treatment)):
        out[col] = out["request_id"].map(credit[arm] if arm in credit else {}).fillna(0).astype(int)
    out["first"] = [1 if t[0] == treatment else 0 for t in r["teams"]]
    return out.reset_index(drop=True), unjoined


def analyse_interleaving(log_dir: str | Path, spec: ExperimentSpec | None = None, confidence: float = 0.95,
                         positive_actions: tuple[str, ...] = POSITIVE_ACTIONS) -> InterleavingReport:
    from statsmodels.stats.multitest import multipletests

    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    responses = read_serving_log(log_dir)
    if responses.empty:
        raise ValueError(f"no serving log lines under {log_dir} (files *.jsonl other than feedback-*.jsonl)")
    if spec is not None and "experiment" in responses.columns:
        responses = responses[responses["experiment"].fillna(spec.name) == spec.name]
    if "teams" not in responses.columns:
        raise ValueError(f"no interleaved responses under {log_dir}: no line has 'teams' (the serving config's "
                         "experiment.type must be 'interleaving')")
    inter = responses[responses["arm"] == INTERLEAVED]
    if spec is not None:
        control, treatment = spec.arms[0].name, spec.arms[1].name
    else:
        names = list(dict.fromkeys(t for ts in inter["teams"] if isinstance(ts, list) for t in ts))
        if len(names) != 2:
            raise ValueError(f"the interleaved responses name teams {names}, not two arms: pass --config with the "
                             "experiment's serving config")
        control, treatment = sorted(names)  # without the config, no arm is the control: a stable order
    feedback = read_feedback(log_dir)
    per_imp, unjoined = impressions(inter, feedback, control, treatment, positive_actions)
    if per_imp.empty:
        raise ValueError(f"no interleaved response with teams under {log_dir} (all were cold starts, fallbacks or "
                         "holdout)")
    prefs = {"overall": preference("overall", per_imp, confidence)}
    for s, g in per_imp.groupby("scenario"):
        prefs[str(s)] = preference(str(s), g, confidence)
    tested = [k for k, p in prefs.items() if np.isfinite(p.p_value)]
    if tested:
        reject, adj, _, _ = multipletests([prefs[k].p_value for k in tested], alpha=1 - confidence, method="fdr_bh")
        for k, r, a in zip(tested, reject, adj):
            prefs[k].p_adjusted, prefs[k].significant = float(a), bool(r)
    problems = []
    fair = prefs["overall"].first_pick_treatment
    n = prefs["overall"].impressions
    if n >= 100 and stats.binomtest(int(round(fair * n)), n, 0.5).pvalue < 1e-3:
        problems.append(f"the treatment placed the first item in {fair:.1%} of {n} impressions, not about half: "
                        "the draft's coin is biased or the log is broken; do not trust the preference")
    srm = {}
    if spec is not None:
        users = responses.groupby("arm")["user_id"].nunique()
        srm = srm_check({str(a): int(n) for a, n in users.items()}, spec.expected_shares())
        if srm.get("mismatch"):
            problems.append(f"sample ratio mismatch: users {dict(zip(srm['groups'], srm['observed']))} against the "
                            f"configured holdout share {spec.holdout_share} (p = {srm.get('p_value')}); the holdout "
                            "assignment or the log is broken: do not trust the preference")
    o = prefs["overall"]
    if o.significant:
        verdict = f"users prefer {treatment if o.share > 0.5 else control}"
    else:
        verdict = "no preference detected"
    return InterleavingReport(spec.name if spec else None, control, treatment, confidence, int(len(per_imp)),
                              int(len(responses) - len(per_imp)), int(len(feedback)), unjoined, prefs, verdict,
                              problems=problems, srm=srm)


# ---- rendering ------------------------------------------------------------------------------
def preference_svg(rep: InterleavingReport) -> str:
    """The treatment's preference share per scope with its interval, around the no-preference line."""
    rows = list(rep.preferences.values())
    w, left, right, rh, top = 640, 150, 30, 26, 40
    h = top + rh * max(len(rows), 1) + 40
    x = lambda v: left + v * (w - left - right)  # noqa: E731 - the axis is the share, 0..1
    out = [f'<svg id="preference-chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-weight="bold">users preferring '
           f'{html.escape(rep.treatment)} over {html.escape(rep.control)} ({rep.confidence:.0%} CI)</text>',
           f'<line x1="{x(0.5):.1f}" y1="{top - 8}" x2="{x(0.5):.1f}" y2="{h - 30}" stroke="#888" stroke-dasharray="4"/>']
    for i, p in enumerate(rows):
        y = top + i * rh + rh / 2
        color = "#1a7f37" if p.significant and p.share > 0.5 else "#cf222e" if p.significant else "#444"
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{html.escape(p.scope)}</text>')
        if np.isfinite(p.ci_low):
            out.append(f'<line x1="{x(p.ci_low):.1f}" y1="{y:.1f}" x2="{x(p.ci_high):.1f}" y2="{y:.1f}" '
                       f'stroke="{color}" stroke-width="2"/>')
            out.append(f'<circle cx="{x(p.share):.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{x(t):.1f}" y="{h - 12}" text-anchor="middle">{t:.0%}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_interleaving_report(rep: InterleavingReport, out_dir: str | Path) -> dict[str, Path]:
    from redrec.reports import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "interleaving_report.json", "html": out / "interleaving_report.html",
             "svg": out / "interleaving_preference.svg"}
    paths["json"].write_text(json.dumps(rep.as_dict(), indent=2, default=float))
    svg = preference_svg(rep)
    paths["html"].write_text(render("interleaving_report.html", rep=rep, chart=svg))
    paths["svg"].write_text(svg)
    return paths


def format_interleaving(rep: InterleavingReport) -> str:
    lines = [f"interleaving {rep.experiment or ''}: {rep.treatment} vs {rep.control}: {rep.verdict}",
             f"{'scope':<12} {'users':>6} {'W/T/L (users)':>16} {'share':>7} {'CI':>17} {'p (BH)':>9} {'dAB':>7}"]
    for p in rep.preferences.values():
        ci = f"[{p.ci_low:.3f}, {p.ci_high:.3f}]" if np.isfinite(p.ci_low) else "-"
        lines.append(f"{p.scope:<12} {p.users:>6} {f'{p.wins}/{p.ties}/{p.losses}':>16} {p.share:>7.3f} {ci:>17} "
                     f"{p.p_adjusted:>9.3g} {p.delta_ab:>+7.3f}")
    lines += [f"problem: {x}" for x in rep.problems]
    return "\n".join(lines)
