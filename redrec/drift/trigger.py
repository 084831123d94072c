"""Start the retraining pipeline when a scenario drifted, at most once per cool-down.

One model serves every scenario, so one retraining run answers any number of drifted
scenarios: the cool-down is per pipeline, not per scenario. Where the last run was started is
remembered twice: in ``<report_dir>/trigger-state.json`` (local runs, and a cluster whose report
dir persists) and, on a cluster, in KFP itself (runs of the drift experiment created within the
cool-down), because a CronJob pod's disk does not outlive it.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from redrec.drift.config import DriftConfig

STATE_FILE = "trigger-state.json"
RUN_PREFIX = "redrec-drift-retrain"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"


@dataclass
class TriggerResult:
    fired: bool
    reason: str
    mode: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    state: str | None = None
    drifted: list[str] = field(default_factory=list)
    started: float | None = None
    cooldown_until: float | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def kfp_client(cfg: DriftConfig):
    """``kfp.Client`` for the configured host; in a pod, authenticated by the projected,
    audience-bound ServiceAccount token the chart mounts (KF_PIPELINES_SA_TOKEN_PATH)."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH") or DEFAULT_TOKEN_PATH
    creds = ServiceAccountTokenVolumeCredentials(path=token) if Path(token).exists() else None
    kwargs = {"namespace": cfg.kfp_namespace} if cfg.kfp_namespace else {}
    return kfp.Client(host=cfg.kfp_host, credentials=creds, **kwargs)


def _recent_cluster_run(client, cfg: DriftConfig, experiment_id: str, since: float):
    runs = client.list_runs(experiment_id=experiment_id, page_size=20, sort_by="created_at desc").runs or []
    for r in runs:
        created = r.created_at.timestamp() if hasattr(r.created_at, "timestamp") else None
        if created is not None and created >= since and (r.display_name or "").startswith(RUN_PREFIX):
            return r, created
    return None, None


def _fire_cluster(cfg: DriftConfig, res: TriggerResult, run_name: str, now: float) -> None:
    client = kfp_client(cfg)
    exp = client.create_experiment(cfg.experiment_name, namespace=cfg.kfp_namespace)
    recent, created = _recent_cluster_run(client, cfg, exp.experiment_id, now - cfg.cooldown_hours * 3600)
    if recent is not None:
        res.reason = f"cool-down: KFP run {recent.run_id} ({recent.display_name}) started at {_iso(created)}"
        res.run_id, res.run_name, res.started = recent.run_id, recent.display_name, created
        res.cooldown_until = created + cfg.cooldown_hours * 3600
        return
    version = cfg.pipeline_version_id
    if not version:
        versions = client.list_pipeline_versions(cfg.pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
        if not versions:
            raise RuntimeError(f"KFP pipeline {cfg.pipeline_id} has no version; upload one (kfp pipeline upload-version)")
        version = versions[0].pipeline_version_id
    run = client.run_pipeline(exp.experiment_id, run_name, pipeline_id=cfg.pipeline_id, version_id=version, params=cfg.pipeline_params)
    res.fired, res.run_id, res.state = True, run.run_id, str(run.state) if run.state else "PENDING"
    res.reason = f"started KFP run {run.run_id} of pipeline {cfg.pipeline_id} (version {version})"


def _fire_local(cfg: DriftConfig, res: TriggerResult) -> None:
    from kfp import local

    module, func = cfg.local_pipeline.split(":")
    try:
        pipeline = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"cannot import the retraining pipeline '{cfg.local_pipeline}': {e}") from None
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(cfg.report_dir / "kfp-local"), raise_on_error=True)
    res.fired = True
    res.reason = f"ran {cfg.local_pipeline} with kfp.local (SubprocessRunner)"
    try:  # kfp.local runs the pipeline to completion here
        pipeline(**cfg.pipeline_params)
        res.state = "SUCCEEDED"
    except Exception as e:  # it did start: the cool-down holds, and the summary says it failed
        res.state, res.error = "FAILED", f"{type(e).__name__}: {e}"


def maybe_trigger(cfg: DriftConfig, drifted: list[str], check_id: str, now: float) -> TriggerResult:
    res = TriggerResult(fired=False, reason="", drifted=list(drifted))
    if not drifted:
        res.reason = "no scenario drifted"
        return res
    if not cfg.trigger:
        res.reason = "trigger disabled (--no-trigger)"
        return res
    res.mode = "cluster" if cfg.cluster else "local"
    if res.mode == "cluster" and not cfg.pipeline_id:
        res.error = res.reason = "cluster trigger needs a pipeline id (--pipeline-id or drift.pipeline_id)"
        return res
    state_path = cfg.report_dir / STATE_FILE
    last = _read_state(state_path)
    if last.get("started") and now - float(last["started"]) < cfg.cooldown_hours * 3600:
        res.cooldown_until = float(last["started"]) + cfg.cooldown_hours * 3600
        res.run_id, res.run_name, res.started = last.get("run_id"), last.get("run_name"), float(last["started"])
        res.reason = (f"cool-down: retraining {last.get('run_name')} started at {_iso(res.started)}; "
                      f"the next may start after {_iso(res.cooldown_until)}")
        return res
    run_name = f"{RUN_PREFIX}-{check_id}"
    res.run_name, res.started = run_name, now
    try:
        if res.mode == "cluster":
            _fire_cluster(cfg, res, run_name, now)
        else:
            _fire_local(cfg, res)
    except Exception as e:  # the check itself succeeded; the summary must still say what failed
        res.error = f"{type(e).__name__}: {e}"
        res.reason = "failed to start the retraining pipeline: " + res.error
        res.fired = False
        return res
    if res.fired:
        res.cooldown_until = now + cfg.cooldown_hours * 3600
        _write_state(state_path, {"started": now, "run_id": res.run_id, "run_name": run_name, "mode": res.mode,
                                  "drifted": list(drifted), "recorded": time.time()})
    return res
