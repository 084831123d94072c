"""Typed drift configuration: run settings (where data lives, windows, trigger) and thresholds.

Thresholds are per scenario and per metric: ``defaults`` apply everywhere and ``scenarios.<name>``
overrides any subset of them (deep merge), so the ads scenario can tolerate more churn than
homefeed without repeating the whole block. Unknown keys are rejected: a typo in a threshold
file must fail loudly, not silently fall back to a default at 3 a.m.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Evidently stat tests we allow. Distances grow with drift; p-value tests shrink with it, so each
# method carries its direction (see ``drifted``).
ColumnMethod = Literal["wasserstein", "jensenshannon", "psi", "hellinger", "kl_div", "ks", "chisquare", "z"]
PVALUE_METHODS = {"ks", "chisquare", "z"}
EmbeddingMethod = Literal["model", "distance", "mmd", "ratio"]

BEHAVIOUR_FEATURES = ("pop_bucket", "item_age_rank", "seq_len", "hour", "action", "category")
NUMERIC_FEATURES = {"item_age_rank", "seq_len"}
DEFAULT_THRESHOLDS = Path(__file__).resolve().parents[2] / "monitoring" / "thresholds.yaml"


def drifted(method: str, score: float, threshold: float) -> bool:
    return score < threshold if method in PVALUE_METHODS else score >= threshold


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureThreshold(_Strict):
    method: ColumnMethod
    threshold: float = Field(gt=0)
    enabled: bool = True


def _default_features() -> dict[str, FeatureThreshold]:
    return {
        f: FeatureThreshold(method="wasserstein" if f in NUMERIC_FEATURES else "jensenshannon", threshold=0.1)
        for f in BEHAVIOUR_FEATURES
    }


class BehaviourThresholds(_Strict):
    # share of judged behaviour features that must drift before the scenario counts as drifted
    drift_share: float = Field(0.3, gt=0, le=1)
    min_reference_rows: int = Field(1000, ge=1)
    min_current_rows: int = Field(1000, ge=1)
    # distances do not depend on n, so capping rows keeps a check fast without changing verdicts
    max_rows: int = Field(200_000, ge=100)
    features: dict[str, FeatureThreshold] = Field(default_factory=_default_features)

    @field_validator("features")
    @classmethod
    def _known(cls, v: dict[str, FeatureThreshold]) -> dict[str, FeatureThreshold]:
        unknown = sorted(set(v) - set(BEHAVIOUR_FEATURES))
        if unknown:
            raise ValueError(f"unknown behaviour feature(s) {unknown}; known: {list(BEHAVIOUR_FEATURES)}")
        return v


class EmbeddingThresholds(_Strict):
    enabled: bool = True
    # "model": ROC AUC of a classifier telling current from reference (0.5 = indistinguishable)
    method: EmbeddingMethod = "model"
    threshold: float = Field(0.55, gt=0)
    min_rows: int = Field(100, ge=2)
    max_rows: int = Field(5000, ge=10)


class PredictionThresholds(_Strict):
    enabled: bool = True
    method: ColumnMethod = "wasserstein"
    threshold: float = Field(0.2, gt=0)  # noise floor: monitoring/thresholds.yaml
    top_k: int = Field(10, ge=1)
    min_rows: int = Field(2000, ge=1)
    max_rows: int = Field(200_000, ge=100)


class HitRateThresholds(_Strict):
    enabled: bool = True
    k: int = Field(10, ge=1)
    min_requests: int = Field(100, ge=1)
    # online HR@k below min_ratio x offline HR@k counts as drift
    min_ratio: float = Field(0.5, gt=0)
    negative_actions: list[str] = Field(default_factory=lambda: ["skip"])


class ServingMixThresholds(_Strict):
    """What answered the window's requests. A surge of popularity fallbacks is an outage and a
    surge of cold starts a traffic or identity change: both are alerts of their own, never
    drift (retraining fixes neither)."""
    enabled: bool = True
    max_fallback_rate: float = Field(0.05, ge=0, le=1)
    max_cold_start_rate: float = Field(0.5, ge=0, le=1)
    min_requests: int = Field(100, ge=1)


class ScenarioThresholds(_Strict):
    behaviour: BehaviourThresholds = Field(default_factory=BehaviourThresholds)
    embedding: EmbeddingThresholds = Field(default_factory=EmbeddingThresholds)
    prediction: PredictionThresholds = Field(default_factory=PredictionThresholds)
    hit_rate: HitRateThresholds = Field(default_factory=HitRateThresholds)
    serving_mix: ServingMixThresholds = Field(default_factory=ServingMixThresholds)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Thresholds(_Strict):
    defaults: ScenarioThresholds = Field(default_factory=ScenarioThresholds)
    scenarios: dict[str, dict] = Field(default_factory=dict)

    def for_scenario(self, scenario: str) -> ScenarioThresholds:
        over = self.scenarios.get(scenario)
        if not over:
            return self.defaults
        merged = _merge(self.defaults.model_dump(), over)
        try:
            return ScenarioThresholds.model_validate(merged)
        except ValidationError as e:
            raise ValueError(f"thresholds for scenario '{scenario}' are invalid:\n{e}") from None

    def validate_all(self) -> None:
        for s in self.scenarios:
            self.for_scenario(s)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Thresholds":
        p = Path(path)
        if not p.exists():
            raise ValueError(f"thresholds file {p} does not exist; pass --thresholds or use {DEFAULT_THRESHOLDS}")
        try:
            t = cls.model_validate(yaml.safe_load(p.read_text()) or {})
            t.validate_all()
        except ValidationError as e:
            raise ValueError(f"thresholds file {p} is invalid:\n{e}") from None
        return t


class SamplingConfig(_Strict):
    """Caps on what the check keeps of the serving log, so its memory does not grow with the
    window's traffic. Below a cap nothing is sampled (a small window is judged on every line).
    Above it a seeded hash sample is kept: behaviour events by user (a sampled user keeps all
    their events, so sequence lengths stay exact), responses by request id (with the feedback on
    them, so the hit rate joins). The report says what was seen and what was used per scenario."""
    # in-window behaviour events per scenario (the behaviour check samples to max_rows anyway)
    max_events_per_scenario: int = Field(200_000, ge=100)
    # in-window responses per scenario: the embedding (max_rows 5000) and score (max_rows 200k
    # scores = 20k responses at top_k 10) checks sample below it
    max_requests_per_scenario: int = Field(20_000, ge=10)
    # in-window feedback lines answering the kept responses, per scenario (the hit rate's join):
    # feedback files are read before the responses, so this bounds them on its own
    max_answers_per_scenario: int = Field(100_000, ge=10)
    # all kept events (window and lookback, every scenario) of the sampled users: bounds memory
    # where a scenario is rare or absent (its own cap alone would keep every user)
    max_history_events: int = Field(500_000, ge=1000)


class DriftConfig(_Strict):
    """What one ``redrec drift check`` reads, writes and may start."""

    scenarios: list[str] = Field(min_length=1)
    reference_dir: Path
    report_dir: Path
    serving_log_dir: Path | None = None
    # extra behaviour-event files (parquet/csv, canonical schema) besides the serving log's feedback
    events: list[Path] = Field(default_factory=list)
    window_hours: float = Field(24.0, gt=0)
    now: float | None = None
    thresholds: Thresholds = Field(default_factory=Thresholds)
    # trigger
    trigger: bool = True
    cooldown_hours: float = Field(6.0, ge=0)
    kfp_host: str | None = None
    kfp_namespace: str | None = None
    pipeline_id: str | None = None
    pipeline_version_id: str | None = None
    experiment_name: str = "redrec-drift-retraining"
    local_pipeline: str = "pipelines.training:training_pipeline"
    pipeline_params: dict = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seed: int = 0

    @field_validator("local_pipeline")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if v.count(":") != 1 or not all(v.split(":")):
            raise ValueError(f"'{v}' is not an import path; write it as 'package.module:function'")
        return v

    @property
    def cluster(self) -> bool:
        return bool(self.kfp_host)


def load_drift_config(config_path: str | Path | None, overrides: dict) -> DriftConfig:
    """Build the config from the chart's config.yaml (``scenarios``, ``serving.serving_log.dir``,
    ``drift.*``), the environment the CronJob sets, then command-line overrides (non-None only)."""
    raw: dict = {}
    if config_path:
        p = Path(config_path)
        if not p.exists():
            raise ValueError(f"--config: file {p} does not exist")
        doc = yaml.safe_load(p.read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{p}: expected a mapping at the top level")
        if "scenarios" in doc:
            raw["scenarios"] = doc["scenarios"]
        log_dir = ((doc.get("serving") or {}).get("serving_log") or {}).get("dir")
        if log_dir:
            raw["serving_log_dir"] = log_dir
        raw.update(doc.get("drift") or {})
    if os.environ.get("REDREC_SERVING_LOG_DIR"):
        raw["serving_log_dir"] = os.environ["REDREC_SERVING_LOG_DIR"]
    if os.environ.get("REDREC_KFP_NAMESPACE"):
        raw["kfp_namespace"] = os.environ["REDREC_KFP_NAMESPACE"]
    thresholds_path = overrides.pop("thresholds_path", None) or raw.pop("thresholds_path", None)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "thresholds" not in raw or isinstance(raw["thresholds"], (str, Path)):
        path = thresholds_path or raw.pop("thresholds", None) or DEFAULT_THRESHOLDS
        raw["thresholds"] = Thresholds.from_yaml(path)
    missing = [k for k in ("scenarios", "reference_dir", "report_dir") if not raw.get(k)]
    if missing:
        hints = {"scenarios": "config.yaml 'scenarios'", "reference_dir": "--reference or drift.reference_dir",
                 "report_dir": "--out or drift.report_dir"}
        raise ValueError("drift config lacks " + ", ".join(f"'{k}' (set {hints[k]})" for k in missing))
    try:
        return DriftConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"invalid drift configuration ({config_path or 'command line'}):\n{e}") from None
