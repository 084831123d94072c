"""Typed configuration of a pipeline run: the runtime parameters and the cluster settings.

``PipelineParams`` mirrors the training pipeline's KFP parameters one to one (same names, same
defaults), so a YAML file, ``kfp.local`` and a cluster run all take the same values; it is
validated here, at the edge, before anything is launched. ``ClusterConfig`` holds what only the
compiled (Kubernetes) form needs: images, GPU type, node placement, secrets, artifact storage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FAULT_STEPS = ("", "train", "evaluate", "publish", "deploy")
METRIC_RE = re.compile(r"^(ndcg@\d+|hr@\d+|mrr)(:[A-Za-z0-9_-]+)?$")


class PipelineParams(BaseModel):
    """The training pipeline's parameters (see ``pipelines.training_pipeline`` for each one's use)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("movielens-1m", description="data adapter: movielens-1m, synthetic or parquet")
    dataset_args: dict = Field(default_factory=dict, description="keyword arguments of the adapter")
    scenarios: list[str] = Field(default_factory=list, description="scenarios to train and serve; empty = all in the data")
    experiment: dict = Field(default_factory=dict, description="ExperimentConfig fields (model, train, split)")
    hidden_size: int = Field(0, ge=0, description="user-tower width; 0 keeps experiment.model")
    layers: int = Field(0, ge=0, description="user-tower layers; 0 keeps experiment.model")
    epochs: int = Field(0, ge=0, description="cap on training epochs; 0 keeps experiment.train (early stopping decides)")
    max_steps: int = Field(0, ge=0, description="step budget (optimizer steps); 0 keeps experiment.train")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    nodes: int = Field(1, ge=1, description="training nodes (a TrainJob when nodes * gpus > 1)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per training node; 0 = CPU")
    gate_metrics: list[str] = Field(default_factory=lambda: ["ndcg@10"],
                                    description="metrics the candidate must beat popularity and production on: ndcg@K, hr@K, mrr, optionally ':<scenario>'")
    gate_margin: float = Field(0.0, ge=-1.0, le=10.0, description="relative margin: candidate >= production * (1 + margin)")
    workspace: str = Field("build/pipeline/ml1m", description="local state: Feast repo, serving config, drift reference")
    milvus_uri: str = Field("", description="Milvus (or Milvus Lite server) URI; empty = the workspace's Lite server")
    index_alias: str = Field("redrec_items", description="Milvus alias that serving searches")
    feature_store_yaml: str = Field("", description="Feast feature_store.yaml naming the online store the features "
                                                    "step fills (Redis, Postgres); empty = embedded SQLite in the workspace")
    offline_engine: Literal["auto", "pandas", "spark"] = Field(
        "auto", description="what builds the feature sources and the training set: pandas + Feast's DuckDB store in "
                            "one process, or Spark + Feast's Spark offline store (redrec.features.spark_sources); auto: "
                            "spark when feature_store_yaml's offline_store is spark, else pandas")
    model_store: str = Field("", description="model store URI serving reads (directory, s3://, gs://); "
                                             "empty = <workspace>/model-store")
    deploy_target: Literal["local", "kubernetes", "none"] = "local"
    serving_port: int = Field(3000, ge=1, le=65535)
    launcher: Literal["auto", "in-process", "trainjob"] = Field(
        "auto", description="auto: a TrainJob when nodes * max(gpus_per_node, 1) > 1, else in-process")
    trainer_runtime: str = Field("deepspeed-distributed", description="Kubeflow Trainer runtime of the TrainJob")
    trainer_image: str = Field("", description="image of the TrainJob nodes; empty = the runtime's")
    drift_reference_at: Literal["window-end", "events"] = Field(
        "window-end", description="where the drift reference replays the model for sampled users: as they stand at "
                                  "the window's end (returning users) or at their past events (users arriving "
                                  "during the window); redrec.drift.model_side")
    inject_fault: Literal["", "train", "evaluate", "publish", "deploy"] = Field(
        "", description="fault simulation for tests: the named step fails part way")

    @field_validator("gate_metrics")
    @classmethod
    def _metrics_ok(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not METRIC_RE.match(m)]
        if bad or not v:
            raise ValueError(f"gate_metrics {bad or v}: use ndcg@K, hr@K or mrr, optionally suffixed ':<scenario>' "
                             "(e.g. ['ndcg@10', 'hr@10:search'])")
        return v

    @field_validator("index_alias")
    @classmethod
    def _alias_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", v):
            raise ValueError(f"index_alias {v!r}: letters, digits and underscores, not starting with a digit")
        return v

    def model_store_uri(self) -> str:
        return self.model_store or str(Path(self.workspace).resolve() / "model-store")

    def experiment_config(self, out_dir: str | Path):
        """The ``ExperimentConfig`` this run trains: ``experiment`` with the typed overrides applied."""
        from redrec.experiment import ExperimentConfig

        raw = yaml.safe_load(yaml.safe_dump(self.experiment)) or {}  # deep copy of plain data
        raw["dataset"], raw["dataset_args"], raw["out_dir"] = self.dataset, dict(self.dataset_args), str(out_dir)
        raw["variants"] = ["redrec"]
        ut = raw.setdefault("model", {}).setdefault("user_tower", {})
        if self.hidden_size:
            ut["hidden_size"] = self.hidden_size
        if self.layers:
            ut["layers"] = self.layers
        tr = raw.setdefault("train", {})
        if self.epochs:
            tr["epochs"] = self.epochs
        if self.max_steps:
            tr["max_steps"] = self.max_steps
        tr["zero_stage"] = self.zero_stage
        tr.setdefault("progress", False)
        if self.gpus_per_node:
            tr.setdefault("device", "cuda")
        try:
            return ExperimentConfig.model_validate(raw)
        except ValidationError as e:
            raise ValueError(f"pipeline parameter 'experiment' (with the typed overrides) is not a valid ExperimentConfig:\n{e}") from None


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class ClusterConfig(BaseModel):
    """What the compiled pipeline needs on Kubernetes (kfp-kubernetes platform settings)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field("ghcr.io/redrec/redrec:0.1.0", description="image with redrec installed (every step)")
    accelerator_type: str = Field("nvidia.com/gpu", description="GPU resource of the train step")
    gpu_limit: int = Field(1, ge=0, description="GPUs of the train step's own pod (single-node training)")
    train_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    train_tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])
    milvus_secret: str = Field("milvus-credentials", description="Secret with the Milvus token")
    milvus_secret_key: str = "token"
    workspace_pvc: str = Field("redrec-pipeline-workspace", description="PVC mounted at workspace_mount (Feast repo, reference)")
    feast_config_map: str = Field("redrec-feast-config", description="the chart's Feast ConfigMap (feature_store.yaml "
                                                                     "naming the online store serving reads)")
    feast_config_mount: str = "/etc/redrec/feast"
    serving_config_map: str = Field("redrec-config", description="the chart's serving ConfigMap (config.yaml), which "
                                                                 "the onboarding pipeline's step reads")
    release_config_map: str = Field("redrec-release", description="the release ConfigMap (release.yaml: arm -> model "
                                                                  "version) the deploy step writes and the chart never "
                                                                  "renders; the onboarding step reads it over config.yaml")
    feast_secret: str = Field("", description="Secret holding the ${VARS} of feature_store.yaml; empty: none")
    feast_secret_env: dict[str, str] = Field(default_factory=dict, description="its key -> environment variable, e.g. "
                                             "{redis-connection-string: REDIS_CONNECTION_STRING}")
    workspace_mount: str = "/var/lib/redrec"
    pipeline_root: str = Field("s3://redrec-pipelines/runs", description="artifact storage of the runs")
    namespace: str = "kubeflow"
    service_account: str = Field("redrec-pipeline", description="KSA of the steps (TrainJob and Deployment RBAC)")
    release_fullname: str = Field("redrec", description="the chart release's full name: publish and deploy find "
                                                        "<it>-config, <it>-release, <it>-serving and the Lease by it")
    release_namespace: str = Field("", description="namespace of the chart release; empty: the step pod's own")
    ops_token_secret: str = Field("", description="Secret with an API token for the serving pods' /ops/release "
                                                  "(needed while the chart's auth.enabled); empty: none")
    ops_token_key: str = "token"


class ShadowGate(BaseModel):
    """What ``redrec release promote --require-shadow`` asks of the candidate's shadow report
    (``redrec release shadow-report``, ``redrec.experiments.shadow_report``)."""

    model_config = ConfigDict(extra="forbid")

    min_requests: int = Field(1000, ge=1, description="mirrored requests the candidate scored, at least")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="share of mirrored requests the candidate failed on")
    max_drop_rate: float = Field(0.05, ge=0, le=1, description="share of mirrors dropped (shadow queue full or too late)")
    max_p99_latency_ms: float = Field(250.0, gt=0, description="p99 of the candidate's tower forward and search")
    min_overlap: float = Field(0.0, ge=0, le=1, description="overlap@10 with production at least (0: not checked)")


class ReleaseSection(BaseModel):
    """``redrec release`` settings: the shadow's default share and the promotion gate on its report."""

    model_config = ConfigDict(extra="forbid")

    shadow_share: float = Field(0.1, gt=0, le=1, description="share of requests `redrec release shadow` mirrors "
                                                               "when --share is not given")
    shadow_gate: ShadowGate = Field(default_factory=ShadowGate)


class RunConfig(BaseModel):
    """A YAML file for ``redrec pipeline run|compile|submit``: ``params`` + optional ``cluster``.

    ``experiment_config`` names an experiment YAML (e.g. configs/ml1m-cpu.yaml) whose fields
    become ``params.experiment`` (keys given in ``params.experiment`` win)."""

    model_config = ConfigDict(extra="forbid")

    experiment_config: str | None = None
    params: PipelineParams = Field(default_factory=PipelineParams)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    monitoring: dict = Field(default_factory=dict, description="monitoring pipeline parameters (drift thresholds, schedule)")
    release: ReleaseSection = Field(default_factory=ReleaseSection)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "RunConfig":
        p = Path(path)
        if not p.exists():
            raise ValueError(f"--config: {path} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with 'params' (and optionally 'cluster'), got {type(raw).__name__}")
        exp_path = raw.get("experiment_config")
        if exp_path:
            ep = Path(exp_path) if Path(exp_path).is_absolute() or Path(exp_path).exists() else p.parent / exp_path
            if not ep.exists():
                raise ValueError(f"{path}: field 'experiment_config' names {exp_path}, which does not exist")
            base = yaml.safe_load(ep.read_text()) or {}
            params = raw.setdefault("params", {})
            for key in ("dataset", "dataset_args"):
                if key in base and key not in params:
                    params[key] = base[key]
            base = {k: v for k, v in base.items() if k not in ("dataset", "dataset_args", "out_dir", "variants")}
            from redrec.experiment import _merge

            params["experiment"] = _merge(base, params.get("experiment") or {})
        raw.setdefault("params", {}).update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ValueError(f"invalid pipeline configuration {path}:\n{e}") from None
