"""Per-scenario checks: behaviour features, user embeddings, served scores (Evidently) and the
online hit rate against the offline evaluation.

Each check ends in one status: ``drift``, ``ok``, ``insufficient_data`` (too few rows to judge:
never an alarm), ``skipped`` (disabled, or nothing to compare with by design) or ``error`` (the
input is broken: the message says what and how to fix it). A scenario's verdict is ``drift`` if
any check drifted, ``ok`` if at least one check was judged, ``error`` if a check could not run
on broken input and nothing was judged, else ``insufficient_data``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift
from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod
from evidently.presets import DataDriftPreset

from redrec.drift.config import NUMERIC_FEATURES, PVALUE_METHODS, ScenarioThresholds, drifted
from redrec.drift.model_side import reduce_embedding
from redrec.drift.reference import Reference


@dataclass
class FeatureResult:
    name: str
    method: str
    score: float | None
    threshold: float
    drifted: bool
    n_reference: int
    n_current: int
    message: str | None = None
    lower_drifts: bool = False  # p-values and the hit-rate ratio drift downwards

    @property
    def severity(self) -> float:
        """How far past (or short of) the threshold, comparable across methods: > 1 is drift."""
        if self.score is None:
            return 0.0
        if self.lower_drifts or self.method in PVALUE_METHODS:
            return self.threshold / max(self.score, 1e-12)
        return self.score / self.threshold


@dataclass
class CheckResult:
    name: str
    status: str
    method: str | None = None
    score: float | None = None
    threshold: float | None = None
    n_reference: int = 0
    n_current: int = 0
    message: str | None = None
    drift_share: float | None = None
    features: list[FeatureResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["features"] = [asdict(f) for f in self.features]
        return d


@dataclass
class ScenarioResult:
    scenario: str
    verdict: str
    checks: list[CheckResult]
    problems: list[str] = field(default_factory=list)
    snapshots: list = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def own_drift(self) -> bool:
        return any(c.status == "drift" for c in self.checks if c.name in OWN_CHECKS)

    @property
    def drift_share(self) -> float | None:
        b = self.check("behaviour")
        return b.drift_share if b else None

    def check(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)

    def drifted_features(self) -> list[FeatureResult]:
        """Everything that drifted, worst first: behaviour features and the model-side checks
        (those only when they made the verdict, not when attributed to another scenario)."""
        out = []
        for c in self.checks:
            if c.name == "behaviour":
                out += [f for f in c.features if f.drifted]
            elif c.status == "drift" and (c.name in OWN_CHECKS or self.verdict == "drift"):
                out.append(FeatureResult(c.name, c.method or "", c.score, c.threshold or 0, True, c.n_reference, c.n_current,
                                         lower_drifts=c.name == "online_hit_rate" or c.method in PVALUE_METHODS))
        return sorted(out, key=lambda f: -f.severity)

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario,
            "verdict": self.verdict,
            "drift_share": self.drift_share,
            "top_drifted": [f.name for f in self.drifted_features()],
            "checks": [c.as_dict() for c in self.checks],
            "problems": self.problems,
            "notes": self.notes,
        }


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return df.sample(n, random_state=seed) if len(df) > n else df


def _nan_only(ref: pd.DataFrame, cur: pd.DataFrame, cols: list[str], what: str) -> tuple[list[str], list[str]]:
    """Columns usable on both sides, and a message for each column with no values on one side."""
    ok, problems = [], []
    for c in cols:
        side = [name for name, df in (("reference", ref), ("current", cur)) if len(df) and df[c].notna().sum() == 0]
        if side:
            problems.append(f"{what} '{c}' is NaN in every {' and '.join(side)} row: its producer writes no values; fix it or disable the feature in the thresholds")
        else:
            ok.append(c)
    return ok, problems


def behaviour_check(ref: pd.DataFrame, cur: pd.DataFrame, th: ScenarioThresholds, seed: int) -> tuple[CheckResult, list[str], object]:
    bt = th.behaviour
    cols = [f for f in bt.features if bt.features[f].enabled]
    res = CheckResult("behaviour", "insufficient_data", method="evidently DataDriftPreset", threshold=bt.drift_share,
                      n_reference=len(ref), n_current=len(cur))
    if len(ref) < bt.min_reference_rows:
        res.message = f"reference has {len(ref)} events for this scenario, at least {bt.min_reference_rows} needed"
        return res, [], None
    if len(cur) < bt.min_current_rows:
        res.message = f"current window has {len(cur)} events for this scenario, at least {bt.min_current_rows} needed"
        return res, [], None
    cols, problems = _nan_only(ref, cur, cols, "behaviour feature")
    if not cols:
        res.status, res.message = "error", "no usable behaviour feature: " + "; ".join(problems)
        return res, problems, None
    ref, cur = _sample(ref[cols], bt.max_rows, seed), _sample(cur[cols], bt.max_rows, seed)
    num = [c for c in cols if c in NUMERIC_FEATURES]
    defn = DataDefinition(numerical_columns=num, categorical_columns=[c for c in cols if c not in num])
    preset = DataDriftPreset(
        columns=cols, drift_share=bt.drift_share,
        per_column_method={c: bt.features[c].method for c in cols},
        per_column_threshold={c: bt.features[c].threshold for c in cols},
    )
    snap = Report([preset]).run(Dataset.from_pandas(cur, data_definition=defn), Dataset.from_pandas(ref, data_definition=defn))
    for m in snap.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith(":ValueDrift"):
            c = cfg["column"]
            score = float(m["value"])
            ft = bt.features[c]
            res.features.append(FeatureResult(c, ft.method, score, ft.threshold, drifted(ft.method, score, ft.threshold),
                                              int(ref[c].notna().sum()), int(cur[c].notna().sum())))
        elif cfg["type"].endswith(":DriftedColumnsCount"):
            res.drift_share = float(m["value"]["share"])
    n_drift = sum(f.drifted for f in res.features)
    # Evidently's own count and ours must agree: a mismatch means a method's direction is wrong
    if res.drift_share is None or not math.isclose(res.drift_share, n_drift / len(res.features), abs_tol=1e-9):
        raise RuntimeError(f"drift share mismatch: Evidently {res.drift_share}, features {n_drift}/{len(res.features)}")
    res.score = res.drift_share
    res.status = "drift" if res.drift_share >= bt.drift_share else "ok"
    return res, problems, snap


_EMB_METHODS = {"model": ModelDriftMethod, "distance": DistanceDriftMethod, "mmd": MMDDriftMethod}


def model_ranked(requests: pd.DataFrame) -> pd.DataFrame:
    """The responses the model ranked: not cold starts (popularity counts in ``scores``), not the
    fallback, not the holdout. Only these are comparable with the reference's model outputs."""
    if not len(requests):
        return requests
    keep = np.ones(len(requests), dtype=bool)
    for col in ("cold_start", "fallback"):
        if col in requests:
            keep &= ~requests[col].fillna(False).astype(bool).to_numpy()
    if "arm" in requests:
        keep &= (requests["arm"] != "holdout").to_numpy()
    if "model_version" in requests:
        keep &= (requests["model_version"] != "popularity").to_numpy()
    return requests[keep]


# history-length buckets for matching reference and live model outputs: the user tower's input
# length moves embeddings and scores with no drift at all
HISTORY_BUCKETS = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500])


def match_history_lengths(ref: pd.DataFrame, cur_len, seed: int) -> tuple[pd.DataFrame, str | None]:
    """The reference rows, subsampled so their history lengths follow the current window's.

    The reference's sampled users and a live window's callers have different mixes of short and
    long histories. On ML-1M (same model and users, a reference replayed at past events) matching
    alone took the user-embedding AUC from 0.71-0.75 to 0.68-0.70 and the served-score distance
    from 0.49-0.51 to 0.27-0.31; where the reference replays (``requests_at``) did the rest.
    Without lengths on both sides the reference is used as is."""
    if "history_len" not in ref or cur_len is None:
        return ref, None
    cur_len = pd.to_numeric(pd.Series(cur_len), errors="coerce").dropna().to_numpy()
    if not len(cur_len) or not len(ref):
        return ref, None
    rb = np.searchsorted(HISTORY_BUCKETS, ref["history_len"].to_numpy(), side="right")
    cb = np.searchsorted(HISTORY_BUCKETS, cur_len, side="right")
    want = pd.Series(cb).value_counts(normalize=True)
    have = pd.Series(rb).value_counts()
    unmatched = float(want[~want.index.isin(have.index)].sum())
    want = want[want.index.isin(have.index)]
    if want.empty:
        return ref, "no reference output at the current window's history lengths: compared unmatched"
    want /= want.sum()
    n = min(have[b] / p for b, p in want.items())  # the largest reference sample with the current's mix
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(rb == b), size=max(int(n * p), 1), replace=False) for b, p in want.items()])
    note = f"reference matched to the window's history lengths ({len(keep)} of {len(ref)} rows)"
    if unmatched >= 0.005:
        note += f"; {unmatched:.0%} of the window is at lengths the reference never had"
    return ref.iloc[np.sort(keep)], note


def embedding_check(ref: pd.DataFrame | None, requests: pd.DataFrame, dim: int | None, th: ScenarioThresholds, seed: int) -> tuple[CheckResult, list[str], object]:
    et = th.embedding
    res = CheckResult("user_embedding", "skipped", method=f"evidently embedding drift ({et.method})", threshold=et.threshold)
    if not et.enabled:
        res.message = "disabled in the thresholds"
        return res, [], None
    if ref is None or not dim:
        res.message = "the reference was recorded without a model: no reference embeddings"
        return res, [], None
    cols = [f"e{d}" for d in range(dim)]
    requests = model_ranked(requests)
    raw = requests["user_embedding"] if "user_embedding" in requests else pd.Series([], dtype=object)
    present = raw.dropna()
    reduced = [reduce_embedding(x, dim) for x in present]
    vecs = [v for v in reduced if v is not None]
    lens = None
    if "history_len" in requests:
        lens = requests.loc[present.index, "history_len"].to_numpy()[[v is not None for v in reduced]]
    problems = []
    if len(present) and not vecs:
        problems.append(f"serving log 'user_embedding' holds no usable vector in {len(present)} requests "
                        f"(need {dim} or K x {dim} finite values, the model's dim)")
        res.status, res.message = "error", problems[0]
        return res, problems, None
    cur = pd.DataFrame(np.asarray(vecs).reshape(-1, dim), columns=cols)
    res.n_reference, res.n_current = len(ref), len(cur)
    if len(ref) < et.min_rows or len(cur) < et.min_rows:
        res.status = "insufficient_data"
        res.message = f"{len(ref)} reference and {len(cur)} current user embeddings, at least {et.min_rows} each needed" + (
            " (the serving log omits 'user_embedding')" if len(requests) and not len(present) else "")
        return res, problems, None
    ref, res.message = match_history_lengths(ref, lens, seed)
    res.n_reference = len(ref)
    if len(ref) < et.min_rows:
        res.status = "insufficient_data"
        res.message = f"{res.message}: {len(ref)} reference embeddings left, at least {et.min_rows} needed"
        return res, problems, None
    ref, cur = _sample(ref[cols].reset_index(drop=True), et.max_rows, seed), _sample(cur, et.max_rows, seed)
    method = RatioDriftMethod(threshold=et.threshold) if et.method == "ratio" else _EMB_METHODS[et.method](threshold=et.threshold, bootstrap=False)
    # Evidently's drift method judges. Its EmbeddingsDrift report would add a t-SNE map that
    # takes ~40 s per scenario on 2 cores, so the report shows instead the distribution of each
    # embedding's cosine to the reference mean: one cheap histogram that moves when they move
    score, _, _ = method(cur.copy(), ref.copy())
    res.score = float(score)
    res.status = "drift" if res.score > et.threshold else "ok"
    centre = ref.to_numpy().mean(0)
    centre /= max(np.linalg.norm(centre), 1e-12)
    col = "user_embedding_cos_to_reference_mean"
    defn = DataDefinition(numerical_columns=[col])
    snap = Report([ValueDrift(column=col, method="wasserstein", threshold=0.1)]).run(
        Dataset.from_pandas(pd.DataFrame({col: cur.to_numpy() @ centre}), data_definition=defn),
        Dataset.from_pandas(pd.DataFrame({col: ref.to_numpy() @ centre}), data_definition=defn))
    return res, problems, snap


def prediction_check(ref: pd.DataFrame | None, requests: pd.DataFrame, th: ScenarioThresholds, seed: int) -> tuple[CheckResult, list[str], object]:
    pt = th.prediction
    res = CheckResult("served_score", "skipped", method=pt.method, threshold=pt.threshold)
    if not pt.enabled:
        res.message = "disabled in the thresholds"
        return res, [], None
    if ref is None:
        res.message = "the reference was recorded without a model: no reference scores"
        return res, [], None
    ref = ref.loc[ref["rank"] < pt.top_k]
    # model cosines only: a cold start or a fallback logs popularity counts in the same field
    requests = model_ranked(requests)
    rows = [(s, h) for row, h in zip(requests.get("scores", []), requests["history_len"] if "history_len" in requests else [None] * len(requests))
            for s in row[: pt.top_k]]
    cur = pd.DataFrame({"score": [s for s, _ in rows], "history_len": [h for _, h in rows]}).astype({"score": "float64"})
    problems = []
    finite = np.isfinite(cur["score"].to_numpy())
    if len(cur) and not finite.any():
        problems.append(f"serving log 'scores' are NaN/inf in all {len(cur)} served items: the serving path logs broken scores")
        res.status, res.message, res.n_current = "error", problems[0], len(cur)
        return res, problems, None
    cur = cur[finite]
    ref, res.message = match_history_lengths(ref, cur["history_len"] if cur["history_len"].notna().any() else None, seed)
    ref, cur = ref[["score"]], cur[["score"]]
    res.n_reference, res.n_current = len(ref), len(cur)
    if len(ref) < pt.min_rows or len(cur) < pt.min_rows:
        res.status = "insufficient_data"
        res.message = f"{len(ref)} reference and {len(cur)} current served scores, at least {pt.min_rows} each needed"
        return res, problems, None
    ref, cur = _sample(ref, pt.max_rows, seed), _sample(cur, pt.max_rows, seed)
    defn = DataDefinition(numerical_columns=["score"])
    snap = Report([ValueDrift(column="score", method=pt.method, threshold=pt.threshold)]).run(
        Dataset.from_pandas(cur, data_definition=defn), Dataset.from_pandas(ref, data_definition=defn))
    res.score = float(snap.dict()["metrics"][0]["value"])
    res.status = "drift" if drifted(pt.method, res.score, pt.threshold) else "ok"
    return res, problems, snap


def serving_mix_check(requests: pd.DataFrame, th: ScenarioThresholds) -> CheckResult:
    """Fallback and cold-start rates of the window: status ``alert`` above their thresholds."""
    mt = th.serving_mix
    res = CheckResult("serving_mix", "skipped", method="fallback / cold-start share of requests", threshold=mt.max_fallback_rate)
    if not mt.enabled:
        res.message = "disabled in the thresholds"
        return res
    n = len(requests)
    res.n_current = n
    if n < mt.min_requests:
        res.status, res.message = "insufficient_data", f"{n} requests, at least {mt.min_requests} needed"
        return res
    flag = lambda col: float(requests[col].fillna(False).astype(bool).mean()) if col in requests else 0.0  # noqa: E731
    fallback, cold = flag("fallback"), flag("cold_start")
    res.score = fallback
    alerts = []
    if fallback > mt.max_fallback_rate:
        alerts.append(f"{fallback:.1%} of requests served by the popularity fallback (max {mt.max_fallback_rate:.1%}): "
                      "a dependency is failing (the serving pods' /readyz and fallback_reason in the log say which)")
    if cold > mt.max_cold_start_rate:
        alerts.append(f"{cold:.1%} cold starts (max {mt.max_cold_start_rate:.1%}): new users, or user ids that no longer "
                      "match the feature store's")
    res.status = "alert" if alerts else "ok"
    res.message = "; ".join(alerts) or f"fallback {fallback:.1%}, cold start {cold:.1%}"
    return res


def _expected_hit_rate(ref: Reference, scenario: str, key: str, k: int, negative: list[str]) -> tuple[float | None, str]:
    """What the online hit rate should be: the reference's replay of its own requests (same
    measurement, same kind of traffic), else the pipeline's offline evaluation (a different
    protocol: only a collapse shows)."""
    rep = ((ref.info.get("model") or {}).get("replay_hits") or {}).get(scenario)
    if rep and rep.get("k") == k and rep.get("requests"):
        return sum(v for a, v in rep["hits"].items() if a not in negative) / rep["requests"], f"reference replay {key}"
    off = ((ref.info.get("offline_metrics") or {}).get(scenario) or {}).get(key)
    return (None if off is None else float(off)), f"offline {key}"


def hit_rate_check(requests: pd.DataFrame, feedback: pd.DataFrame, ref: Reference, scenario: str, th: ScenarioThresholds) -> CheckResult:
    ht = th.hit_rate
    key = f"hr@{ht.k}"
    expected, source = _expected_hit_rate(ref, scenario, key, ht.k, ht.negative_actions)
    res = CheckResult("online_hit_rate", "skipped", method=f"online {key} / {source}", threshold=ht.min_ratio)
    if not ht.enabled:
        res.message = "disabled in the thresholds"
        return res
    if expected is None:
        res.message = (f"the reference has neither a replay {key} (record it with a model and top_k = {ht.k}) nor an "
                       f"offline {key} for this scenario (meta['offline_metrics'])")
        return res
    fb = feedback[feedback["request_id"].notna()] if len(feedback) else feedback
    pos = fb[~fb["action"].isin(ht.negative_actions)] if len(fb) else fb
    engaged = set(fb["request_id"]) if len(fb) else set()
    # like the reference: responses the model ranked (a cold start's popularity list is not the model's)
    requests = model_ranked(requests)
    served = requests[requests["request_id"].isin(engaged)] if len(requests) else requests
    res.n_current = len(served)
    if len(served) < ht.min_requests:
        res.status = "insufficient_data"
        res.message = f"{len(served)} model-ranked requests with feedback, at least {ht.min_requests} needed"
        return res
    liked = pos.groupby("request_id")["item_id"].agg(set).to_dict() if len(pos) else {}
    hits = sum(bool(liked.get(r, set()) & set(items[: ht.k])) for r, items in zip(served["request_id"], served["items"]))
    online = hits / len(served)
    res.score = online / expected if expected > 0 else math.inf
    res.message = f"online {key} {online:.4f} over {len(served)} requests vs {source} {expected:.4f}"
    res.status = "drift" if res.score < ht.min_ratio else "ok"
    return res


OWN_CHECKS = ("behaviour", "online_hit_rate", "reference")


def verdict(checks: list[CheckResult], drifted_elsewhere: list[str] | None = None) -> tuple[str, list[str]]:
    """The scenario's verdict and notes. The user tower reads every scenario's history, so a
    behaviour shift in one scenario moves user embeddings and scores in all of them: model-side
    drift (user_embedding, served_score) makes a scenario drifted only when no other scenario's
    own traffic drifted; otherwise it is attributed to those scenarios in a note."""
    own = {c.status for c in checks if c.name in OWN_CHECKS}
    model_drift = [c.name for c in checks if c.name not in OWN_CHECKS and c.status == "drift"]
    status = {c.status for c in checks}
    notes = []
    notes += [f"ALERT {c.name}: {c.message}" for c in checks if c.status == "alert"]  # reported, never drift
    if "drift" in own:
        return "drift", notes
    if model_drift:
        if not drifted_elsewhere:
            return "drift", notes
        notes.append(f"{', '.join(model_drift)} drifted, attributed to the behaviour drift in {', '.join(drifted_elsewhere)} "
                     "(the user tower mixes all scenarios' histories)")
    if "ok" in status or model_drift:
        return "ok", notes
    if "error" in status:
        return "error", notes
    return "insufficient_data", notes
