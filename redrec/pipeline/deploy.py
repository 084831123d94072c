"""Roll the serving deployment to a new model version: locally (a ``bentoml serve`` process on
127.0.0.1 that outlives the pipeline) or on Kubernetes (the chart's ConfigMap + a rollout).

Either way the model is first stored in the BentoML model store (``redrec:<version>``); the
serving config's arms that served the previous production version move to the new one (arms
pinned to another version, e.g. an A/B challenger, are left alone). A failed roll restores the
previous config and server, so the deployed model never changes half way.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import yaml

from redrec.pipeline.config import PipelineParams
from redrec.pipeline.outputs import fault_point


def serving_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "serving"


def deployed_version(workspace: str | Path) -> str | None:
    """The model version the local deployment serves (the first arm's), or None."""
    p = serving_dir(workspace) / "config.yaml"
    if not p.exists():
        return None
    arms = (yaml.safe_load(p.read_text()) or {}).get("experiment", {}).get("arms") or []
    return arms[0]["model_version"] if arms else None


def _next_config(params: PipelineParams, old: dict | None, version: str, scenarios: list[str]) -> dict:
    ws = Path(params.workspace).resolve()
    if old is None:
        cfg = {"scenarios": scenarios,
               "experiment": {"name": "default", "holdout_share": 0.0,
                              "arms": [{"name": "control", "model_version": version, "index_alias": "", "share": 1.0}]}}
    else:
        cfg = json.loads(json.dumps(old))
        prev = deployed_version(params.workspace)
        for arm in cfg["experiment"]["arms"]:
            if arm["model_version"] == prev:
                arm["model_version"] = version
        cfg["scenarios"] = scenarios
    cfg.setdefault("serving", {}).update(port=params.serving_port)
    cfg["serving"].setdefault("serving_log", {"dir": str(ws / "serving-log")})
    cfg.setdefault("milvus", {}).update(uri=params.milvus_uri, collection_alias=params.index_alias)
    cfg.setdefault("feast", {}).update(repo_path=str(ws / "feast"))
    return cfg


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_recorded(state_path: Path, timeout_s: float = 30.0) -> None:
    """Stop the server a previous deploy left running (its process group)."""
    if not state_path.exists():
        return
    pid = json.loads(state_path.read_text()).get("pid")
    state_path.unlink()
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(f"serving_port {port} on 127.0.0.1 is in use by another process; stop it (e.g. "
                               "`redrec pipeline stop --config <its config>`) or set params.serving_port") from None


def _start(config_path: Path, port: int, state_path: Path, version: str, bento: str | None) -> dict:
    from redrec.serving.local import LocalServer

    # a readiness probe answered by some other server on the port must not pass for ours
    _check_port_free(port)
    srv = LocalServer(config_path, port=port)
    srv.start(timeout_s=float(os.environ.get("REDREC_SERVING_START_TIMEOUT", "300")))
    if not srv.alive():
        raise RuntimeError(f"bentoml serve exited after its readiness probe passed:\n{srv.log_tail()}")
    state = {"pid": srv.proc.pid, "url": srv.url, "version": version, "bento": bento, "config": str(config_path),
             "started": time.time()}
    _write(state_path, json.dumps(state, indent=2))
    # leave it running: the service outlives the pipeline; the next deploy stops it by pid
    srv.proc = None
    return state


def deploy_local(params: PipelineParams, model_dir: Path, version: str) -> dict:
    from redrec.serving.local import build_bento
    from redrec.serving.registry import MODEL_NAME

    info = json.loads((model_dir / "config.json").read_text())
    d = serving_dir(params.workspace)
    d.mkdir(parents=True, exist_ok=True)
    cfg_path, state_path = d / "config.yaml", d / "server.json"
    old_text = cfg_path.read_text() if cfg_path.exists() else None
    old_state = json.loads(state_path.read_text()) if state_path.exists() else None
    bento = build_bento(models=[f"{MODEL_NAME}:{version}"])  # the bento a cluster rollout would containerize
    new = _next_config(params, yaml.safe_load(old_text) if old_text else None, version, info["model"]["scenarios"])
    _stop_recorded(state_path)
    try:
        _write(cfg_path, yaml.safe_dump(new, sort_keys=False))
        fault_point("deploy", params.inject_fault, "after writing the new serving config")
        state = _start(cfg_path, params.serving_port, state_path, version, bento)
    except BaseException:
        _stop_recorded(state_path)
        if old_text is None:
            cfg_path.unlink(missing_ok=True)
        else:
            _write(cfg_path, old_text)
            if old_state is not None:
                _start(cfg_path, params.serving_port, state_path, old_state["version"], old_state.get("bento"))
        raise
    print(f"[redrec-pipeline] serving {version} at {state['url']} (bento {bento}, config {cfg_path})", flush=True)
    return state


def deploy_model(params: PipelineParams, model_dir: Path, version: str) -> dict:
    from redrec.serving.registry import list_versions, save_model

    if version not in list_versions():
        save_model(model_dir, version, labels={"dataset": str(params.dataset)[:63]})
    if params.deploy_target == "none":
        fault_point("deploy", params.inject_fault, "after storing the model")
        return {"version": version, "target": "none"}
    if params.deploy_target == "kubernetes":
        from redrec.pipeline.k8s_deploy import deploy_kubernetes

        return deploy_kubernetes(params, version)
    return deploy_local(params, model_dir, version)


def stop_local(workspace: str | Path) -> None:
    """Stop the local service a pipeline run left behind (``redrec pipeline stop``)."""
    _stop_recorded(serving_dir(workspace) / "server.json")
