"""The TrainJob launcher against an emulated Kubernetes API (kmock) on 127.0.0.1.

kmock stores what the client creates and serves it back; like any emulator it has no controller,
so the test plays the Trainer controller: it fills the server-side fields of the created
TrainJob, creates its node pod, serves the pod's log and sets the job's terminal condition.
"""

from __future__ import annotations

import asyncio
import datetime
import json

import kmock
import pytest
from kubernetes import client as k8s

from redrec.pipeline.trainjob import TrainJobSpec, run_trainjob, trainer_client

NS = "ml"
GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
TRAINJOBS = kmock.resource(GROUP, VERSION, "trainjobs")
CTRS = kmock.resource(GROUP, VERSION, "clustertrainingruntimes")
PODS = kmock.resource("", "v1", "pods")

RUNTIME = {
    "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "deepspeed-distributed", "labels": {"trainer.kubeflow.org/framework": "deepspeed"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "mpi": {"numProcPerNode": 1, "mpiImplementation": "OpenMPI",
                                            "sshAuthMountPath": "/home/mpiuser/.ssh", "runLauncherAsNode": True}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node",
            "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         "spec": {"template": {"spec": {"containers": [
                             {"name": "node", "image": "ghcr.io/kubeflow/trainer/deepspeed-runtime:v2"}]}}}},
        }]}},
    },
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@pytest.fixture
def api(kmock):
    for res in ("v1/pods", "v1/configmaps", f"{GROUP}/{VERSION}/trainjobs", f"{GROUP}/{VERSION}/trainingruntimes"):
        kmock.resources[res] = {}  # a real API server knows these even with no objects
    kmock.objects[CTRS, None, "deepspeed-distributed"] = RUNTIME
    kmock.objects[kmock_configmaps(), "kubeflow-system", "kubeflow-trainer-public"] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeflow-trainer-public"},
        "data": {"kubeflow_trainer_version": "v2.1.0"}}

    def server_fields(request):
        # what the API server adds on create; the emulator stores the body as sent
        name = request.data["metadata"]["name"]
        obj = kmock.objects[TRAINJOBS, NS, name]
        obj.patch({"metadata": {"namespace": NS, "creationTimestamp": _now(), "uid": f"uid-{name}"}})
        return dict(obj.raw)

    kmock[f"post /apis/{GROUP}/{VERSION}/namespaces/{NS}/trainjobs"] << server_fields
    return kmock


def kmock_configmaps():
    return kmock.resource("", "v1", "configmaps")


def _client(api):
    cfg = k8s.Configuration()
    cfg.host = str(api.url).rstrip("/")
    return trainer_client(NS, client_configuration=cfg)


def _launch(api, spec, log):
    # the client talks to kmock over HTTP; build and run it off the event loop that serves kmock
    return run_trainjob(spec, _client(api), log)


def _spec(tmp_path, **kw) -> TrainJobSpec:
    base = dict(name="redrec-test", num_nodes=2, gpus_per_node=4, command=["python", "-m", "redrec.cli", "train", "--config", "/w/exp.yaml"],
                env={"PYTHONUNBUFFERED": "1"}, export_dir=tmp_path / "out" / "model", timeout_s=20, poll_s=0.2)
    base.update(kw)
    return TrainJobSpec(**base)


async def _controller(api, outcome: str | None, export_dir=None, log_lines=("epoch 1/1 loss 3.1",), node=None):
    """Wait for the TrainJob, then act as the Trainer controller for it; ``node(job)``, when
    given, runs node 0's work for real and returns its log lines."""
    for _ in range(400):
        jobs = [k for k in api.objects if k[0] == TRAINJOBS]
        if jobs:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no TrainJob was created")
    key = jobs[0]
    name = key[2]
    if node is not None:
        log_lines = await node(dict(api.objects[key].raw))
    now = _now()
    # MPI runtime (deepspeed): the launcher pod is step node-0 (where mpirun's output goes), the
    # worker pods are node-1..N
    for role, idx in (("launcher", 0), ("node", 0), ("node", 1)):
        pod_name = f"{name}-{role}-0-{idx}"
        api.objects[PODS, NS, pod_name] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": NS, "creationTimestamp": now, "labels": {
                "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": role,
                "batch.kubernetes.io/job-completion-index": str(idx)}},
            "spec": {"containers": [{"name": "node", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
            "status": {"phase": "Running"},
        }
    pod = f"{name}-launcher-0-0"
    api[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << ("\n".join(log_lines) + "\n").encode()
    await asyncio.sleep(0.5)
    if outcome is None:
        return key  # never finishes: the launcher must time out
    if outcome == "Complete" and export_dir is not None:
        export_dir.mkdir(parents=True)
        (export_dir / "config.json").write_text(json.dumps({"format": "redrec-checkpoint/1"}))
    api.objects[key].patch({"status": {"conditions": [
        {"type": outcome, "status": "True", "reason": "Done" if outcome == "Complete" else "BackoffLimitExceeded",
         "message": "", "lastTransitionTime": now}]}})
    return key


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_trainjob_is_created_as_specified_and_succeeds(api, tmp_path):
    spec = _spec(tmp_path)
    lines: list[str] = []
    ctl = asyncio.create_task(_controller(api, "Complete", spec.export_dir))
    out = await asyncio.to_thread(_launch, api, spec, lines.append)
    key = await ctl
    assert out == spec.export_dir
    job = api.objects[key]
    assert key[1] == NS and key[2] == "redrec-test"
    assert job["apiVersion"] == f"{GROUP}/{VERSION}" and job["kind"] == "TrainJob"
    s = job["spec"]
    assert s["runtimeRef"]["name"] == "deepspeed-distributed" and s["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
    assert s["trainer"]["numNodes"] == 2
    assert s["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] in (4, "4")
    assert s["trainer"]["command"] == spec.command
    assert s["trainer"]["image"] == "ghcr.io/kubeflow/trainer/deepspeed-runtime:v2"  # the runtime's, none given
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in s["trainer"]["env"]
    assert s["activeDeadlineSeconds"] == 20
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "redrec"
    assert any("epoch 1/1 loss 3.1" in ln for ln in lines), lines  # the node log reached the step's log
    assert any("complete" in ln for ln in lines)


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_failed_trainjob_fails_the_step_with_its_log(api, tmp_path):
    spec = _spec(tmp_path)
    lines: list[str] = []
    ctl = asyncio.create_task(_controller(api, "Failed", log_lines=("CUDA error: out of memory",)))
    with pytest.raises(RuntimeError, match="TrainJob redrec-test failed"):
        await asyncio.to_thread(_launch, api, spec, lines.append)
    await ctl
    assert any("out of memory" in ln for ln in lines)
    assert not spec.export_dir.exists()


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_trainjob_past_its_timeout_is_deleted_and_fails_the_step(api, tmp_path):
    spec = _spec(tmp_path, timeout_s=3, poll_s=0.2)
    ctl = asyncio.create_task(_controller(api, None))
    with pytest.raises(TimeoutError, match="did not complete within 3s; it was deleted"):
        await asyncio.to_thread(_launch, api, spec, lambda _: None)
    key = await ctl
    assert api.objects[key].deleted
    assert len(api[kmock.method.DELETE]) == 1


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_missing_checkpoint_after_success_is_an_error(api, tmp_path):
    spec = _spec(tmp_path)
    ctl = asyncio.create_task(_controller(api, "Complete", export_dir=None))
    with pytest.raises(RuntimeError, match="wrote no checkpoint.*volume mounted"):
        await asyncio.to_thread(_launch, api, spec, lambda _: None)
    await ctl


def test_spec_validates_and_builds_from_pipeline_params(tmp_path):
    from redrec.experiment import ExperimentConfig
    from redrec.pipeline.config import PipelineParams

    with pytest.raises(ValueError, match="name"):
        _spec(tmp_path, name="Bad_Name")
    with pytest.raises(ValueError, match="num_nodes"):
        _spec(tmp_path, num_nodes=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.parquet").write_bytes(b"x")
    (data / "items.parquet").write_bytes(b"x")
    p = PipelineParams(nodes=4, gpus_per_node=8, trainer_image="reg/redrec:1")
    spec = TrainJobSpec.from_params(p, ExperimentConfig(), data, tmp_path / "scratch", "20260101000000_ab12")
    assert (spec.name, spec.num_nodes, spec.gpus_per_node, spec.image) == ("redrec-20260101000000-ab12", 4, 8, "reg/redrec:1")
    exp = (tmp_path / "scratch" / "experiment.yaml").read_text()
    assert "dataset: parquet" in exp and str(tmp_path / "scratch" / "data" / "events.parquet") in exp
    assert spec.command[-4:] == ["--config", str(tmp_path / "scratch" / "experiment.yaml"),
                                 "--meta", str(tmp_path / "scratch" / "checkpoint-meta.json")]
    assert json.loads((tmp_path / "scratch" / "checkpoint-meta.json").read_text()) == {"version": "20260101000000_ab12"}
    assert spec.version == "20260101000000_ab12"


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_train_step_on_a_trainjob_writes_the_in_process_checkpoint_layout(api, tmp_path, monkeypatch):
    """The pipeline's train step with launcher=trainjob: the TrainJob's node command runs for real
    (as node 0 of the job would, on the shared workspace), and its checkpoint has the layout of the
    in-process launcher's, version and lineage included."""
    import sys

    import yaml

    from redrec.pipeline import steps
    from redrec.pipeline.config import PipelineParams

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(api.url).rstrip("/")}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": NS}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))  # read once, at import
    exp = {"model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 16, "layers": 1, "heads": 2, "max_len": 20}},
           "train": {"max_steps": 12, "batch_size": 16, "warmup_steps": 2, "patience_steps": 16, "lr": 0.003}}
    base = PipelineParams(dataset="synthetic", dataset_args={"n_users": 80, "n_items": 60, "seed": 2}, experiment=exp,
                          workspace=str(tmp_path / "ws"))
    data, ts = tmp_path / "data", tmp_path / "ts"
    await asyncio.to_thread(steps.prepare_data, base, data)
    await asyncio.to_thread(steps.build_features, base, data, ts)

    async def node(job: dict) -> list[str]:
        cmd = job["spec"]["trainer"]["command"]
        assert cmd[:3] == ["python", "-m", "redrec.cli"] and "--meta" in cmd
        proc = await asyncio.create_subprocess_exec(sys.executable, *cmd[1:], stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()[-3000:]
        return out.decode().splitlines()[-20:]

    p = base.model_copy(update={"nodes": 2, "launcher": "trainjob"})
    ctl = asyncio.create_task(_controller(api, "Complete", node=node))
    tj = await asyncio.to_thread(steps.train, p, data, ts, tmp_path / "tj-model", "20261202000000_aa01")
    await ctl
    ip = await asyncio.to_thread(steps.train, base, data, ts, tmp_path / "ip-model", "20261202000000_aa02")
    a = json.loads((tmp_path / "tj-model" / "config.json").read_text())
    b = json.loads((tmp_path / "ip-model" / "config.json").read_text())
    assert a["version"] == "20261202000000_aa01" == tj["version"] and b["version"] == "20261202000000_aa02"
    assert (a["launcher"], b["launcher"]) == ("trainjob", "in-process")
    assert set(a) == set(b), set(a) ^ set(b)
    for k in ("training_set_sha256", "training_set_rows", "training_input", "dataset", "variant"):
        assert a[k] == b[k], k
    assert a["valid"]["overall"]["ndcg@10"] > 0 and a["history"]
    assert sorted(f.name for f in (tmp_path / "tj-model").iterdir()) == sorted(f.name for f in (tmp_path / "ip-model").iterdir())
