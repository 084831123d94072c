"""Deploy on Kubernetes: point the chart's ConfigMap arms at the new version and roll the
serving Deployment (a pod-template annotation change, what ``kubectl rollout restart`` does),
then wait for the rollout; on failure the ConfigMap is restored and rolled again.

Names come from the chart's release (env ``REDREC_RELEASE_FULLNAME``, default ``redrec``) and
the namespace from ``REDREC_DEPLOY_NAMESPACE`` (default: the pod's own). The serving pods read the
model from the model store the step wrote to (the config's ``model_store.uri``: the workspace PVC
or object storage); the pods also reload a changed ConfigMap in place, the rollout makes it
immediate and observable.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import yaml

from redrec.pipeline.config import PipelineParams
from redrec.pipeline.outputs import fault_point


def _apis():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api(), client.AppsV1Api()


def _namespace() -> str:
    ns = os.environ.get("REDREC_DEPLOY_NAMESPACE")
    if ns:
        return ns
    p = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return p.read_text().strip() if p.exists() else "default"


def _names() -> tuple[str, str]:
    full = os.environ.get("REDREC_RELEASE_FULLNAME", "redrec")
    return f"{full}-config", f"{full}-serving"


def configmap_config() -> dict:
    """The serving config the chart's ConfigMap holds now."""
    core, _ = _apis()
    cm = core.read_namespaced_config_map(_names()[0], _namespace())
    return yaml.safe_load(cm.data["config.yaml"]) or {}


def _roll(apps, name: str, ns: str, timeout_s: float) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    apps.patch_namespaced_deployment(name, ns, {"spec": {"template": {"metadata": {"annotations": {
        "redrec.io/restarted-at": now}}}}})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = apps.read_namespaced_deployment(name, ns)
        st, want = d.status, d.spec.replicas or 0
        if (st.observed_generation or 0) >= d.metadata.generation and (st.updated_replicas or 0) == want \
                and (st.available_replicas or 0) == want and (st.replicas or 0) == want:
            return
        time.sleep(5)
    raise TimeoutError(f"deployment {ns}/{name} did not finish rolling out in {timeout_s:.0f}s")


def deploy_kubernetes(params: PipelineParams, version: str, timeout_s: float = 900.0) -> dict:
    core, apps = _apis()
    ns = _namespace()
    cm_name, dep_name = _names()
    cm = core.read_namespaced_config_map(cm_name, ns)
    old_text = cm.data["config.yaml"]
    cfg = yaml.safe_load(old_text)
    prev = cfg["experiment"]["arms"][0]["model_version"]
    for arm in cfg["experiment"]["arms"]:
        if arm["model_version"] == prev:
            arm["model_version"] = version
    core.patch_namespaced_config_map(cm_name, ns, {"data": {"config.yaml": yaml.safe_dump(cfg, sort_keys=False)}})
    try:
        fault_point("deploy", params.inject_fault, "after patching the ConfigMap")
        _roll(apps, dep_name, ns, timeout_s)
    except BaseException:
        core.patch_namespaced_config_map(cm_name, ns, {"data": {"config.yaml": old_text}})
        _roll(apps, dep_name, ns, timeout_s)
        raise
    return {"version": version, "target": "kubernetes", "deployment": f"{ns}/{dep_name}", "previous": prev}
