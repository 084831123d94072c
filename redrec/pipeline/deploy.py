"""Roll the serving deployment to a model version: locally (a ``bentoml serve`` process on
127.0.0.1 that outlives the pipeline) or on Kubernetes (the release ConfigMap, loaded in place by
every serving pod: ``redrec.pipeline.k8s_deploy``).

The model is first written to the model store serving reads (``redrec.release.model_store``)
with its release record; the serving config's arms that served the previous production version
move to the new one (arms pinned to another version, e.g. an A/B challenger, are left alone). A
running local server loads the changed config in place (no new bento, no restart); a failed roll
restores the previous config, so the deployed model never changes half way.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import yaml

from redrec.pipeline.config import PipelineParams
from redrec.pipeline.outputs import fault_point, kill_point

# a local deployment re-reads its config this often (the chart's pods: model_store.config_poll_s)
LOCAL_CONFIG_POLL_S = 1.0


def serving_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "serving"


def deployed_version(workspace: str | Path) -> str | None:
    """The model version the local deployment serves (the first arm's), or None."""
    p = serving_dir(workspace) / "config.yaml"
    if not p.exists():
        return None
    arms = (yaml.safe_load(p.read_text()) or {}).get("experiment", {}).get("arms") or []
    return arms[0]["model_version"] if arms else None


def deployed_versions(params: PipelineParams) -> set[str]:
    """Every model version an arm of the deployment's config names."""
    if params.deploy_target == "kubernetes":
        from redrec.pipeline.k8s_deploy import served_config

        cfg = served_config()
    else:
        p = serving_dir(params.workspace) / "config.yaml"
        cfg = yaml.safe_load(p.read_text()) if p.exists() else {}
    return {a["model_version"] for a in ((cfg or {}).get("experiment") or {}).get("arms") or []}


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
        if (cfg.get("shadow") or {}).get("model_version") == version:
            cfg.pop("shadow")  # the candidate in shadow is promoted: it serves now, and nothing shadows it
        cfg["scenarios"] = scenarios
    cfg.setdefault("serving", {}).update(port=params.serving_port)
    cfg["serving"].setdefault("serving_log", {"dir": str(ws / "serving-log")})
    cfg.setdefault("milvus", {}).update(uri=params.milvus_uri, collection_alias=params.index_alias)
    cfg.setdefault("feast", {}).update(repo_path=str(ws / "feast"))
    cfg.setdefault("model_store", {}).update(uri=params.model_store_uri(), config_poll_s=LOCAL_CONFIG_POLL_S)
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


def _start(config_path: Path, port: int, state_path: Path, version: str) -> dict:
    from redrec.serving.local import LocalServer

    # a readiness probe answered by some other server on the port must not pass for ours
    _check_port_free(port)
    srv = LocalServer(config_path, port=port)
    srv.start(timeout_s=float(os.environ.get("REDREC_SERVING_START_TIMEOUT", "300")))
    if not srv.alive():
        raise RuntimeError(f"bentoml serve exited after its readiness probe passed:\n{srv.log_tail()}")
    state = {"pid": srv.proc.pid, "url": srv.url, "version": version, "config": str(config_path), "started": time.time()}
    _write(state_path, json.dumps(state, indent=2))
    # leave it running: the service outlives the pipeline; the next deploy stops it by pid
    srv.proc = None
    return state


def _running(state: dict | None) -> bool:
    import httpx

    if not state or not state.get("pid"):
        return False
    try:
        os.killpg(state["pid"], 0)
        return httpx.get(state["url"] + "/ops/release", timeout=5).status_code == 200
    except (ProcessLookupError, PermissionError, httpx.HTTPError):
        return False


def wait_serving(url: str, config_text: str, timeout_s: float, headers: dict | None = None) -> dict:
    """Poll ``/ops/release`` until every worker of the server serves ``config_text`` (a worker
    reports the SHA-256 of the config all its pod's workers loaded, and of one any refused; with a
    release overlay, of the overlay's text: ``redrec.serving.config.ConfigSource``); raises when
    it refuses this one. Waiting on the worker that answered would call a release done while its
    siblings, each on its own poll, still serve the old pair. ``headers``: e.g. the bearer token
    ``/ops/release`` needs when the server's auth is on."""
    import hashlib

    import httpx

    want = hashlib.sha256(config_text.encode()).hexdigest()
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url + "/ops/release", timeout=5, headers=headers).json()
        except (httpx.HTTPError, ValueError) as e:
            last = {"error": str(e)}
        cfg = last.get("config") or {}
        if cfg.get("pod_loaded_sha256") == want:
            return last
        if want in (cfg.get("error_sha256"), cfg.get("pod_error_sha256")):
            serving = sorted({a["model_version"] for a in (last.get("arms") or {}).values()})
            err = cfg.get("error") or next((w["error"] for w in (cfg.get("workers") or {}).values() if w.get("error")), "")
            raise RuntimeError(f"the server at {url} refused the new config and still serves {serving}: {err}")
        time.sleep(0.3)
    raise TimeoutError(f"the server at {url} did not load the new config within {timeout_s:.0f}s: {last}")


def deploy_local(params: PipelineParams, version: str) -> dict:
    from redrec.release.model_store import ModelStore

    scenarios = json.loads((ModelStore(params.model_store_uri()).path(version) / "config.json").read_text())["model"]["scenarios"]
    d = serving_dir(params.workspace)
    d.mkdir(parents=True, exist_ok=True)
    cfg_path, state_path = d / "config.yaml", d / "server.json"
    old_text = cfg_path.read_text() if cfg_path.exists() else None
    old_state = json.loads(state_path.read_text()) if state_path.exists() else None
    new = _next_config(params, yaml.safe_load(old_text) if old_text else None, version, scenarios)
    new_text = yaml.safe_dump(new, sort_keys=False)
    timeout = float(os.environ.get("REDREC_SERVING_START_TIMEOUT", "300"))
    running = _running(old_state) and (yaml.safe_load(old_text) or {}).get("serving", {}).get("port") == params.serving_port
    if not running:
        _stop_recorded(state_path)
    try:
        kill_point("deploy:before-config")
        _write(cfg_path, new_text)
        fault_point("deploy", params.inject_fault, "after writing the new serving config")
        kill_point("deploy:after-config")
        if running:  # the server loads the changed config in place
            wait_serving(old_state["url"], new_text, timeout)
            state = {**old_state, "version": version, "reloaded": time.time()}
            _write(state_path, json.dumps(state, indent=2))
        else:
            state = _start(cfg_path, params.serving_port, state_path, version)
    except BaseException:
        if old_text is None:
            _stop_recorded(state_path)
            cfg_path.unlink(missing_ok=True)
        else:
            _write(cfg_path, old_text)
            if running:
                wait_serving(old_state["url"], old_text, timeout)
            elif old_state is not None:
                _stop_recorded(state_path)
                _start(cfg_path, params.serving_port, state_path, old_state["version"])
        raise
    how = "reloaded in place" if running else "started"
    print(f"[redrec-pipeline] serving {version} at {state['url']} ({how}; config {cfg_path})", flush=True)
    return state


def switch_serving(params: PipelineParams, version: str) -> dict:
    """Point the deployment's production arms at ``version`` (already in the model store)."""
    if params.deploy_target == "none":
        fault_point("deploy", params.inject_fault, "after storing the model")
        return {"version": version, "target": "none"}
    if params.deploy_target == "kubernetes":
        from redrec.pipeline.k8s_deploy import deploy_kubernetes

        return deploy_kubernetes(params, version)
    return deploy_local(params, version)


def deploy_model(params: PipelineParams, model_dir: Path, version: str, release_meta: dict | None = None) -> dict:
    from redrec.release.model_store import ModelStore

    store = ModelStore(params.model_store_uri())
    if not store.has(version):
        store.put(model_dir, version, meta=release_meta)
    kill_point("deploy:stored")
    return switch_serving(params, version)


def stop_local(workspace: str | Path) -> None:
    """Stop the local service a pipeline run left behind (``redrec pipeline stop``)."""
    _stop_recorded(serving_dir(workspace) / "server.json")
