"""A/B analysis of the serving log: CTR and hit rate per arm and scenario, lift vs control with a
confidence interval and a significance test, a sample-ratio-mismatch check, HTML + JSON + SVG.

Units. The randomisation unit is the user (arms are assigned per user), so every variance is
computed over users, never over requests (requests of one user are correlated):
- CTR = clicked responses / responses, a ratio of per-user sums; its variance comes from the
  delta method over users (cluster-robust).
- hit rate = share of exposed users with at least one click, a per-user proportion.
Relative lift = treatment / control - 1, with a test and an interval that come from one
procedure (so they never disagree): for hit rate statsmodels' score test and score interval for
the ratio of two proportions; for CTR the Wald test and interval of log(ratio) with the
delta-method variance, exponentiated (asymmetric, never below -100%). SRM: a chi-square goodness-of-fit test of users per group against the configured
shares (holdout included); p < 0.001 flags the experiment as untrustworthy.

Faster and safer decisions (redrec.experiments.stats), next to each fixed-horizon lift:
- CUPED: the lift again, adjusted with each user's pre-experiment positive feedback count
  (``pre_days`` before the experiment's first logged response), and the variance reduction.
- Always valid: the mSPRT p-value and confidence sequence of the CUPED lift, valid however often
  the report is re-run while the experiment runs; "may stop" when its p < 1 - confidence.
- Benjamini-Hochberg over the whole table (metrics x scenarios x arms, guardrails included).
- Guardrails (per-user mean latency_ms, fallback share; lower is better): flagged when the
  treatment is significantly worse after BH; never counted as a success.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from redrec.experiments.assignment import HOLDOUT, INTERLEAVED, ExperimentSpec
from redrec.experiments import stats as xstats
from redrec.experiments.log import RECEIVED, read_feedback, read_serving_log
from redrec.reports.render import PALETTE

POSITIVE_ACTIONS = ("click", "like", "share", "purchase", "conversion", "save", "comment", "follow")
SRM_ALPHA = 1e-3
SUCCESS_METRICS = ("ctr", "hit_rate")
# response-line field -> guardrail metric (a per-user mean; lower is better)
GUARDRAILS = {"latency_ms": "latency_ms", "fallback": "fallback_share"}
PRE_DAYS = 14.0
# The always-valid test's mixing standard deviation, on the relative-lift scale (Johari et al.:
# match it to the effects past experiments showed; most recommender changes move a metric by a few
# percent). Erring large is cheap and small is not: with tau^2 >> var the interval widens only as
# sqrt(log(tau^2 / var)), with tau^2 << var it widens as var / tau (a small or rare metric would
# then never stop). Fixed before the data: a tau chosen from the data being tested voids the
# guarantee.
SEQ_TAU = 0.1


class InterleavedLog(ValueError):
    """The experiment analysed is an interleaving one."""


@dataclass
class ArmStats:
    arm: str
    users: int
    responses: int
    clicked_responses: int
    hit_users: int
    ctr: float
    ctr_se: float
    hit_rate: float
    hit_rate_se: float


@dataclass
class Lift:
    metric: str
    arm: str
    control: str
    value: float  # relative lift (0.05 = +5 %)
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    kind: str = "success"  # "success" metric or "guardrail" (lower is better, never a success)
    # CUPED: the same lift adjusted with the pre-period covariate (delta-method Wald, z-test)
    cuped_value: float = float("nan")
    cuped_ci_low: float = float("nan")
    cuped_ci_high: float = float("nan")
    cuped_p_value: float = float("nan")
    cuped_significant: bool = False
    variance_reduction: float = 0.0  # 1 - var(adjusted lift estimate) / var(raw)
    theta: float = 0.0
    # always valid (mSPRT normal mixture on the CUPED lift): valid at any look, any stopping time
    seq_p_value: float = float("nan")
    seq_ci_low: float = float("nan")
    seq_ci_high: float = float("nan")
    may_stop: bool = False  # seq_p_value < 1 - confidence
    # Benjamini-Hochberg over every lift of the report (metrics x scenarios x arms)
    p_adjusted: float = float("nan")  # of p_value
    cuped_p_adjusted: float = float("nan")  # of cuped_p_value: the decision
    seq_p_adjusted: float = float("nan")  # of seq_p_value
    significant_adjusted: bool = False  # cuped_p_adjusted < 1 - confidence
    guardrail_breached: bool = False  # a guardrail significantly worse (adjusted) in the treatment


@dataclass
class Report:
    experiment: str | None
    control: str
    confidence: float
    n_responses: int
    n_feedback: int
    n_feedback_unjoined: int
    torn_lines: int
    overall: dict[str, ArmStats]
    per_scenario: dict[str, dict[str, ArmStats]]
    lifts: dict[str, list[Lift]]  # "overall" / scenario -> lifts
    srm: dict = field(default_factory=dict)
    daily: dict[str, dict[str, int]] = field(default_factory=dict)  # UTC day -> group -> users exposed
    # the pre-period the CUPED covariate comes from and how much of it there was
    pre_period: dict = field(default_factory=dict)
    seq_tau: float = SEQ_TAU
    # arm -> success metrics significantly better / worse, guardrails breached, verdict
    decisions: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def join_feedback(responses: pd.DataFrame, feedback: pd.DataFrame, positive: tuple[str, ...]) -> tuple[pd.DataFrame, int]:
    """Per response: ``clicked`` (a positive feedback event on one of its items). Returns the
    responses with the flag and the number of feedback lines whose request_id matches none."""
    r = responses.copy()
    if feedback.empty:
        r["clicked"] = False
        return r, 0
    fb = feedback[feedback["request_id"].notna()]
    known = set(r["request_id"])
    unjoined = int((~fb["request_id"].isin(known)).sum())
    fb = fb[fb["request_id"].isin(known) & fb["action"].isin(positive)]
    served = r[["request_id", "items"]].explode("items").rename(columns={"items": "item_id"})
    hits = served.merge(fb[["request_id", "item_id"]].drop_duplicates(), on=["request_id", "item_id"])
    r["clicked"] = r["request_id"].isin(set(hits["request_id"]))
    return r, unjoined


def _arm_stats(arm: str, g: pd.DataFrame) -> ArmStats:
    per_user = g.groupby("user_id").agg(m=("clicked", "size"), c=("clicked", "sum"))
    n = len(per_user)
    m, c = per_user["m"].to_numpy(float), per_user["c"].to_numpy(float)
    ctr = c.sum() / m.sum() if m.sum() else 0.0
    # delta method for a ratio of per-user sums (cluster-robust over users)
    ctr_se = math.sqrt(np.var(c - ctr * m, ddof=1) / n) / m.mean() if n > 1 else float("nan")
    hit = (c > 0).astype(float)
    hr = hit.mean() if n else 0.0
    hr_se = math.sqrt(hr * (1 - hr) / n) if n else float("nan")
    return ArmStats(arm, n, int(m.sum()), int(c.sum()), int(hit.sum()), float(ctr), float(ctr_se), float(hr), float(hr_se))


def _lift(metric: str, t: ArmStats, c: ArmStats, conf: float) -> Lift:
    """The test and its interval are one procedure, so they never disagree (p < 1 - conf exactly
    when the interval excludes no lift): hit rate, a per-user proportion, by statsmodels' score
    test of the ratio of two independent proportions and the score interval that inverts it;
    CTR, a ratio of per-user sums, by the Wald test of log(ratio) with the delta-method variance
    (cluster-robust over users) and the Wald interval of the same statistic."""
    from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

    nan = float("nan")
    if metric == "hit_rate":
        if t.users == 0 or c.users == 0 or c.hit_users == 0:
            return Lift(metric, t.arm, c.arm, (t.hit_rate / c.hit_rate - 1) if c.hit_rate > 0 else nan, nan, nan, nan, False)
        args = (t.hit_users, t.users, c.hit_users, c.users)
        p = float(test_proportions_2indep(*args, compare="ratio", method="score").pvalue)
        lo, hi = confint_proportions_2indep(*args, compare="ratio", method="score", alpha=1 - conf)
        ratio = t.hit_rate / c.hit_rate
        return Lift(metric, t.arm, c.arm, ratio - 1, float(lo) - 1, float(hi) - 1, p, p < 1 - conf)
    vt, st, vc, sc = t.ctr, t.ctr_se, c.ctr, c.ctr_se
    if vt <= 0 or vc <= 0 or not (np.isfinite(st) and np.isfinite(sc)):
        return Lift(metric, t.arm, c.arm, (vt / vc - 1) if vc > 0 else nan, nan, nan, nan, False)
    z = stats.norm.ppf(0.5 + conf / 2)
    se_log = math.sqrt((st / vt) ** 2 + (sc / vc) ** 2)
    ratio = vt / vc
    if se_log == 0:
        return Lift(metric, t.arm, c.arm, ratio - 1, ratio - 1, ratio - 1, 0.0 if ratio != 1 else 1.0, ratio != 1)
    p = float(2 * stats.norm.sf(abs(math.log(ratio)) / se_log))
    lo, hi = ratio * math.exp(-z * se_log) - 1, ratio * math.exp(z * se_log) - 1
    return Lift(metric, t.arm, c.arm, ratio - 1, lo, hi, p, p < 1 - conf)


def _per_user(df: pd.DataFrame, pre: pd.Series) -> pd.DataFrame:
    """One row per (arm, user): responses ``m``, clicked responses ``c``, the guardrails' per-user
    means (NaN where the log lines lack the field) and the pre-period covariate ``x``."""
    cols = {"m": ("clicked", "size"), "c": ("clicked", "sum")}
    d = df
    for src, name in GUARDRAILS.items():
        if src in df.columns:
            d = d.assign(**{name: pd.to_numeric(df[src], errors="coerce").astype("float64")})
            cols[name] = (name, "mean")
    pu = d.groupby(["arm", "user_id"]).agg(**cols)
    # a user with no pre-period feedback gets x = 0, not dropped: x is still fixed before
    # assignment (independent of the arm), so the adjusted estimate stays unbiased; a poor x only
    # shrinks the variance reduction, never biases the lift
    pu["x"] = pu.index.get_level_values("user_id").map(pre).fillna(0.0).to_numpy(float)
    return pu


def _metric_values(metric: str, g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-user values of one arm whose mean is the metric, and their covariate."""
    if metric == "ctr":
        return xstats.linearise_ratio(g["c"], g["m"]), g["x"].to_numpy(float)
    if metric == "hit_rate":
        return (g["c"] > 0).to_numpy(float), g["x"].to_numpy(float)
    ok = g[metric].notna().to_numpy()
    return g[metric].to_numpy(float)[ok], g["x"].to_numpy(float)[ok]


def _enrich(lift: Lift, pu_t: pd.DataFrame, pu_c: pd.DataFrame, conf: float, tau: float) -> Lift:
    """Fill in the CUPED and the always-valid columns of one lift (a guardrail's fixed-horizon
    columns too: the delta-method lift of its per-user mean)."""
    y_t, x_t = _metric_values(lift.metric, pu_t)
    y_c, x_c = _metric_values(lift.metric, pu_c)
    res = xstats.relative_lift(y_t, y_c, x_t, x_c, confidence=conf)
    if lift.kind == "guardrail":
        r = res.raw
        lift.value, lift.ci_low, lift.ci_high, lift.p_value = r.value, r.ci_low, r.ci_high, r.p_value
        lift.significant = bool(r.p_value < 1 - conf)
    a = res.cuped
    lift.cuped_value, lift.cuped_ci_low, lift.cuped_ci_high, lift.cuped_p_value = a.value, a.ci_low, a.ci_high, a.p_value
    lift.cuped_significant = bool(a.p_value < 1 - conf)
    lift.variance_reduction, lift.theta = res.variance_reduction, res.theta
    if np.isfinite(a.value) and np.isfinite(a.se) and a.se > 0:
        var = a.se**2
        lift.seq_p_value = xstats.msprt_p_value(a.value, var, tau**2)
        lift.seq_ci_low, lift.seq_ci_high = xstats.msprt_interval(a.value, var, tau**2, alpha=1 - conf)
        lift.may_stop = bool(lift.seq_p_value < 1 - conf)
    return lift


def _adjust(lifts: list[Lift], conf: float) -> None:
    """Benjamini-Hochberg over every lift of the report, once per kind of p-value."""
    for src, dst in (("p_value", "p_adjusted"), ("cuped_p_value", "cuped_p_adjusted"), ("seq_p_value", "seq_p_adjusted")):
        _, adj = xstats.benjamini_hochberg([getattr(l, src) for l in lifts], alpha=1 - conf)
        for l, a in zip(lifts, adj):
            setattr(l, dst, float(a))
    for l in lifts:
        l.significant_adjusted = bool(l.cuped_p_adjusted < 1 - conf)
        l.guardrail_breached = l.kind == "guardrail" and l.significant_adjusted and l.cuped_value > 0


def _decisions(lifts: dict[str, list[Lift]], control: str) -> dict[str, dict]:
    """Per arm: the success metrics that moved (overall, BH-adjusted CUPED test), the guardrails
    breached (any scope) and a verdict. Guardrails only ever veto."""
    out: dict[str, dict] = {}
    for scope, ls in lifts.items():
        for l in ls:
            d = out.setdefault(l.arm, {"control": control, "better": [], "worse": [], "guardrails_breached": [],
                                       "may_stop": False})
            if l.guardrail_breached:
                d["guardrails_breached"].append(f"{scope}/{l.metric}")
            if scope == "overall" and l.kind == "success":
                if l.significant_adjusted:
                    d["better" if l.cuped_value > 0 else "worse"].append(l.metric)
                d["may_stop"] = d["may_stop"] or l.may_stop
    for d in out.values():
        d["verdict"] = ("guardrail breached" if d["guardrails_breached"] else "worse" if d["worse"]
                        else "better" if d["better"] else "no significant difference")
    return out


def pre_period_covariate(feedback: pd.DataFrame, first_ts: float, pre_days: float,
                         positive: tuple[str, ...]) -> tuple[pd.Series, dict]:
    """Per user, the positive feedback events that arrived (``received_ts``) in the ``pre_days``
    before the experiment's first response: the CUPED covariate (metric-like, fixed before
    assignment). ``feedback``: every feedback line of the log (``read_feedback``), already read."""
    start = first_ts - pre_days * 86400.0
    info = {"days": pre_days, "start": start, "end": first_ts, "feedback_events": 0, "users_with_data": 0}
    if pre_days <= 0:
        return pd.Series(dtype=float), info
    arrived = feedback[RECEIVED]
    fb = feedback[(arrived >= start) & (arrived < first_ts) & feedback["action"].isin(positive)]
    x = fb.groupby("user_id").size().astype(float)
    info["feedback_events"] = int(len(fb))
    return x, info


def srm_check(users_per_group: dict[str, int], expected_shares: dict[str, float]) -> dict:
    groups = [g for g in expected_shares if expected_shares[g] > 0]
    obs = np.array([users_per_group.get(g, 0) for g in groups], float)
    unexpected = {g: n for g, n in users_per_group.items() if g not in expected_shares}
    total = obs.sum()
    if total == 0 or len(groups) < 2:
        return {"groups": groups, "observed": obs.astype(int).tolist(), "p_value": None, "mismatch": bool(unexpected),
                "unexpected_groups": unexpected, "note": "fewer than two groups or no users: no test"}
    exp = np.array([expected_shares[g] for g in groups]) * total
    chi2, p = stats.chisquare(obs, exp)
    return {"groups": groups, "observed": obs.astype(int).tolist(), "expected": exp.round(2).tolist(),
            "chi2": float(chi2), "p_value": float(p), "alpha": SRM_ALPHA,
            "mismatch": bool(p < SRM_ALPHA or unexpected), "unexpected_groups": unexpected}


def analyse(
    log_dir: str | Path,
    spec: ExperimentSpec | None = None,
    control: str | None = None,
    confidence: float = 0.95,
    positive_actions: tuple[str, ...] = POSITIVE_ACTIONS,
    pre_days: float = PRE_DAYS,
    seq_tau: float = SEQ_TAU,
) -> Report:
    """``pre_days``: the window before the first response whose positive feedback per user is the
    CUPED covariate (0 = no adjustment). ``seq_tau``: the mixing standard deviation of the
    always-valid test, on the relative-lift scale (see SEQ_TAU and stats.tau2_for_horizon); fix
    it before the experiment starts, never from its data."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if not pre_days >= 0:
        raise ValueError(f"pre_days (--pre-days) must be >= 0 (days of feedback before the experiment), got {pre_days}")
    if not seq_tau > 0:
        raise ValueError(f"seq_tau (--seq-tau) must be > 0 (the prior spread of relative lifts, e.g. 0.1), got {seq_tau}")
    responses = read_serving_log(log_dir)
    feedback = read_feedback(log_dir)
    if responses.empty:
        raise ValueError(f"no serving log lines under {log_dir} (files *.jsonl other than feedback-*.jsonl)")
    if spec is not None and "experiment" in responses.columns:
        # a log dir may hold several experiments over time: analyse only this one's responses
        responses = responses[responses["experiment"].fillna(spec.name) == spec.name]
    r, unjoined = join_feedback(responses, feedback, positive_actions)
    if INTERLEAVED in set(r["arm"]):
        raise InterleavedLog(f"the responses under {log_dir} are interleaved (experiment.type: interleaving): "
                             "an A/B split does not apply; redrec.experiments.interleaving_report analyses them")
    arms = list(dict.fromkeys([a.name for a in spec.arms] if spec else sorted(set(r["arm"]) - {HOLDOUT})))
    control = control or arms[0]
    if control not in set(r["arm"]):
        raise ValueError(f"--control: arm {control!r} has no logged responses; arms in the log: {sorted(set(r['arm']))}")
    groups = arms + ([HOLDOUT] if HOLDOUT in set(r["arm"]) else [])
    pre, pre_info = pre_period_covariate(feedback, float(r["ts"].min()), pre_days, positive_actions)
    guardrails = [name for src, name in GUARDRAILS.items() if src in r.columns and r[src].notna().any()]

    def block(df: pd.DataFrame) -> tuple[dict[str, ArmStats], list[Lift]]:
        st = {a: _arm_stats(a, g) for a, g in df.groupby("arm") if a in groups}
        pu = _per_user(df, pre)
        lifts = []
        if control in st:
            for a in groups:
                if a != control and a in st:
                    new = [_lift("ctr", st[a], st[control], confidence), _lift("hit_rate", st[a], st[control], confidence)]
                    nan = float("nan")
                    new += [Lift(g, a, control, nan, nan, nan, nan, False, kind="guardrail") for g in guardrails]
                    lifts += [_enrich(l, pu.loc[a], pu.loc[control], confidence, seq_tau) for l in new]
        return {a: st[a] for a in groups if a in st}, lifts

    overall, lifts_all = block(r)
    per_scen, lifts = {}, {"overall": lifts_all}
    for s, g in r.groupby("scenario"):
        per_scen[s], lifts[s] = block(g)
    users = r.groupby("arm")["user_id"].nunique().to_dict()
    day = pd.to_datetime(r["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    daily = {d: {a: int(n) for a, n in g.groupby("arm")["user_id"].nunique().items() if a in groups}
             for d, g in r.assign(day=day).groupby("day")}
    expected = spec.expected_shares() if spec else {a: 1 / len(arms) for a in arms}
    _adjust([l for ls in lifts.values() for l in ls], confidence)
    pre_info["users"] = int(r["user_id"].nunique())
    pre_info["users_with_data"] = int(r["user_id"].drop_duplicates().isin(pre.index).sum())
    return Report(
        experiment=spec.name if spec else None, control=control, confidence=confidence, n_responses=len(r),
        n_feedback=len(feedback), n_feedback_unjoined=unjoined,
        torn_lines=int(responses.attrs.get("torn_lines", 0)) + int(feedback.attrs.get("torn_lines", 0)),
        overall=overall, per_scenario=per_scen, lifts=lifts, srm=srm_check({k: int(v) for k, v in users.items()}, expected),
        daily=daily, pre_period=pre_info, seq_tau=seq_tau, decisions=_decisions(lifts, control),
    )


# ---- rendering ------------------------------------------------------------------------------
def lift_svg(rep: Report, metric: str = "ctr") -> str:
    """A forest plot (relative lift and its CI per scenario and arm), as standalone SVG: no plotting
    library, no script, renders offline in any browser."""
    rows = [(scope, l) for scope, ls in rep.lifts.items() for l in ls if l.metric == metric]
    w, left, right, rh, top = 640, 190, 30, 26, 40
    h = top + rh * max(len(rows), 1) + 40
    vals = [v for _, l in rows for v in (l.ci_low, l.ci_high, l.value) if np.isfinite(v)] or [0.0]
    lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
    pad = (hi - lo) * 0.1 or 0.1
    lo, hi = lo - pad, hi + pad
    x = lambda v: left + (v - lo) / (hi - lo) * (w - left - right)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="18" text-anchor="middle" font-weight="bold">relative {metric} lift vs {html.escape(rep.control)} '
           f'({rep.confidence:.0%} CI)</text>',
           f'<line x1="{x(0):.1f}" y1="{top-8}" x2="{x(0):.1f}" y2="{h-30}" stroke="#888" stroke-dasharray="4"/>']
    for i, (scope, l) in enumerate(rows):
        y = top + i * rh + rh / 2
        color = "#1a7f37" if l.significant and l.value > 0 else "#cf222e" if l.significant else "#444"
        out.append(f'<text x="{left-8}" y="{y+4:.1f}" text-anchor="end">{html.escape(f"{scope} / {l.arm}")}</text>')
        if np.isfinite(l.ci_low) and np.isfinite(l.ci_high):
            out.append(f'<line x1="{x(l.ci_low):.1f}" y1="{y:.1f}" x2="{x(l.ci_high):.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2"/>')
        if np.isfinite(l.value):
            out.append(f'<circle cx="{x(l.value):.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
    for t in np.linspace(lo, hi, 5):
        out.append(f'<text x="{x(t):.1f}" y="{h-12}" text-anchor="middle">{t:+.0%}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _srm_chart(srm: dict, w: int = 520) -> dict | None:
    groups, obs, exp = srm.get("groups") or [], srm.get("observed") or [], srm.get("expected") or []
    if not groups or len(exp) != len(groups):
        return None
    left, right = 110, 150
    top = max(max(obs), max(exp), 1)
    scale = (w - left - right) / top
    bars = [{"group": g, "observed": int(o), "expected": round(float(e)), "y": 26 + 22 * i, "w": round(o * scale, 1),
             "expected_x": round(left + e * scale, 1), "label_x": w - right + 8} for i, (g, o, e) in enumerate(zip(groups, obs, exp))]
    return {"w": w, "h": 34 + 22 * len(groups), "left": left, "bars": bars}


def _daily_chart(daily: dict[str, dict[str, int]], groups: list[str], w: int = 640, h: int = 200) -> dict | None:
    """Users exposed per UTC day, stacked by group: a share that moves over days (a ramp, a
    broken assignment) shows here before the SRM test says anything."""
    if not daily:
        return None
    left, top, bottom = 48, 24, h - 34
    days = sorted(daily)
    peak = max(sum(v.values()) for v in daily.values()) or 1
    bw = (w - left - 10) / len(days)
    bars = []
    for i, d in enumerate(days):
        y = bottom
        for j, g in enumerate(groups):
            n = daily[d].get(g, 0)
            hgt = (bottom - top) * n / peak
            y -= hgt
            bars.append({"x": round(left + i * bw + 1, 1), "y": round(y, 1), "w": round(max(bw - 2, 1), 1), "h": round(hgt, 1),
                         "color": PALETTE[j % len(PALETTE)], "title": f"{d} {g}: {n} users"})
    labels = [{"x": round(left + i * bw + bw / 2, 1), "text": d[5:]} for i, d in enumerate(days)][:: max(1, len(days) // 10)]
    legend = [{"x": left + 90 * j, "color": PALETTE[j % len(PALETTE)], "group": g} for j, g in enumerate(groups)]
    return {"w": w, "h": h, "bottom": bottom, "left": left, "peak": peak, "bars": bars, "labels": labels, "legend": legend}


def render_html(rep: Report) -> str:
    from redrec.reports import render

    groups = list(rep.srm.get("groups") or rep.overall)
    return render("ab_report.html", rep=rep, srm_chart=_srm_chart(rep.srm), daily_chart=_daily_chart(rep.daily, groups),
                  lift_ctr=lift_svg(rep, "ctr"), lift_hit=lift_svg(rep, "hit_rate"))


def write_report(rep: Report, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ab_report.json", "html": out / "ab_report.html", "svg": out / "ab_lift.svg"}
    paths["json"].write_text(json.dumps(rep.as_dict(), indent=2, default=float))
    paths["html"].write_text(render_html(rep))
    paths["svg"].write_text(lift_svg(rep, "ctr"))
    return paths


def format_text(rep: Report) -> str:
    lines = [f"{'scope':<12} {'arm':<12} {'users':>6} {'resp':>7} {'CTR':>8} {'hit':>7}  lift CTR [CI] p"]
    scopes = [("overall", rep.overall)] + list(rep.per_scenario.items())
    for scope, st in scopes:
        lift = {l.arm: l for l in rep.lifts.get(scope, []) if l.metric == "ctr"}
        for a, s in st.items():
            l = lift.get(a)
            ls = f"{l.value:+.2%} [{l.ci_low:+.2%}, {l.ci_high:+.2%}] p={l.p_value:.3g}" if l else "(control)" if a == rep.control else ""
            lines.append(f"{scope:<12} {a:<12} {s.users:>6} {s.responses:>7} {s.ctr:>8.4f} {s.hit_rate:>7.4f}  {ls}")
    lines.append(f"SRM: p={rep.srm.get('p_value')} mismatch={rep.srm.get('mismatch')}")
    lines.append("")
    lines.append(f"{'scope':<12} {'arm':<10} {'metric':<15} {'CUPED lift [CI]':<28} {'VR':>6} {'p BH':>8} "
                 f"{'always-valid p [CI]':<32} stop")
    for scope, ls in rep.lifts.items():
        for l in ls:
            flag = "  GUARDRAIL BREACHED" if l.guardrail_breached else ""
            lines.append(f"{scope:<12} {l.arm:<10} {l.metric:<15} "
                         f"{f'{l.cuped_value:+.2%} [{l.cuped_ci_low:+.2%}, {l.cuped_ci_high:+.2%}]':<28} "
                         f"{l.variance_reduction:>6.1%} {l.cuped_p_adjusted:>8.3g} "
                         f"{f'{l.seq_p_value:.3g} [{l.seq_ci_low:+.2%}, {l.seq_ci_high:+.2%}]':<32} "
                         f"{'yes' if l.may_stop else 'no'}{flag}")
    for a, d in rep.decisions.items():
        lines.append(f"decision {a} vs {rep.control}: {d['verdict']}; better {d['better'] or '-'}, worse {d['worse'] or '-'}, "
                     f"guardrails breached {d['guardrails_breached'] or '-'}, may stop: {'yes' if d['may_stop'] else 'no'}")
    return "\n".join(lines)
