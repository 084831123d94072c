"""``redrec release shadow``: put a candidate in shadow (or take it out), and the gate promote
applies to its shadow report.

Locally the workspace's serving config gets (or loses) its ``shadow`` section and the running
server loads it in place (``redrec.pipeline.deploy.wait_serving``); on Kubernetes the release
overlay carries it (``ReleaseOverlay.shadow``; ``{}`` turns off a shadow config.yaml names) and
every serving pod is waited for. A refused config is put back. Under the release lease, like
promote: a shadow change never interleaves with a release moving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from redrec.pipeline.config import PipelineParams, ShadowGate
from redrec.release.releases import ReleaseError


def default_report_dir(params: PipelineParams, version: str) -> Path:
    """Where ``shadow-report --config`` writes, and ``promote --require-shadow`` reads, by default."""
    return Path(params.workspace) / "shadow" / version


def set_shadow(params: PipelineParams, version: str | None, share: float) -> dict:
    """Mirror ``share`` of requests to ``version`` (None: no shadow)."""
    from redrec.release.lease import release_lease

    with release_lease(params).hold():
        if version is not None:
            from redrec.release.releases import _check_promotable

            _check_promotable(params, version)  # in the model store, its collection kept and ready
        if params.deploy_target == "kubernetes":
            return _kubernetes(params, version, share)
        if params.deploy_target == "none":
            raise ReleaseError("deploy_target is 'none': no deployment to put a shadow in")
        return _local(params, version, share)


def _spec(version: str | None, share: float, old: dict | None) -> dict | None:
    if version is None:
        return None
    keep = dict(old) if old and old.get("model_version") == version else {}  # its other settings stay
    return {**keep, "model_version": version, "share": share}


def _refuse_served(version: str | None, served: set[str]) -> None:
    if version is not None and version in served:
        raise ReleaseError(f"model version {version} already serves ({sorted(served)}): a shadow is a candidate no "
                           "user sees yet; give another version")


def _local(params: PipelineParams, version: str | None, share: float) -> dict:
    from redrec.pipeline.deploy import _running, _write, serving_dir, wait_serving

    d = serving_dir(params.workspace)
    cfg_path, state_path = d / "config.yaml", d / "server.json"
    if not cfg_path.exists():
        raise ReleaseError(f"no local deployment: {cfg_path} does not exist (run the training pipeline first)")
    old_text = cfg_path.read_text()
    cfg = yaml.safe_load(old_text) or {}
    _refuse_served(version, {a["model_version"] for a in (cfg.get("experiment") or {}).get("arms") or []})
    spec = _spec(version, share, cfg.get("shadow"))
    if spec is None:
        cfg.pop("shadow", None)
    else:
        cfg["shadow"] = spec
    new_text = yaml.safe_dump(cfg, sort_keys=False)
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    running = _running(state)
    timeout = float(os.environ.get("REDREC_SERVING_START_TIMEOUT", "300"))
    _write(cfg_path, new_text)
    if running:
        try:
            wait_serving(state["url"], new_text, timeout)
        except BaseException as e:
            _write(cfg_path, old_text)
            wait_serving(state["url"], old_text, timeout)
            raise ReleaseError(f"shadow not changed: {e}") from None
    return {"shadow": spec, "target": "local", "config": str(cfg_path), "url": state["url"] if running else None}


def _kubernetes(params: PipelineParams, version: str | None, share: float) -> dict:
    from redrec.pipeline import k8s_deploy as kd
    from redrec.serving.config import ReleaseOverlay

    core, apps = kd._apis()
    ns, n = kd._namespace(), kd._names()
    base_text = core.read_namespaced_config_map(n.config, ns).data["config.yaml"]
    before = kd._read_release(core, n.release, ns)
    old_text = kd._release_text(before)
    served = kd._served(base_text, old_text)
    arms = {a["name"]: a["model_version"] for a in served["experiment"]["arms"]}
    _refuse_served(version, set(arms.values()))
    ov = ReleaseOverlay.parse(old_text) if old_text is not None else ReleaseOverlay(arms=arms)
    ov.shadow = _spec(version, share, served.get("shadow")) or {}  # {}: off, over config.yaml's too
    text = ov.dump()
    written = kd._write_release(core, ns, n.release, text, before)
    try:
        pods = kd.wait_pods(core, apps, ns, n.serving, text, 900.0, params.serving_port)
    except BaseException:
        kd._restore(core, ns, n.release, old_text, written)
        raise
    return {"shadow": ov.shadow or None, "target": "kubernetes", "deployment": f"{ns}/{n.serving}", "pods": sorted(pods)}


def require_shadow(params: PipelineParams, version: str, gate: ShadowGate, report: str | Path | None = None) -> dict:
    """The candidate's shadow report, if it passes ``gate``; else ReleaseError naming the failing
    threshold and the fix."""
    from redrec.experiments.shadow_report import REPORT_JSON, gate_failures

    path = Path(report) if report else default_report_dir(params, version) / REPORT_JSON
    if path.is_dir():
        path = path / REPORT_JSON
    how = (f"put it in shadow (`redrec release shadow {version}`), let it take traffic, then write its report "
           f"(`redrec release shadow-report --log-dir <serving log> --config <run config> --version {version}`)")
    if not path.is_file():
        raise ReleaseError(f"--require-shadow: no shadow report for {version} at {path}: {how}")
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"--require-shadow: shadow report {path} unreadable ({e}): {how}") from None
    fails = gate_failures(rep, version, gate)
    if fails:
        raise ReleaseError(f"--require-shadow: the shadow report {path} of {version} fails the gate "
                           f"(release.shadow_gate in the run config): " + "; ".join(fails))
    return rep
