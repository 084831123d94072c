"""Deploy on Kubernetes without restarting a pod: write the release ConfigMap, then wait until
every serving pod has loaded it.

What helm renders and what the pipeline writes are separate objects: the chart's ConfigMap
``<fullname>-config`` (config.yaml) is helm's, and the pipeline never writes it; the release
ConfigMap ``<fullname>-release`` (release.yaml: arm -> model version, ``ReleaseOverlay``) is the
pipeline's, and the chart never renders it. The serving pods mount both (the release one as an
optional volume) and the config loader lays the release over config.yaml, so a ``helm upgrade``
cannot revert a promoted release, and a fresh install with no release serves the values'
versions. The pods reload a changed file in place; the deploy lists the serving Deployment's
pods by its selector and waits until each reports, at ``/ops/release``, the SHA-256 of the
release text written (``redrec.pipeline.deploy.wait_serving``). A failure restores the previous
release (or deletes the object when there was none) and waits for the pods again.

Every write carries the resourceVersion it was based on: a concurrent writer's change is never
silently overwritten; a 409 Conflict raises ``ReleaseConflict`` naming what the object holds now.

Names come from the chart's release (env ``REDREC_RELEASE_FULLNAME``, default ``redrec``) and
the namespace from ``REDREC_DEPLOY_NAMESPACE`` (default: the pod's own). With auth on, the
serving pods' ``/ops/release`` needs a token: env ``REDREC_OPS_TOKEN``.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from redrec.pipeline.config import PipelineParams
from redrec.pipeline.outputs import fault_point

RELEASE_KEY = "release.yaml"


class ReleaseConflict(RuntimeError):
    """Another writer changed the release ConfigMap between this deploy's read and its write."""


@dataclass(frozen=True)
class Names:
    config: str  # the chart's ConfigMap (config.yaml): helm's
    release: str  # the release ConfigMap (release.yaml): the pipeline's, never rendered by the chart
    serving: str  # the serving Deployment
    lease: str  # the coordination.k8s.io Lease held while a release moves


def _names() -> Names:
    full = os.environ.get("REDREC_RELEASE_FULLNAME", "redrec")
    return Names(f"{full}-config", f"{full}-release", f"{full}-serving", f"{full}-release")


def _namespace() -> str:
    ns = os.environ.get("REDREC_DEPLOY_NAMESPACE")
    if ns:
        return ns
    p = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return p.read_text().strip() if p.exists() else "default"


def _load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _apis():
    from kubernetes import client

    _load_kube_config()
    return client.CoreV1Api(), client.AppsV1Api()


def coordination_api():
    from kubernetes import client

    _load_kube_config()
    return client.CoordinationV1Api()


def _read_release(core, name: str, ns: str):
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_config_map(name, ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _release_text(obj) -> str | None:
    return None if obj is None else (obj.data or {}).get(RELEASE_KEY)


def _served(base_text: str, release_text: str | None) -> dict:
    from redrec.serving.config import ReleaseOverlay, apply_overlay

    cfg = yaml.safe_load(base_text) or {}
    return apply_overlay(cfg, ReleaseOverlay.parse(release_text)) if release_text is not None else cfg


def served_config() -> dict:
    """The serving config the pods serve: the chart's config.yaml with the release laid over it."""
    core, _ = _apis()
    n, ns = _names(), _namespace()
    base = core.read_namespaced_config_map(n.config, ns).data["config.yaml"]
    return _served(base, _release_text(_read_release(core, n.release, ns)))


def _what_changed(core, name: str, ns: str, rv: str | None) -> str:
    now = _read_release(core, name, ns)
    if now is None:
        return f"ConfigMap {ns}/{name} was deleted"
    text = _release_text(now)
    try:
        from redrec.serving.config import ReleaseOverlay

        ov = ReleaseOverlay.parse(text or "")
        held = f"arms {ov.arms}, written by {ov.release.get('by', '?')} at {ov.release.get('at', '?')}"
    except Exception:  # noqa: BLE001 - describing, not validating
        held = f"{RELEASE_KEY} {text!r:.200}"
    return (f"ConfigMap {ns}/{name} changed (resourceVersion {rv} -> {now.metadata.resource_version}); "
            f"it now holds {held}")


def _write_release(core, ns: str, name: str, text: str, before):
    """Create the release ConfigMap (``before`` None) or replace it on ``before``'s resourceVersion."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    meta = client.V1ObjectMeta(name=name, namespace=ns, labels={
        "app.kubernetes.io/part-of": "redrec", "app.kubernetes.io/component": "release",
        "app.kubernetes.io/managed-by": "redrec-pipeline"})
    rv = None if before is None else before.metadata.resource_version
    meta.resource_version = rv
    body = client.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta, data={RELEASE_KEY: text})
    try:
        if before is None:
            return core.create_namespaced_config_map(ns, body)
        return core.replace_namespaced_config_map(name, ns, body)
    except ApiException as e:
        if e.status == 409:
            raise ReleaseConflict(f"release not written: {_what_changed(core, name, ns, rv)} since this deploy read "
                                  "it; another release moved meanwhile (hold the release lease: redrec.release.lease)") from None
        raise


def _restore(core, ns: str, name: str, old_text: str | None, written) -> None:
    """Put back what the release ConfigMap held before this deploy, only if nobody changed it since."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    rv = written.metadata.resource_version
    try:
        if old_text is None:
            core.delete_namespaced_config_map(name, ns, body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(resource_version=rv, uid=written.metadata.uid)))
        else:
            written.data = {RELEASE_KEY: old_text}
            core.replace_namespaced_config_map(name, ns, written)
    except ApiException as e:
        if e.status == 409:
            raise ReleaseConflict(f"the previous release was not restored: {_what_changed(core, name, ns, rv)} after "
                                  "this deploy wrote it; that writer's release stands") from None
        raise


def _ops_headers() -> dict:
    tok = os.environ.get("REDREC_OPS_TOKEN", "")
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def _pod_port(pod, default: int) -> int:
    ports = [p for c in pod.spec.containers or [] for p in (c.ports or [])]
    named = [p.container_port for p in ports if p.name == "http"]
    return (named or [p.container_port for p in ports] or [default])[0]


def serving_pods(core, apps, ns: str, deployment: str) -> tuple[str, list]:
    """(label selector, running pods) of the Deployment (its spec.selector.matchLabels)."""
    dep = apps.read_namespaced_deployment(deployment, ns)
    sel = dep.spec.selector
    if sel.match_expressions:
        raise ValueError(f"deployment {ns}/{deployment}: its selector has matchExpressions, which this deploy does "
                         "not evaluate; select the serving pods by matchLabels (the chart does)")
    selector = ",".join(f"{k}={v}" for k, v in sorted((sel.match_labels or {}).items()))
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    return selector, [p for p in pods if p.metadata.deletion_timestamp is None and p.status is not None
                      and p.status.phase == "Running" and p.status.pod_ip]


def wait_pods(core, apps, ns: str, deployment: str, text: str, timeout_s: float, port: int = 3000) -> dict:
    """Wait until every running pod of ``deployment`` reports ``text`` loaded; pods that start
    meanwhile are waited for as well. Returns pod name -> URL."""
    from redrec.pipeline.deploy import wait_serving

    deadline = time.monotonic() + timeout_s
    done: dict[str, str] = {}
    while True:
        selector, pods = serving_pods(core, apps, ns, deployment)
        if not pods:
            raise RuntimeError(f"deployment {ns}/{deployment} has no running pod (selector {selector}): nothing "
                               "serves the release")
        todo = [p for p in pods if p.metadata.name not in done]
        if not todo:
            return done
        for p in todo:
            url = f"http://{p.status.pod_ip}:{_pod_port(p, port)}"
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError(f"the server at {url} was not checked within {timeout_s:.0f}s")
                wait_serving(url, text, left, headers=_ops_headers())
            except (TimeoutError, RuntimeError) as e:
                raise type(e)(f"pod {ns}/{p.metadata.name}: {e}") from e
            done[p.metadata.name] = url


def deploy_kubernetes(params: PipelineParams, version: str, timeout_s: float = 900.0) -> dict:
    from redrec.serving.config import ReleaseOverlay

    core, apps = _apis()
    ns, n = _namespace(), _names()
    base_text = core.read_namespaced_config_map(n.config, ns).data["config.yaml"]
    before = _read_release(core, n.release, ns)
    old_text = _release_text(before)
    served = _served(base_text, old_text)
    arms = {a["name"]: a["model_version"] for a in served["experiment"]["arms"]}
    prev = next(iter(arms.values()))
    # a shadow stays through a release, unless the release promotes the candidate it shadows
    shadow = ReleaseOverlay.parse(old_text).shadow if old_text is not None else None
    if (served.get("shadow") or {}).get("model_version") == version:
        shadow = {}
    # the arms that served the previous production version move; an arm pinned elsewhere (an A/B
    # challenger) stays where it is
    overlay = ReleaseOverlay(arms={a: (version if v == prev else v) for a, v in arms.items()}, release={
        "model_version": version, "previous": prev, "by": socket.gethostname(),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, shadow=shadow)
    text = overlay.dump()
    written = _write_release(core, ns, n.release, text, before)
    try:
        fault_point("deploy", params.inject_fault, "after writing the release ConfigMap")
        pods = wait_pods(core, apps, ns, n.serving, text, timeout_s, params.serving_port)
    except BaseException:
        _restore(core, ns, n.release, old_text, written)
        try:
            wait_pods(core, apps, ns, n.serving, old_text if old_text is not None else base_text, timeout_s,
                      params.serving_port)
        except Exception as e:  # noqa: BLE001 - the original failure is the one to raise
            print(f"[redrec-pipeline] release restored, but the pods did not confirm it: {e}", flush=True)
        raise
    print(f"[redrec-pipeline] serving {version} on {len(pods)} pod(s) of {ns}/{n.serving} (release "
          f"{ns}/{n.release}, no restart)", flush=True)
    return {"version": version, "target": "kubernetes", "deployment": f"{ns}/{n.serving}", "previous": prev,
            "pods": sorted(pods)}
