"""The runtime image for real: built from this checkout (`make image`: a debootstrap base and a
wheelhouse made on the host), then run as a cluster would run it: the training pipeline's
components, compiled for that image, each in its own container (kfp.local.DockerRunner on the host
network, the same component code a KFP backend runs), against a Milvus Lite server on the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("REDREC_TEST_IMAGE", "redrec:dev")
TIMINGS = ROOT / "build" / "container-timings.json"

TINY = {
    "dataset": "synthetic",
    "dataset_args": {"n_users": 300, "n_items": 160, "seed": 5},
    "experiment": {"model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
                   "train": {"epochs": 20, "batch_size": 16, "warmup_steps": 2, "patience": 5, "lr": 0.003}},
}


def _record(key: str, seconds: float) -> None:
    """Wall times of this run (image build, pipeline run), for the closing notes and the README."""
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    d = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    d[key] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(d, indent=2))


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def image():
    subprocess.run([str(ROOT / "scripts" / "docker_engine.sh")], check=True, timeout=900)
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "scripts" / "build_image.sh"), IMAGE], cwd=ROOT, capture_output=True, text=True,
                       timeout=3000, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    _record("image_build_s", time.monotonic() - t0)
    print(r.stdout)
    return IMAGE


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
@pytest.mark.timeout(1800)
def test_training_pipeline_runs_in_the_image_with_the_docker_runner(image, tmp_path, capfd):
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.localrun import release_milvus_connections, run_local, stop_milvus, task_output
    from redrec.release.model_store import ModelStore

    ws = tmp_path / "ws"
    params = PipelineParams(**TINY, workspace=str(ws), deploy_target="none")
    t0 = time.monotonic()
    try:
        res = run_local(params, image=image)
        _record("docker_runner_pipeline_s", time.monotonic() - t0)
        out = capfd.readouterr().out
        assert res.ok, res.error + "\n" + out[-6000:]
        # every step ran in a container of the image (kfp's DockerRunner says so per task)
        assert out.count(f"Found image '{image}'") == 8, out[-3000:]
        assert [s["step"] for s in res.steps] == ["prepare-data", "features", "train", "evaluate", "gate", "publish",
                                                  "deploy", "drift-reference"]
        version = task_output(res.run_dir, "train")
        assert res.summary["gate_passed"] is True
        # what the containers wrote is where the host (and serving) reads it
        store = ModelStore(str(ws / "model-store"))
        assert store.versions() == [version]
        man = store.manifest(version)
        assert man["release"]["collection"] == f"redrec_items_v{version}"
        assert man["release"]["metrics"]["overall"]["ndcg@10"] > 0 and man["release"]["data_digest"]["training_set_sha256"]
        assert current_version(IndexConfig(uri=res.summary["milvus_uri"], name=params.index_alias)) == version
        cfg = json.loads((res.run_dir / "train" / "model" / "config.json").read_text())
        assert cfg["version"] == version and cfg["launcher"] == "in-process"
        assert (ws / "drift" / "reference" / "reference.json").exists()
    finally:
        release_milvus_connections()
        stop_milvus(ws)
