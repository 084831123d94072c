"""The runtime image for real: built from this checkout (`make image`: a debootstrap base and a
wheelhouse made on the host), then run as a cluster would run it: the training pipeline's
components, compiled for that image, each in its own container (kfp.local.DockerRunner on the host
network, the same component code a KFP backend runs), against a Milvus Lite server on the host."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from docker_util import docker, record_timing

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "synthetic",
    "dataset_args": {"n_users": 300, "n_items": 160, "seed": 5},
    "experiment": {"model": {"item_source": "cache-residual", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
                   "train": {"epochs": 20, "batch_size": 16, "warmup_steps": 2, "patience_steps": 40, "lr": 0.003}},
}


@pytest.mark.slow
@pytest.mark.timeout(2700)  # the first test builds the image: from nothing (debootstrap, wheelhouse) ~10 min here
def test_image_runs_non_root_on_a_read_only_root_with_every_piece(image):
    r = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", image,
               "sh", "-c", "id -u && redrec --help && python -c 'import bentoml, feast, kfp, evidently, pymilvus, torch, "
               "redrec, components, pipelines, s3fs, gcsfs; from feast.infra.online_stores.redis import RedisOnlineStore; "
               "print(torch.__version__, torch.cuda.is_available())'")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "10001"  # not root
    assert "release" in r.stdout and "pipeline" in r.stdout  # the CLI's subcommands
    assert lines[-1] == "2.13.0+cpu False"  # CPU torch, pinned
    # nothing writable but what is mounted
    r = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", image, "sh", "-c", "touch /opt/redrec/x")
    assert r.returncode != 0 and "Read-only file system" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_runtime_image_has_no_compiler_and_loads_deepspeeds_op_as_built(image):
    """The Dockerfile's builder stage compiles DeepSpeed's shared-memory comm op into the deepspeed
    package; the runtime stage has no compiler, so the op must load as built, on a read-only root
    where a JIT build (TORCH_EXTENSIONS_DIR) could not even write its lock file."""
    r = docker("run", "--rm", image, "sh", "-c", "command -v gcc cc g++ c++ x86_64-linux-gnu-gcc-12")
    assert r.returncode != 0 and r.stdout.strip() == "", f"a compiler is in the runtime image: {r.stdout}"
    r = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", image,
               "python", "-c",
               "from deepspeed.git_version_info import installed_ops; "
               "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
               "from redrec.train.trainer import init_distributed; "
               "print(init_distributed('cpu')); "
               "print(bool(installed_ops['deepspeed_shm_comm']), ShareMemCommBuilder().load().__file__)")
    assert r.returncode == 0, r.stdout + r.stderr
    *_, world, op = r.stdout.splitlines()
    assert world == "(0, 1)", r.stdout[-2000:]
    assert re.fullmatch(r"True /opt/redrec/lib/python3\.11/site-packages/deepspeed/ops/comm/deepspeed_shm_comm_op\S*\.so", op), op
    assert "Building extension" not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def released(image, tmp_path_factory):
    """The training pipeline run by kfp.local.DockerRunner in the image (deploy_target none: the
    release is the model store + the alias); yields (params, result, captured output)."""
    import io
    from contextlib import redirect_stdout

    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.localrun import release_milvus_connections, run_local, stop_milvus

    ws = tmp_path_factory.mktemp("docker-runner") / "ws"
    params = PipelineParams(**TINY, workspace=str(ws), deploy_target="none")
    t0 = time.monotonic()
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            res = run_local(params, image=image)
        record_timing("docker_runner_pipeline_s", time.monotonic() - t0)
        release_milvus_connections()
        yield params.model_copy(update={"milvus_uri": res.summary["milvus_uri"]}), res, buf.getvalue()
    finally:
        release_milvus_connections()
        stop_milvus(ws)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_training_pipeline_runs_in_the_image_with_the_docker_runner(image, released, capfd):
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.pipeline.localrun import release_milvus_connections, task_output
    from redrec.release.model_store import ModelStore

    params, res, printed = released
    out = printed + capfd.readouterr().out
    assert res.ok, res.error + "\n" + out[-6000:]
    # every step ran in a container of the image (kfp's DockerRunner says so per task)
    assert out.count(f"Found image '{image}'") == 8, out[-3000:]
    assert [s["step"] for s in res.steps] == ["prepare-data", "features", "train", "evaluate", "gate", "publish",
                                              "deploy", "drift-reference"]
    version = task_output(res.run_dir, "train")
    assert res.summary["gate_passed"] is True
    # what the containers wrote is where the host (and serving) reads it
    ws = Path(params.workspace)
    store = ModelStore(str(ws / "model-store"))
    assert store.versions() == [version]
    man = store.manifest(version)
    assert man["release"]["collection"] == f"redrec_items_v{version}"
    assert man["release"]["metrics"]["overall"]["ndcg@10"] > 0 and man["release"]["data_digest"]["training_set_sha256"]
    assert current_version(IndexConfig(uri=params.milvus_uri, name=params.index_alias)) == version
    release_milvus_connections()
    cfg = json.loads((res.run_dir / "train" / "model" / "config.json").read_text())
    assert cfg["version"] == version and cfg["launcher"] == "in-process"
    assert (ws / "drift" / "reference" / "reference.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serving_container_serves_the_release_on_a_read_only_root(image, released, tmp_path):
    """The serving workload as the chart runs it: the image's `bentoml serve`, uid 10001, read-only
    root, no capabilities, config mounted read-only, the model store mounted read-only, Feast
    through a feature server, Milvus on the host network."""
    import httpx
    import yaml

    from redrec.index.lite import free_port
    from redrec.serving.feast_server import FeatureServer

    params, res, _ = released
    assert res.ok, res.error
    ws = Path(params.workspace)
    version = json.loads((res.run_dir / "train" / "model" / "config.json").read_text())["version"]
    port = free_port()
    log_dir = tmp_path / "serving-log"
    log_dir.mkdir()
    os.chmod(log_dir, 0o777)  # written by the container's uid
    with FeatureServer(ws / "feast") as fs_url:
        cfg = {"scenarios": ["homefeed", "search", "ads"],
               "experiment": {"name": "default", "holdout_share": 0.0,
                              "arms": [{"name": "control", "model_version": version, "index_alias": "", "share": 1.0}]},
               "serving": {"port": port, "feature_server_url": fs_url, "serving_log": {"dir": "/var/log/redrec/serving"}},
               "milvus": {"uri": params.milvus_uri, "collection_alias": params.index_alias},
               "feast": {"registry": str(ws / "feast" / "feast_registry.db")},
               "model_store": {"uri": str(ws / "model-store"), "config_poll_s": 5}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        os.chmod(tmp_path / "config.yaml", 0o644)
        name = f"redrec-serving-test-{port}"
        run = docker("run", "-d", "--rm", "--name", name, "--network", "host", "--user", "10001:10001", "--read-only",
                     "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp",
                     "--tmpfs", "/var/lib/bentoml:uid=10001", "-e", "REDREC_CONFIG=/etc/redrec/config.yaml",
                     "-v", f"{tmp_path / 'config.yaml'}:/etc/redrec/config.yaml:ro",
                     "-v", f"{ws / 'model-store'}:{ws / 'model-store'}:ro",
                     "-v", f"{ws / 'feast'}:{ws / 'feast'}:ro",
                     "-v", f"{log_dir}:/var/log/redrec/serving",
                     image, "bentoml", "serve", "bentos.service:RedRec", "--host", "127.0.0.1", "--port", str(port))
        assert run.returncode == 0, run.stderr
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            ready = None
            while time.monotonic() < deadline:
                try:
                    ready = httpx.get(url + "/readyz", timeout=5)
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if docker("inspect", name).returncode != 0 or "Application startup failed" in docker("logs", name).stderr:
                    break
                time.sleep(1)
            logs = docker("logs", name).stdout + docker("logs", name).stderr
            assert ready is not None and ready.status_code == 200, logs[-4000:]
            data = steps_data(res)
            user = str(data.events["user_id"].iloc[0])
            r = httpx.post(url + "/recommend", json={"user_id": user, "scenario": "homefeed", "k": 5}, timeout=30)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["model_version"] == out["index_version"] == version and len(out["items"]) == 5
            assert not out["cold_start"] and not out["fallback"]
            bad = httpx.post(url + "/recommend", json={"user_id": user, "scenario": "shop"}, timeout=30)
            assert bad.status_code == 400 and bad.json()["field"] == "scenario"
            st = httpx.get(url + "/ops/release", timeout=30).json()
            assert st["arms"]["control"]["paired_with_alias"] is True and st["model_source"].startswith("model store")
            # the response was logged where the drift job reads it, by the container's own user
            logged = [json.loads(line) for f in log_dir.rglob("*.jsonl") for line in f.read_text().splitlines()]
            assert any(rec.get("request_id") == out["request_id"] for rec in logged)
        finally:
            docker("rm", "-f", name)


def steps_data(res):
    from redrec.pipeline.steps import load_prepared

    return load_prepared(res.run_dir / "prepare-data" / "data")
