"""The A/B statistics that decide faster and safer (redrec.experiments.stats) against references:
CUPED against an OLS regression, the always-valid test against peeking, BH against statsmodels,
and the report end to end on a simulated log with a pre-period."""

from __future__ import annotations

import math

import numpy as np
import pytest

from redrec.experiments import stats as xs


def _experiment(seed=0, n=4000, effect=0.3, share=0.4):
    """Users with a pre-period metric x that predicts y; unequal arms and variances."""
    rng = np.random.default_rng(seed)
    t = (rng.random(n) < share).astype(float)
    x = rng.gamma(2.0, 2.0, n)
    y = 1.0 + 0.8 * x + effect * t + rng.normal(0, 1 + 0.5 * t, n)
    return y, t, x


def test_cuped_equals_the_ols_regression_on_treatment_and_centred_covariate():
    import statsmodels.api as sm

    for seed in range(3):
        y, t, x = _experiment(seed)
        ols = sm.OLS(y, np.column_stack([np.ones_like(y), t, x - x.mean()])).fit(cov_type="HC2")
        y_adj, theta, vr = xs.cuped(y, x, t)
        assert theta == pytest.approx(ols.params[2], rel=1e-9)
        res = xs.relative_lift(y[t == 1], y[t == 0], x[t == 1], x[t == 0])
        assert res.theta == pytest.approx(ols.params[2], rel=1e-9)
        # the adjusted difference of means is the OLS treatment effect, its SE the robust OLS SE
        assert res.cuped.diff == pytest.approx(ols.params[1], rel=1e-9)
        assert res.cuped.diff_se == pytest.approx(ols.bse[1], rel=0.01)
        # the variance removed is the share x explains within arms (the partial R^2)
        def within(v):
            return np.r_[v[t == 1] - v[t == 1].mean(), v[t == 0] - v[t == 0].mean()].var()
        assert vr == pytest.approx(1 - within(y_adj) / within(y), rel=1e-9)
        assert 0.5 < vr < 1 and 0.4 < res.variance_reduction < 1
        assert res.cuped.ci_high - res.cuped.ci_low < res.raw.ci_high - res.raw.ci_low
        # no covariate information: nothing changes
        flat = xs.relative_lift(y[t == 1], y[t == 0], np.zeros(int(t.sum())), np.zeros(int((1 - t).sum())))
        assert flat.theta == 0 and flat.cuped.value == pytest.approx(flat.raw.value) and flat.variance_reduction == 0


def test_relative_lift_interval_and_test_agree_and_cover():
    """The delta-method lift covers the true relative lift at about the nominal rate, and its
    p-value is significant exactly when the interval excludes 0."""
    rng = np.random.default_rng(3)
    covered, runs = 0, 400
    for _ in range(runs):
        yt, yc = rng.normal(1.1, 1, 800), rng.normal(1.0, 1, 900)
        r = xs.relative_lift(yt, yc).raw
        covered += r.ci_low <= 0.1 <= r.ci_high
        assert (r.p_value < 0.05) == (r.ci_low > 0 or r.ci_high < 0)
    assert 0.92 <= covered / runs <= 0.98


def test_linearised_ratio_has_the_ratio_as_mean_and_the_delta_method_variance():
    rng = np.random.default_rng(1)
    m = rng.integers(1, 8, 3000).astype(float)
    c = rng.binomial(m.astype(int), 0.1).astype(float)
    y = xs.linearise_ratio(c, m)
    r = c.sum() / m.sum()
    assert y.mean() == pytest.approx(r)
    assert math.sqrt(y.var(ddof=1) / len(y)) == pytest.approx(math.sqrt(np.var(c - r * m, ddof=1) / len(m)) / m.mean())


def test_sequential_test_keeps_its_false_positive_rate_under_daily_peeking_where_the_z_test_does_not():
    sim = xs.peeking_simulation(runs=1000, looks=14, users_per_look=200, seed=7)
    # the point of an always-valid test: 14 daily peeks, stopping at the first p < 0.05
    assert sim["sequential_rate"] <= 0.05, sim["sequential_rate"]
    assert sim["fixed_peeking_rate"] > 0.10, sim["fixed_peeking_rate"]  # ~20%: peeking a z-test inflates it
    assert sim["fixed_final_rate"] <= 0.07  # a single look at the horizon is fine
    # and a real effect is still found (a quarter of a standard deviation per user)
    power = xs.peeking_simulation(runs=400, looks=14, users_per_look=200, effect=0.1, seed=8)
    assert power["sequential_rate"] >= 0.7, power["sequential_rate"]


def test_always_valid_p_and_interval_agree_and_are_monotone_over_looks():
    rng = np.random.default_rng(2)
    d, v = rng.normal(0, 0.05, (50, 10)), 0.01 / np.arange(1, 11)
    tau2 = xs.tau2_for_horizon(v[-1])
    p = xs.msprt_p_value(d, v, tau2, looks_axis=1)
    lo, hi = xs.msprt_interval(d, v, tau2, 0.05, looks_axis=1)
    assert (np.diff(p, axis=1) <= 0).all() and (np.diff(lo, axis=1) >= 0).all() and (np.diff(hi, axis=1) <= 0).all()
    one_p = xs.msprt_p_value(d, v, tau2)
    one_lo, one_hi = xs.msprt_interval(d, v, tau2, 0.05)
    assert ((one_p < 0.05) == ((one_lo > 0) | (one_hi < 0))).all()
    # wider than the fixed-horizon interval at the same look: the price of peeking freely
    assert (one_hi - one_lo > 2 * 1.96 * np.sqrt(v)).all()
    # the mixture likelihood ratio against its definition, integrated numerically:
    # L = E_{theta ~ N(0, tau2)} [ N(d; theta, v) / N(d; 0, v) ]
    from scipy import integrate, stats

    for est, var, t2 in ((0.03, 1e-4, 4e-4), (-0.2, 0.01, 0.05), (0.001, 1e-3, 1e-2), (0.5, 0.02, 0.001)):
        f = lambda th: stats.norm.pdf(est, th, math.sqrt(var)) / stats.norm.pdf(est, 0, math.sqrt(var)) * stats.norm.pdf(th, 0, math.sqrt(t2))  # noqa: E731
        lr = integrate.quad(f, -12 * math.sqrt(t2), 12 * math.sqrt(t2), points=[est], limit=200)[0]
        assert xs.msprt_p_value(est, var, t2) == pytest.approx(min(1.0, 1 / lr), rel=1e-5), (est, var, t2)
    # the horizon rule: tau2 ~ 8.2 x the variance at the horizon minimises the width there
    widths = [xs.msprt_interval(0.0, 1e-3, k * 1e-3)[1] for k in (2, 8.2, 30)]
    assert widths[1] < widths[0] and widths[1] < widths[2]


def test_benjamini_hochberg_equals_statsmodels_and_skips_missing_tests():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.001, 0.02, 0.03, 0.04, 0.2, 0.5, 0.011, 0.9])
    rej, adj = xs.benjamini_hochberg(p, 0.05)
    ref_rej, ref_adj, _, _ = multipletests(p, alpha=0.05, method="fdr_bh")
    assert (rej == ref_rej).all() and np.allclose(adj, ref_adj)
    assert adj[3] > p[3]  # adjusted upwards
    with_nan = np.insert(p, 2, np.nan)
    rej2, adj2 = xs.benjamini_hochberg(with_nan, 0.05)
    assert np.isnan(adj2[2]) and not rej2[2] and np.allclose(np.delete(adj2, 2), ref_adj)


def _spec():
    from redrec.experiments.assignment import ExperimentSpec

    return ExperimentSpec(name="e", holdout_share=0.1, arms=[{"name": "control", "model_version": "v1", "share": 0.5},
                                                              {"name": "treat", "model_version": "v2", "share": 0.5}])


def test_report_cuped_narrows_the_interval_with_a_pre_period(tmp_path):
    from statsmodels.stats.multitest import multipletests
    from test_experiments import simulate

    from redrec.experiments.assignment import HOLDOUT
    from redrec.experiments.log import read_feedback, read_serving_log
    from redrec.experiments.report import POSITIVE_ACTIONS, analyse

    sp = _spec()
    simulate(tmp_path, sp, {"control": 0.10, "treat": 0.12, HOLDOUT: 0.08}, pre_rate=5.0,
             latency={"control": 20.0, "treat": 20.0, HOLDOUT: 5.0}, fallback={"control": 0.02, "treat": 0.02, HOLDOUT: 0.02})
    rep = analyse(tmp_path, sp)
    assert rep.pre_period["users_with_data"] > 0.9 * rep.pre_period["users"] * (1 - math.exp(-1))
    # the covariate is the positive feedback that arrived in the 14 days before the first response:
    # not the older events, not the experiment's own clicks
    fb = read_feedback(tmp_path)
    t0 = read_serving_log(tmp_path)["ts"].min()
    window = fb[(fb["received_ts"] >= t0 - 14 * 86400) & (fb["received_ts"] < t0) & fb["action"].isin(POSITIVE_ACTIONS)]
    assert 0 < rep.pre_period["feedback_events"] == len(window) < (fb["action"] == "like").sum()
    for metric in ("ctr", "hit_rate"):
        lift = next(l for l in rep.lifts["overall"] if l.metric == metric and l.arm == "treat")
        assert lift.variance_reduction > 0.05 and lift.theta > 0, lift
        assert lift.cuped_ci_high - lift.cuped_ci_low < lift.ci_high - lift.ci_low, lift
        assert lift.cuped_ci_low < lift.cuped_value < lift.cuped_ci_high
        assert lift.seq_ci_low < lift.cuped_value < lift.seq_ci_high
        assert lift.seq_ci_high - lift.seq_ci_low > lift.cuped_ci_high - lift.cuped_ci_low  # the price of peeking
        assert lift.may_stop == (lift.seq_p_value < 0.05)
    # without the pre-period the adjustment has nothing to work with
    bare = analyse(tmp_path, sp, pre_days=0)
    assert all(l.variance_reduction == 0 for ls in bare.lifts.values() for l in ls)
    # BH over the whole table (metrics x scenarios x arms) from the report's own raw p-values
    table = [l for ls in rep.lifts.values() for l in ls]
    assert len(table) == 3 * 2 * 4  # overall + 2 scenarios, 2 arms vs control, 4 metrics
    for raw, adj in (("p_value", "p_adjusted"), ("cuped_p_value", "cuped_p_adjusted"), ("seq_p_value", "seq_p_adjusted")):
        ref = multipletests([getattr(l, raw) for l in table], method="fdr_bh")[1]
        assert np.allclose([getattr(l, adj) for l in table], ref), adj
    assert all(l.significant_adjusted == (l.cuped_p_adjusted < 0.05) for l in table)
    # equal latency and fallback: no guardrail breached, the success verdict stands
    assert rep.decisions["treat"]["verdict"] == "better" and rep.decisions["treat"]["better"] == ["ctr", "hit_rate"]


def test_report_flags_a_guardrail_and_keeps_it_out_of_success(tmp_path):
    from test_experiments import simulate

    from redrec.experiments.assignment import HOLDOUT
    from redrec.experiments.report import analyse, format_text

    sp = _spec()
    simulate(tmp_path, sp, {"control": 0.10, "treat": 0.10, HOLDOUT: 0.10}, n_users=3000,
             latency={"control": 20.0, "treat": 26.0, HOLDOUT: 10.0}, fallback={"control": 0.02, "treat": 0.02, HOLDOUT: 0.02})
    rep = analyse(tmp_path, sp)
    lat = next(l for l in rep.lifts["overall"] if l.metric == "latency_ms" and l.arm == "treat")
    assert lat.kind == "guardrail" and lat.guardrail_breached and lat.value > 0.15, lat
    fb = next(l for l in rep.lifts["overall"] if l.metric == "fallback_share" and l.arm == "treat")
    assert not fb.guardrail_breached
    d = rep.decisions["treat"]
    assert "overall/latency_ms" in d["guardrails_breached"] and d["verdict"] == "guardrail breached"
    assert "latency_ms" not in d["better"] + d["worse"]  # a guardrail is never a success metric
    assert "GUARDRAIL" in format_text(rep) and "latency_ms" in format_text(rep)
    # faster is not flagged: only a worse guardrail is
    assert not next(l for l in rep.lifts["overall"] if l.metric == "latency_ms" and l.arm == HOLDOUT).guardrail_breached


def test_ab_report_cli_flags(tmp_path):
    import json
    import subprocess
    import sys

    import yaml
    from test_experiments import ROOT, simulate

    sp = _spec()
    simulate(tmp_path / "log", sp, {"control": 0.1, "treat": 0.1, "holdout": 0.1}, n_users=2000, pre_rate=3.0,
             latency={"control": 20.0, "treat": 30.0, "holdout": 20.0})
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"scenarios": ["homefeed", "search"], "experiment": json.loads(sp.model_dump_json()),
                                   "milvus": {"uri": "http://127.0.0.1:1"}}))
    base = [sys.executable, "-m", "redrec.cli", "ab", "report", "--log-dir", str(tmp_path / "log"), "--config", str(cfg)]
    ok = subprocess.run(base + ["--out", str(tmp_path / "a"), "--pre-days", "7", "--seq-tau", "0.2"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr  # a breached guardrail fails the run only when asked
    rep = json.loads((tmp_path / "a" / "ab_report.json").read_text())
    assert rep["pre_period"]["days"] == 7 and rep["seq_tau"] == 0.2 and "GUARDRAIL BREACHED" in ok.stdout
    assert rep["decisions"]["treat"]["guardrails_breached"] and "cuped_p_adjusted" in rep["lifts"]["overall"][0]
    gate = subprocess.run(base + ["--out", str(tmp_path / "b"), "--fail-on-guardrail"], capture_output=True, text=True, cwd=ROOT)
    assert gate.returncode == 1, gate.stdout + gate.stderr
    bad = subprocess.run(base + ["--out", str(tmp_path / "c"), "--pre-days", "-1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "pre_days" in bad.stdout
