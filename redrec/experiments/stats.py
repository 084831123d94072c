"""Statistics of an A/B comparison that decide faster and safer: CUPED variance reduction, an
always-valid sequential test (mSPRT) and Benjamini-Hochberg across a table of tests.

Pure numpy/scipy/statsmodels on per-user arrays (the user is the randomisation unit), so the
report (redrec.experiments.report) and the benchmark (bench/experiments.py) call the same code.

- CUPED (Deng, Xu, Kohavi, Walker 2013): ``y_adj = y - theta (x - mean x)`` with ``x`` a
  pre-experiment covariate and ``theta`` one regression slope for both arms. ``x`` is independent
  of the assignment, so the adjusted difference of means stays unbiased; its variance shrinks by
  the share of variance ``x`` explains. It equals the treatment coefficient of the OLS
  ``y ~ 1 + treatment + (x - mean x)`` (tests/test_experiment_stats.py checks it).
- Ratio metrics (CTR = clicks / responses per user) are linearised per user first (delta method),
  then treated as a per-user mean: :func:`linearise_ratio`.
- mSPRT with a normal mixture (Johari, Pekelis, Walsh 2017, "Always valid inference"; the same
  boundary as Howard et al. 2021's normal-mixture confidence sequence): for an asymptotically
  normal estimate ``d`` with variance ``v`` (shrinking as 1/n), the mixture likelihood ratio
  ``L = sqrt(v / (v + tau2)) * exp(tau2 d^2 / (2 v (v + tau2)))`` is a martingale under no
  effect, so ``p = min(1, 1/L)`` (running minimum over looks) is a p-value that stays valid
  however often one peeks and whenever one stops, and ``{delta: L(d - delta) < 1/alpha}`` is a
  confidence sequence.
- Benjamini-Hochberg (false discovery rate) via statsmodels' ``multipletests(method="fdr_bh")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["cuped", "linearise_ratio", "LiftEstimate", "LiftResult", "relative_lift", "z_test_p",
           "tau2_for_horizon", "msprt_p_value", "msprt_interval", "benjamini_hochberg", "peeking_simulation"]


# ---- CUPED --------------------------------------------------------------------------------------
def cuped(y, x, arm=None) -> tuple[np.ndarray, float, float]:
    """CUPED-adjust the per-user metric ``y`` (both arms together) with the pre-experiment
    covariate ``x``. Returns ``(y_adj, theta, variance_reduction)``.

    ``theta`` is pooled over both arms: one slope, estimated after centring each arm at its own
    means when ``arm`` (a label per user) is given, so a treatment effect on ``y`` does not leak
    into the slope; this is exactly the ``x`` coefficient of OLS ``y ~ 1 + arm + x``. Without
    ``arm`` it is plain ``cov(y, x) / var(x)`` over all users. ``y_adj = y - theta (x - mean x)``
    keeps the overall mean; ``variance_reduction = 1 - var(y_adj) / var(y)`` (within arms when
    ``arm`` is given). A constant ``x`` (no pre-period data at all) gives ``theta = 0``: nothing
    to adjust with."""
    y, x = np.asarray(y, float), np.asarray(x, float)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError(f"cuped: y and x must be 1-d arrays of the same length, got {y.shape} and {x.shape}")
    yc, xc = y - y.mean(), x - x.mean()
    if arm is not None:
        arm = np.asarray(arm)
        for a in np.unique(arm):
            sel = arm == a
            yc[sel], xc[sel] = y[sel] - y[sel].mean(), x[sel] - x[sel].mean()
    sxx = float(xc @ xc)
    theta = float(xc @ yc) / sxx if sxx > 0 else 0.0
    y_adj = y - theta * (x - x.mean())
    syy = float(yc @ yc)
    reduction = 1.0 - float((yc - theta * xc) @ (yc - theta * xc)) / syy if syy > 0 else 0.0
    return y_adj, theta, reduction


def linearise_ratio(num, den) -> np.ndarray:
    """One arm's per-user values whose mean is the arm's ratio of sums ``R = sum num / sum den``
    and whose variance of the mean is the delta-method (cluster-robust) variance of ``R``:
    ``R + (num_u - R den_u) / mean(den)``. CUPED and the mean-difference machinery then apply
    to a ratio metric as to any per-user mean (Deng et al. 2018, "Applying the delta method in
    metric analytics")."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if den.sum() <= 0:
        return np.full(len(num), np.nan)
    r = num.sum() / den.sum()
    return r + (num - r * den) / den.mean()


# ---- fixed-horizon relative lift -----------------------------------------------------------------
@dataclass
class LiftEstimate:
    """Relative lift ``mean_t / mean_c - 1`` with a delta-method Wald interval and z-test."""
    value: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    diff: float  # mean_t - mean_c
    diff_se: float
    mean_t: float
    mean_c: float
    n_t: int
    n_c: int


@dataclass
class LiftResult:
    raw: LiftEstimate
    cuped: LiftEstimate  # equals raw when no covariate was given
    theta: float
    variance_reduction: float  # 1 - var(adjusted difference) / var(raw difference)


def z_test_p(estimate, variance):
    """Two-sided fixed-horizon z-test p-value of ``estimate`` with ``variance`` (arrays allowed)."""
    est, var = np.asarray(estimate, float), np.asarray(variance, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 2 * stats.norm.sf(np.abs(est) / np.sqrt(var))
    return float(out) if out.ndim == 0 else out


def _estimate(y_t: np.ndarray, y_c: np.ndarray, confidence: float) -> LiftEstimate:
    nan = float("nan")
    n_t, n_c = len(y_t), len(y_c)
    if n_t < 2 or n_c < 2:
        return LiftEstimate(nan, nan, nan, nan, nan, nan, nan, nan, nan, n_t, n_c)
    mt, mc = float(y_t.mean()), float(y_c.mean())
    vt, vc = float(y_t.var(ddof=1)) / n_t, float(y_c.var(ddof=1)) / n_c  # variances of the two means
    diff, diff_se = mt - mc, math.sqrt(vt + vc)
    if mc == 0 or not np.isfinite(mc):
        return LiftEstimate(nan, nan, nan, nan, nan, diff, diff_se, mt, mc, n_t, n_c)
    value = mt / mc - 1
    # delta method for mt / mc with independent arms
    se = math.sqrt(vt / mc**2 + vc * mt**2 / mc**4)
    z = stats.norm.ppf(0.5 + confidence / 2)
    if se == 0:
        return LiftEstimate(value, 0.0, value, value, 0.0 if value != 0 else 1.0, diff, diff_se, mt, mc, n_t, n_c)
    p = float(2 * stats.norm.sf(abs(value) / se))
    return LiftEstimate(value, se, float(value - z * se), float(value + z * se), p, diff, diff_se, mt, mc, n_t, n_c)


def relative_lift(y_t, y_c, x_t=None, x_c=None, confidence: float = 0.95) -> LiftResult:
    """Arm-vs-control relative lift of the per-user metric ``y`` (``y_t`` treatment users,
    ``y_c`` control users), without and with CUPED on the pre-experiment covariate ``x``
    (``x_t``/``x_c``, aligned with ``y_t``/``y_c``; ``None`` = no adjustment). Each estimate is
    ``(mean_t - mean_c) / mean_c`` with a delta-method Wald interval and the z-test of the same
    statistic (so ``p < 1 - confidence`` exactly when the interval excludes 0). For a ratio metric
    pass each arm's :func:`linearise_ratio` values."""
    y_t, y_c = np.asarray(y_t, float), np.asarray(y_c, float)
    raw = _estimate(y_t, y_c, confidence)
    if x_t is None or x_c is None:
        return LiftResult(raw, raw, 0.0, 0.0)
    y = np.concatenate([y_t, y_c])
    x = np.concatenate([np.asarray(x_t, float), np.asarray(x_c, float)])
    if len(y) < 3 or not np.isfinite(y).all():
        return LiftResult(raw, raw, 0.0, 0.0)
    arm = np.r_[np.ones(len(y_t)), np.zeros(len(y_c))]
    y_adj, theta, _ = cuped(y, x, arm)
    adj = _estimate(y_adj[: len(y_t)], y_adj[len(y_t):], confidence)
    vr = 1 - (adj.diff_se / raw.diff_se) ** 2 if raw.diff_se and np.isfinite(raw.diff_se) else 0.0
    return LiftResult(raw, adj, theta, float(vr))


# ---- always-valid inference (mSPRT, normal mixture) ----------------------------------------------
def tau2_for_horizon(variance_at_horizon: float, alpha: float = 0.05) -> float:
    """A mixing variance ``tau2`` for which the confidence sequence is narrowest when the
    estimate's variance reaches ``variance_at_horizon`` (the planned sample size): the width
    ``sqrt(v (v + tau2) / tau2 * (2 log(1/alpha) + log(1 + tau2 / v)))`` is smallest at
    ``tau2 = r v`` with ``r = 2 log(1/alpha) + log(1 + r)`` (r ~ 8.2 at alpha = 0.05). Fix it before
    the data arrive (from the plan, or the spread of effects of past experiments, Johari et al.
    section 4); a ``tau2`` chosen from the data being tested voids the guarantee."""
    a, r = 2 * math.log(1 / alpha), 1.0
    for _ in range(60):  # a contraction: converges in a few steps
        r = a + math.log1p(r)
    return r * float(variance_at_horizon)


def _running(values: np.ndarray, looks_axis: int | None, op) -> np.ndarray:
    return values if looks_axis is None else op.accumulate(values, axis=looks_axis)


def msprt_p_value(estimate, variance, tau2: float, looks_axis: int | None = None):
    """Always-valid p-value of "no effect" for an asymptotically normal ``estimate`` with
    ``variance`` (for a difference of two means, ``var_t / n_t + var_c / n_c``; with ``n`` per arm
    and per-pair variance ``sigma2 = var_t + var_c``, ``sigma2 / n``). ``tau2``: the mixing
    variance (prior spread of the effect on the estimate's scale, see :func:`tau2_for_horizon`).
    ``looks_axis``: the axis along which the arrays are successive looks at growing data; the
    p-values are then made monotone (running minimum), as the guarantee is about the whole path.
    Arrays broadcast; a scalar look returns a float."""
    d, v = np.asarray(estimate, float), np.asarray(variance, float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_lr = 0.5 * np.log(v / (v + tau2)) + tau2 * d**2 / (2 * v * (v + tau2))
        p = np.where(np.isfinite(log_lr), np.minimum(1.0, np.exp(-log_lr)), np.nan)
    p = _running(p, looks_axis, np.fmin)
    return float(p) if p.ndim == 0 else p


def msprt_interval(estimate, variance, tau2: float, alpha: float = 0.05, looks_axis: int | None = None):
    """Always-valid ``1 - alpha`` confidence interval (a confidence sequence) for the effect:
    ``estimate -/+ sqrt(v (v + tau2) / tau2 * (2 log(1/alpha) + log((v + tau2) / v)))``; it
    excludes 0 exactly when :func:`msprt_p_value` < alpha. Over looks (``looks_axis``) the running
    intersection is returned (the bounds only tighten). Returns ``(low, high)``."""
    d, v = np.asarray(estimate, float), np.asarray(variance, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((v + tau2) / v)))
    lo, hi = _running(d - half, looks_axis, np.fmax), _running(d + half, looks_axis, np.fmin)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


# ---- multiple testing ---------------------------------------------------------------------------
def benjamini_hochberg(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg over a family of tests (statsmodels ``fdr_bh``): returns
    ``(reject, p_adjusted)``. NaN p-values (tests that could not be run) stay NaN and are left out
    of the family rather than counted as tests."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, float)
    reject, adj = np.zeros(p.shape, bool), np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        r, a, _, _ = multipletests(p[ok], alpha=alpha, method="fdr_bh")
        reject[ok], adj[ok] = r, a
    return reject, adj


# ---- peeking simulation (the test and the benchmark share it) -----------------------------------
def peeking_simulation(runs: int = 1000, looks: int = 14, users_per_look: int = 200, effect: float = 0.0,
                       alpha: float = 0.05, tau2: float | None = None, seed: int = 0) -> dict:
    """Simulated experiments peeked at ``looks`` times (e.g. daily): each look adds
    ``users_per_look`` users per arm with a N(0, 1) metric (treatment shifted by ``effect``).
    Returns, per run, whether each test ever rejected at level ``alpha``: the always-valid mSPRT
    (``tau2`` default :func:`tau2_for_horizon` at the last look) and the fixed-horizon z-test
    applied at every look. Vectorised: ``runs x looks`` arrays."""
    rng = np.random.default_rng(seed)
    shape = (runs, looks, users_per_look)
    t, c = rng.standard_normal(shape) + effect, rng.standard_normal(shape)
    n = users_per_look * np.arange(1, looks + 1)  # users per arm at each look

    def moments(a):  # cumulative mean and variance of the mean per look
        s, s2 = a.sum(axis=2).cumsum(axis=1), (a**2).sum(axis=2).cumsum(axis=1)
        mean = s / n
        return mean, (s2 - n * mean**2) / (n - 1) / n

    (mt, vt), (mc, vc) = moments(t), moments(c)
    d, v = mt - mc, vt + vc
    if tau2 is None:
        tau2 = tau2_for_horizon(2.0 / n[-1], alpha)  # planned from the design (unit variances), not the data
    p_seq = msprt_p_value(d, v, tau2, looks_axis=1)
    p_fix = z_test_p(d, v)
    seq, fix = (p_seq < alpha).any(axis=1), (p_fix < alpha).any(axis=1)
    return {"runs": runs, "looks": looks, "users_per_look": users_per_look, "effect": effect, "alpha": alpha, "tau2": tau2,
            "sequential_rejects": seq, "fixed_rejects": fix, "fixed_final_rejects": p_fix[:, -1] < alpha,
            "sequential_rate": float(seq.mean()), "fixed_peeking_rate": float(fix.mean()),
            "fixed_final_rate": float((p_fix[:, -1] < alpha).mean())}
