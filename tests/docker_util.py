"""The project image and its containers, for the container tests: build it (`make image`'s
script), and run a workload the chart rendered as a kubelet would run it.

``pod_run_args`` turns one container of a rendered Deployment, CronJob or Pod into `docker run`
arguments: command/args with Kubernetes' semantics (command replaces the entrypoint), env with
secretKeyRef and fieldRef resolved, every volume the pod declares at its mount path (ConfigMaps
from the same render, Secrets from the test, claims as host directories, emptyDirs as tmpfs,
projected tokens as files), the pod's user and group, a read-only root, no capabilities and no
privilege escalation. Service names resolve to 127.0.0.1 (host network): the host plays the
cluster network, nothing else is stood in for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("REDREC_TEST_IMAGE", "redrec:dev")
TIMINGS = ROOT / "build" / "container-timings.json"


def record_timing(key: str, seconds: float) -> None:
    """Wall times of this run (image build, pipeline run, chart workloads), for the closing notes."""
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    d = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    d[key] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(d, indent=2))


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def build_image(tag: str = IMAGE) -> str:
    subprocess.run([str(ROOT / "scripts" / "docker_engine.sh")], check=True, timeout=900)
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "scripts" / "build_image.sh"), tag], cwd=ROOT, capture_output=True, text=True,
                       timeout=3000, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    record_timing("image_build_s", time.monotonic() - t0)
    print(r.stdout)
    return tag


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for u, m in units.items():
        if str(q).endswith(u):
            return int(float(str(q)[: -len(u)]) * m)
    return int(q)


def pod_run_args(doc: dict, container: str, *, docs: list[dict], workdir: Path, name: str, image: str,
                 secrets: dict[tuple[str, str], str] | None = None, claims: dict[str, Path] | None = None,
                 hosts: list[str] = (), configmaps: dict[str, dict] | None = None) -> list[str]:
    """`docker run` arguments (after ``run``) for ``container`` of the rendered ``doc``;
    ``configmaps``: objects the cluster holds beside the chart's (the pipeline's release)."""
    secrets, claims = secrets or {}, claims or {}
    spec = pod_spec(doc)
    c = next(x for x in spec["containers"] if x["name"] == container)
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup", uid))
    args = ["-d", "--name", name, "--network", "host"]
    if uid is not None:
        args += ["--user", f"{uid}:{gid}"]
    if psc.get("fsGroup") is not None:
        args += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in csc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for h in hosts:
        args += ["--add-host", f"{h}:127.0.0.1"]
    for e in c.get("env", []):
        if "value" in e:
            value = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            value = name
        else:
            raise ValueError(f"{doc['metadata']['name']}: env {e['name']} has a source this runner does not know")
        args += ["-e", f"{e['name']}={value}"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        ro = ":ro" if m.get("readOnly") else ""
        if "emptyDir" in v:
            size = v["emptyDir"].get("sizeLimit")
            opts = f"uid={uid},gid={gid},mode=0700" + (f",size={_quantity_bytes(size)}" if size else "")
            args += ["--tmpfs", f"{m['mountPath']}:{opts}"]
            continue
        if "persistentVolumeClaim" in v:
            host = claims[v["persistentVolumeClaim"]["claimName"]]
            if m.get("subPath"):
                host = host / m["subPath"]
            ro = ro or (":ro" if v["persistentVolumeClaim"].get("readOnly") else "")
            args += ["-v", f"{host}:{m['mountPath']}{ro}"]
            continue
        d = workdir / f"{name}-{m['name']}"
        d.mkdir(parents=True, exist_ok=True)
        if "configMap" in v:
            cm = next((x for x in docs if x["kind"] == "ConfigMap" and x["metadata"]["name"] == v["configMap"]["name"]), None)
            if cm is None and v["configMap"].get("optional"):
                # the kubelet mounts an optional ConfigMap that does not exist (yet) as an empty directory
                cm = (configmaps or {}).get(v["configMap"]["name"], {"data": {}})
            elif cm is None:
                raise ValueError(f"{doc['metadata']['name']}: volume {m['name']} needs ConfigMap "
                                 f"{v['configMap']['name']}, which the chart did not render")
            files = {i["path"]: cm["data"][i["key"]] for i in v["configMap"].get("items", []) if i["key"] in cm["data"]} \
                or cm["data"]
        elif "secret" in v:
            sname = v["secret"]["secretName"]
            files = {i["path"]: secrets[(sname, i["key"])] for i in v["secret"]["items"]}
        elif "projected" in v:
            files = {s["serviceAccountToken"]["path"]: "test-token-not-a-real-service-account"
                     for s in v["projected"]["sources"] if "serviceAccountToken" in s}
        else:
            raise ValueError(f"{doc['metadata']['name']}: volume {m['name']} has a type this runner does not know")
        for rel, text in files.items():
            (d / rel).write_text(text)
            os.chmod(d / rel, 0o644)
        os.chmod(d, 0o755)
        args += ["-v", f"{d}:{m['mountPath']}:ro"]
    if c.get("command"):
        args += ["--entrypoint", c["command"][0], image, *c["command"][1:], *c.get("args", [])]
    else:
        args += [image, *c.get("args", [])]
    return args
