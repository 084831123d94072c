"""The chart grants each workload exactly what its code asks of the Kubernetes and KFP APIs.

The needs come from the code (tests/rbac_derive.py: the calls on the official Kubernetes client and
on ``kfp.Client`` in every first-party module the workload's entry point reaches); the grants from
the real ``helm template`` output (every Role/ClusterRole bound to the workload's ServiceAccount).
Per ServiceAccount: nothing missing, nothing extra, namespaced rules on named objects where the
verb allows it, and no API token in a pod whose code never calls the Kubernetes API.

Workloads are read from the rendered chart: each container's command names its entry module
(``redrec <group> ...`` -> ``redrec.<group>.cli``, ``bentoml serve <module>:<Service>``, ``python -c
<code>``, ``feast serve``: Feast's own server, no first-party code). The pipeline's deploy step runs
in a KFP pod outside the release (``components/deploy.py``) under the ServiceAccounts
``deploy.rbac.serviceAccounts`` names.
"""

from __future__ import annotations

import copy

import pytest
from rbac_derive import KFP_GROUP, REPO, Grant, Needs, Perm, compare, derive, grants
from test_chart import helm  # noqa: F401 (the fixture)
from test_chart import CI_VALUES, NAMESPACE, RELEASE, of_kind, pod_template, values_file, workloads

FULLNAME = f"{RELEASE}-redrec"
DEPLOY_STEP = ["components.deploy"]
# SDKs in reach that call Kubernetes by their own means, and why the chart grants them nothing
OPAQUE_OK = {
    "redrec.pipeline.trainjob": "the train step's TrainJobs (kubeflow.trainer), created in the pipeline's own "
                                "namespace under the KFP profile's RBAC, not in the release namespace",
}
# verbs a Role can restrict to named objects (create, list, watch and deletecollection cannot)
NAMEABLE = {"get", "update", "patch", "delete"}
ONBOARDING = {"modelStore": {"uri": "/var/lib/redrec/model-store", "existingClaim": "redrec-pipeline-workspace"},
              "items": {"onboarding": {"enabled": True, "configMap": {"name": "redrec-new-items", "key": "items.jsonl"},
                                       "milvusTokenSecret": {"name": "milvus-credentials", "key": "token"}}}}


def entry_modules(c: dict) -> tuple[list[str], dict[str, str]]:
    """(entry modules, inline sources) of a rendered container."""
    argv = [*c.get("command", []), *c.get("args", [])]
    if argv[0] == "redrec":
        group = f"redrec.{argv[1]}.cli"
        assert f'"{group}"' in (REPO / "redrec" / "cli.py").read_text(), f"redrec {argv[1]}: not a subcommand group"
        return ["redrec.cli", group], {}
    if argv[:2] == ["bentoml", "serve"]:
        return [argv[2].split(":")[0]], {}
    if argv[:2] == ["python", "-c"]:
        return ["__inline__"], {"__inline__": argv[2]}
    if argv[0] == "feast":
        return [], {}
    raise AssertionError(f"container {c['name']}: command {argv[:3]} names no entry module the test knows")


@pytest.fixture(scope="module")
def chart(helm, tmp_path_factory):
    """value set -> rendered objects, the onboarding Job included (it is rendered on demand)."""
    overlay = values_file(tmp_path_factory.mktemp("rbac"), ONBOARDING, "items.yaml")
    return {vs: helm.template("-f", CI_VALUES / f"{vs}-values.yaml", "-f", overlay)
            for vs in ("default", "production", "minimal")}


@pytest.fixture(scope="module")
def deploy_needs() -> Needs:
    return derive(DEPLOY_STEP)


def _by_service_account(docs: list[dict]) -> dict[str, list[tuple[dict, Needs]]]:
    out: dict[str, list] = {}
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            entries, sources = entry_modules(c)
            out.setdefault(spec.get("serviceAccountName", "default"), []).append((w, derive(entries, sources)))
    return out


def _union(needs: list[Needs]) -> Needs:
    u = Needs()
    for n in needs:
        for p, where in n.perms.items():
            for w in where:
                u.add(p, w)
        u.sdks |= n.sdks
    return u


def check_service_account(docs: list[dict], sa: str, sa_ns: str, needs: Needs, kfp_ns: str, what: str) -> list[Grant]:
    granted = grants(docs, sa, sa_ns)
    missing, extra = compare(needs, granted)
    assert not missing and not extra, (
        f"{what} (ServiceAccount {sa_ns}/{sa}):\n  needed by the code, not granted by the chart:\n    "
        + "\n    ".join(missing or ["-"]) + "\n  granted by the chart, called nowhere:\n    " + "\n    ".join(extra or ["-"]))
    for g in granted:
        assert "*" not in (g.perm.group, g.perm.resource, g.perm.verb), f"{what}: wildcard in {g.role}"
        want_ns = kfp_ns if g.perm.group == KFP_GROUP else NAMESPACE
        assert g.namespace == want_ns, f"{what}: {g.perm} is granted in {g.namespace}, the code calls it in {want_ns}"
        if g.perm.group != KFP_GROUP and g.perm.verb in NAMEABLE:
            assert g.resource_names, f"{what}: {g.perm} in {g.role} is not limited to named objects (resourceNames)"
    return granted


@pytest.mark.parametrize("value_set,kfp_ns", [("default", NAMESPACE), ("production", "kubeflow-recsys"),
                                              ("minimal", NAMESPACE)])
def test_every_release_workload_gets_exactly_what_its_code_calls(chart, value_set, kfp_ns):
    docs = chart[value_set]
    by_sa = _by_service_account(docs)
    names = {w["metadata"]["name"] for ws in by_sa.values() for w, _ in ws}
    assert f"{FULLNAME}-serving" in names and f"{FULLNAME}-items-onboard" in names
    if value_set != "minimal":
        assert {f"{FULLNAME}-drift", f"{FULLNAME}-ingest", f"{FULLNAME}-feast"} <= names
    for sa, ws in by_sa.items():
        needs = _union([n for _, n in ws])
        what = ", ".join(sorted(w["metadata"]["name"] for w, _ in ws))
        assert not needs.sdks, f"{what}: {needs.sdks} call Kubernetes through an SDK the test cannot read"
        check_service_account(docs, sa, NAMESPACE, needs, kfp_ns, what)
        # a pod whose code never calls the Kubernetes API carries no token for it (KFP gets its
        # own audience-bound projected token)
        if not any(p.group != KFP_GROUP for p in needs.perms):
            for w, _ in ws:
                assert pod_template(w)["spec"].get("automountServiceAccountToken") is False, w["metadata"]["name"]
            for obj in of_kind(docs, "ServiceAccount"):
                if obj["metadata"]["name"] == sa:
                    assert obj.get("automountServiceAccountToken") is False, sa


def test_drift_job_needs_kfp_only(chart):
    """The drift job's needs are the KFP calls that start a retraining run, nothing else."""
    by_sa = _by_service_account(chart["default"])
    drift = next(n for ws in by_sa.values() for w, n in ws if w["kind"] == "CronJob")
    assert {(p.resource, p.verb) for p in drift.perms} >= {("runs", "create"), ("experiments", "create")}
    assert {p.group for p in drift.perms} == {KFP_GROUP}


@pytest.mark.parametrize("value_set,kfp_ns", [("default", NAMESPACE), ("production", "kubeflow-recsys")])
def test_the_pipelines_deploy_step_gets_exactly_what_its_code_calls(chart, deploy_needs, helm, tmp_path, value_set,
                                                                     kfp_ns):
    docs = chart[value_set]
    assert set(deploy_needs.sdks) == set(OPAQUE_OK), deploy_needs.sdks
    assert deploy_needs.perms, "the deploy step calls the Kubernetes API: its derived needs cannot be empty"
    granted = check_service_account(docs, "redrec-pipeline", kfp_ns, deploy_needs, kfp_ns, "deploy step")
    # the named objects are the serving ConfigMap and Deployment this release renders
    named = {(g.perm.resource, n) for g in granted for n in g.resource_names}
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("configmaps", f"{FULLNAME}-config") in named and ("ConfigMap", f"{FULLNAME}-config") in rendered
    assert ("deployments", f"{FULLNAME}-serving") in named and ("Deployment", f"{FULLNAME}-serving") in rendered
    # other subjects, and none at all
    other = helm.template("-f", CI_VALUES / f"{value_set}-values.yaml", "-f", values_file(tmp_path, {"deploy": {"rbac": {
        "serviceAccounts": [{"name": "pipeline-runner", "namespace": "kubeflow"}, {"name": "redrec-pipeline"}]}}}))
    check_service_account(other, "pipeline-runner", "kubeflow", deploy_needs, "kubeflow", "deploy step")
    check_service_account(other, "redrec-pipeline", kfp_ns, deploy_needs, kfp_ns, "deploy step")
    off = helm.template("-f", CI_VALUES / f"{value_set}-values.yaml", "--set", "deploy.rbac.create=false")
    assert not grants(off, "redrec-pipeline", kfp_ns)
    none = values_file(tmp_path, {"deploy": {"rbac": {"serviceAccounts": []}}}, "none.yaml")
    err = helm.template_error("-f", CI_VALUES / f"{value_set}-values.yaml", "-f", none)
    assert "deploy.rbac.serviceAccounts is empty" in err


# ---- the comparison's own failure modes ---------------------------------------------------------


def _deploy_role(docs: list[dict]) -> dict:
    """The deploy step's Role in ``docs`` (a copy: the tests below edit it)."""
    return next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == f"{FULLNAME}-deploy")


def test_a_verb_removed_from_the_role_fails(chart, deploy_needs):
    docs = copy.deepcopy(chart["default"])
    (pods,) = [r for r in _deploy_role(docs)["rules"] if r["resources"] == ["pods"]]
    pods["verbs"].remove("list")
    missing = r"not granted by the chart:\s+core/pods: list  <- redrec.pipeline.k8s_deploy:\d+"
    with pytest.raises(AssertionError, match=missing):
        check_service_account(docs, "redrec-pipeline", NAMESPACE, deploy_needs, NAMESPACE, "deploy step")


def test_a_verb_granted_without_a_call_fails(chart, deploy_needs):
    docs = copy.deepcopy(chart["default"])
    _deploy_role(docs)["rules"][0]["verbs"].append("patch")
    with pytest.raises(AssertionError, match=r"called nowhere:\s+core/configmaps: patch"):
        check_service_account(docs, "redrec-pipeline", NAMESPACE, deploy_needs, NAMESPACE, "deploy step")


def test_a_rule_not_limited_to_named_objects_fails(chart, deploy_needs):
    docs = copy.deepcopy(chart["default"])
    del _deploy_role(docs)["rules"][0]["resourceNames"]
    with pytest.raises(AssertionError, match="not limited to named objects"):
        check_service_account(docs, "redrec-pipeline", NAMESPACE, deploy_needs, NAMESPACE, "deploy step")


def test_a_call_added_anywhere_in_reach_fails(chart):
    """A new call in a module the deploy step reaches (a Lease, serving pods, a custom object),
    and one in a module only imported by it, both show as needs the chart does not grant."""
    src = (REPO / "redrec" / "pipeline" / "k8s_deploy.py").read_text()
    added = src + (
        "\n\ndef _lease(core, coord, custom, ns):\n"
        "    coord.delete_namespaced_lease('redrec-release', ns)\n"
        "    coord.list_namespaced_lease(ns)\n"
        "    core.list_namespaced_service(ns, label_selector='app.kubernetes.io/component=serving')\n"
        "    custom.get_namespaced_custom_object(group='trainer.kubeflow.org', version='v1alpha1', namespace=ns,\n"
        "                                       plural='trainjobs', name='x')\n"
        "    from redrec.pipeline import extra_helper\n")
    helper = "from kubernetes import watch\n\ndef w(core, ns):\n    return watch.Watch().stream(core.list_namespaced_config_map, ns)\n"
    needs = derive(DEPLOY_STEP, {"redrec.pipeline.k8s_deploy": added, "redrec.pipeline.extra_helper": helper})
    with pytest.raises(AssertionError) as e:
        check_service_account(chart["default"], "redrec-pipeline", NAMESPACE, needs, NAMESPACE, "deploy step")
    msg = str(e.value)
    for line in ("coordination.k8s.io/leases: delete", "coordination.k8s.io/leases: list", "core/services: list",
                 "trainer.kubeflow.org/trainjobs: get", "core/configmaps: watch  <- redrec.pipeline.extra_helper:4"):
        assert line in msg, (line, msg)


def test_a_kfp_call_added_to_the_drift_job_fails(chart):
    src = (REPO / "redrec" / "drift" / "trigger.py").read_text()
    added = src + "\n\ndef _clean(client, run_id):\n    client.delete_run(run_id)\n"
    needs = derive(["redrec.cli", "redrec.drift.cli"], {"redrec.drift.trigger": added})
    with pytest.raises(AssertionError, match="pipelines.kubeflow.org/runs: delete  <- redrec.drift.trigger"):
        check_service_account(chart["default"], f"{FULLNAME}-drift", NAMESPACE, needs, NAMESPACE, "drift")


def test_a_call_it_cannot_read_is_refused():
    src = "def f(custom, g):\n    custom.list_namespaced_custom_object(g, 'v1', 'ns', 'things')\n"
    with pytest.raises(AssertionError, match="group/plural are not string literals"):
        derive(["__inline__"], {"__inline__": src})
    # core/v1 events and events.k8s.io events share the method name
    src = "def f(api, ns):\n    api.list_namespaced_event(ns)\n"
    with pytest.raises(AssertionError, match="several API classes"):
        derive(["__inline__"], {"__inline__": src})


def test_the_path_mapping_of_the_kubernetes_client():
    from rbac_derive import k8s_methods

    t = k8s_methods()

    def perm(method):
        (group, resource, verb, cluster, _), = {v[:4] + (None,) for v in t[method].values()}
        return Perm(group, resource, verb, cluster)

    assert perm("read_namespaced_config_map") == Perm("", "configmaps", "get")
    assert perm("patch_namespaced_deployment") == Perm("apps", "deployments", "patch")
    assert perm("replace_namespaced_lease") == Perm("coordination.k8s.io", "leases", "update")
    assert perm("list_namespaced_pod") == Perm("", "pods", "list")
    assert perm("read_namespaced_pod_log") == Perm("", "pods/log", "get")
    assert perm("patch_namespaced_deployment_status") == Perm("apps", "deployments/status", "patch")
    assert perm("delete_collection_namespaced_pod") == Perm("", "pods", "deletecollection")
    assert perm("list_pod_for_all_namespaces") == Perm("", "pods", "list", cluster=True)
    assert perm("create_namespaced_pod_eviction") == Perm("", "pods/eviction", "create")
