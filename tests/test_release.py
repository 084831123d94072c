"""Releases for real: the model store, and model + index moving together under load.

A ``bentoml serve`` process started by the pipeline's own deploy step serves v1 from the model
store while v2's index is published, while deploys of v2 are SIGKILLed at each point, while the
index alone is rolled back and while a config naming a missing model is written. Every response
says which model ranked it and which model the searched collection was built from: they must
always be the same."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from kube_util import ApiServer
from models_util import SEQ_LEN, tiny_model, warm_users

ROOT = Path(__file__).resolve().parents[1]


# ---- the model store (no services) ---------------------------------------------------------------


def _fake_checkpoint(d: Path, payload: bytes = b"weights") -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"format": "redrec-checkpoint/1"}))
    (d / "serving.safetensors").write_bytes(payload)
    (d / "item_ids.json").write_text('["a", "b"]')
    np.save(d / "item_embeddings.npy", np.eye(2, dtype=np.float32))
    (d / "model.safetensors").write_bytes(b"training weights are not served")
    return d


def test_model_store_versions_are_immutable_and_incomplete_ones_invisible(tmp_path):
    from redrec.release.model_store import ModelStore

    store = ModelStore(str(tmp_path / "store"))
    assert store.versions() == []
    ck = _fake_checkpoint(tmp_path / "ck")
    uri = store.put(ck, "v1", meta={"release": {"model_version": "v1"}})
    assert uri.endswith("/models/v1") and store.versions() == ["v1"] and store.has("v1")
    assert not (store.path("v1") / "model.safetensors").exists()  # training weights stay out
    assert store.manifest("v1")["release"] == {"model_version": "v1"}
    store.verify("v1")
    with pytest.raises(ValueError, match="already exists; versions are immutable"):
        store.put(ck, "v1")
    # a writer that died before its manifest leaves a version nobody sees, and a retry may write it
    dead = tmp_path / "store" / "models" / "v2"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    assert store.versions() == ["v1"] and not store.has("v2")
    with pytest.raises(LookupError, match="v2.*not in the model store"):
        store.path("v2")
    store.put(ck, "v2")
    assert store.versions() == ["v1", "v2"]
    with pytest.raises(ValueError, match="missing"):
        store.put(tmp_path, "v3")  # not a checkpoint
    with pytest.raises(ValueError, match="letters, digits or underscores"):
        store.put(ck, "../v4")
    (store.path("v1") / "serving.safetensors").write_bytes(b"tampered")
    with pytest.raises(LookupError, match="does not match its manifest"):
        store.verify("v1")


def test_remote_model_store_fetches_a_verified_copy(tmp_path):
    """An object-store URI (fsspec's in-memory filesystem here): readers get a local copy, checked
    against the manifest, and a corrupted object is refused."""
    import fsspec

    from redrec.release.model_store import ModelStore

    store = ModelStore("memory://redrec-test-store", cache_dir=str(tmp_path / "cache"))
    store.put(_fake_checkpoint(tmp_path / "ck"), "v1")
    local = store.path("v1")
    assert local.is_relative_to(tmp_path / "cache") and (local / "serving.safetensors").read_bytes() == b"weights"
    fs = fsspec.filesystem("memory")
    store.put(_fake_checkpoint(tmp_path / "ck2", b"other"), "v2")
    with fs.open("/redrec-test-store/models/v2/serving.safetensors", "wb") as f:
        f.write(b"corrupted in transit")
    with pytest.raises(LookupError, match="does not match its manifest"):
        store.path("v2")
    assert not any(p.name == "v2" for p in (tmp_path / "cache").rglob("v2"))


def _flip_last_byte(path: Path) -> None:
    """A one-bit flip at the end of the file: same size, so only the digest can tell."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_every_read_of_a_stored_model_checks_its_sha256(tmp_path, synthetic_small):
    """A local store (the workspace PVC serving mounts) is read in place: a file altered after
    publication must be refused by every reader, naming the file, both digests and the fix."""
    import hashlib

    from redrec.release.model_store import ModelStore, ModelStoreError
    from redrec.serving.registry import ModelSource

    ck = tiny_model(synthetic_small, tmp_path / "m", seed=0)
    store = ModelStore(str(tmp_path / "store"))
    store.put(ck, "v1")
    store.put(ck, "v2")
    source = ModelSource(store.uri)
    model, info = source.load("v1")  # intact: loads
    assert Path(info["model_dir"]) == tmp_path / "store" / "models" / "v1"
    stored = tmp_path / "store" / "models" / "v1" / "item_embeddings.npy"
    _flip_last_byte(stored)
    want = store.manifest("v1")["files"]["item_embeddings.npy"]["sha256"]
    got = hashlib.sha256(stored.read_bytes()).hexdigest()
    readers = {"store.path": lambda: store.path("v1"), "store.verify": lambda: store.verify("v1"),
               "ModelSource.load": lambda: source.load("v1"), "ModelSource.path": lambda: source.path("v1")}
    for name, read in readers.items():
        with pytest.raises(ModelStoreError) as e:
            read()
        msg = str(e.value)
        assert "v1/item_embeddings.npy" in msg and want in msg and got in msg, (name, msg)
        assert "rollback" in msg and "new version" in msg, (name, msg)
    source.load("v2")  # the other version is untouched and still loads
    # a truncated file is refused by its size, before any hashing
    stored.write_bytes(stored.read_bytes()[:-10])
    with pytest.raises(ModelStoreError, match="item_embeddings.npy.*bytes"):
        store.path("v1")


def test_a_corrupted_cached_copy_of_a_remote_version_is_fetched_again(tmp_path):
    """A remote store's local copy is checked on every read too (a disk or a process may damage
    it after the fetch): a damaged copy is dropped and fetched again from the store."""
    from redrec.release.model_store import ModelStore

    store = ModelStore("memory://redrec-test-cache-store", cache_dir=str(tmp_path / "cache"))
    store.put(_fake_checkpoint(tmp_path / "ck"), "v1")
    local = store.path("v1")
    (local / "serving.safetensors").write_bytes(b"weightz")  # same size, other bytes
    again = store.path("v1")
    assert (again / "serving.safetensors").read_bytes() == b"weights"


def test_a_corrupted_added_items_batch_is_refused(tmp_path):
    """Onboarded items live beside the model (``items-added/<time>-<sha256 prefix>.npz``): a batch
    whose bytes no longer match the digest in its name is refused, naming it."""
    from redrec.items import added
    from redrec.release.model_store import ModelStore, ModelStoreError

    store = ModelStore(str(tmp_path / "store"))
    store.put(_fake_checkpoint(tmp_path / "ck"), "v1")
    vecs = np.ones((2, 4), dtype=np.float32)
    name = added.write_batch(store, "v1", ["n1", "n2"], [["ads"], ["ads"]], vecs, vecs, vecs)
    assert added.read_batch(store, "v1", name).item_ids == ["n1", "n2"]
    _flip_last_byte(tmp_path / "store" / "models" / "v1" / "items-added" / f"{name}.npz")
    with pytest.raises(ModelStoreError, match=f"items-added/{name}.npz.*SHA-256"):
        added.read_batch(store, "v1", name)


def test_drift_reads_of_a_stored_version_check_its_sha256(tmp_path, synthetic_small):
    """The drift reference's model side (``serve_like``) given a model store version directory
    verifies it against its manifest before loading."""
    import pandas as pd

    from redrec.drift.model_side import serve_like
    from redrec.release.model_store import ModelStore, ModelStoreError

    store = ModelStore(str(tmp_path / "store"))
    store.put(_fake_checkpoint(tmp_path / "ck"), "v1")
    d = tmp_path / "store" / "models" / "v1"
    _flip_last_byte(d / "serving.safetensors")
    with pytest.raises(ModelStoreError, match="v1/serving.safetensors.*SHA-256"):
        serve_like(d, synthetic_small.events, synthetic_small.items, pd.DataFrame(), top_k=5)


# ---- model + index under load -------------------------------------------------------------------


def _free_port() -> int:
    from redrec.index.lite import free_port

    return free_port()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pipeline workspace: Milvus Lite server, Feast repo, v1 and v2 checkpoints, v1 released
    by the deploy step (which starts the server)."""
    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.features.store import FeatureRepo
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.deploy import stop_local
    from redrec.pipeline.localrun import ensure_milvus, release_milvus_connections, stop_milvus
    from redrec.serving.stack import publish_checkpoint

    ws = tmp_path_factory.mktemp("release") / "ws"
    data = generate(SyntheticConfig(n_users=120, n_items=200, seed=3))
    models = {v: tiny_model(data, ws.parent / f"m{v}", seed, meta={"version": v}) for seed, v in enumerate(("v1", "v2"))}
    uri = ensure_milvus(ws)
    params = PipelineParams(dataset="synthetic", workspace=str(ws), milvus_uri=uri, serving_port=_free_port())
    try:
        repo = FeatureRepo(ws / "feast", seq_len=SEQ_LEN)
        repo.build_sources(data)
        repo.apply()
        repo.materialize()
        publish_checkpoint(models["v1"], data, uri, params.index_alias, "v1")
        _deploy(params, models["v1"], previous=None)
        release_milvus_connections()
        yield {"params": params, "data": data, "models": models, "ws": ws}
    finally:
        stop_local(ws)
        release_milvus_connections()
        stop_milvus(ws)


def _deploy(params, model_dir, previous, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The pipeline's deploy step in its own process (as kfp runs it), optionally SIGKILLed at a point."""
    code = ("import json, sys\nfrom redrec.pipeline.config import PipelineParams\nfrom redrec.pipeline import steps\n"
            "p = PipelineParams(**json.loads(sys.argv[1]))\nsteps.deploy(p, sys.argv[2], sys.argv[3] or None)\n")
    # the server watches a release overlay, as the chart's pods do (absent until the Kubernetes test writes it)
    env = {**os.environ, "REDREC_TEST_KILL_AT": kill_at or "", "REDREC_RELEASE_OVERLAY": str(_overlay_path(params))}
    res = subprocess.run([sys.executable, "-c", code, params.model_dump_json(), str(model_dir), previous or ""],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if kill_at is None:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _overlay_path(params) -> Path:
    return Path(params.workspace) / "serving" / "release" / "release.yaml"


class Load:
    """Closed-loop clients calling /recommend for warm users until stopped; keeps every answer."""

    def __init__(self, url: str, users: list[str], clients: int = 3):
        self.url, self.users, self.stop_flag = url, users, threading.Event()
        self.answers: list[dict] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = i
            while not self.stop_flag.is_set():
                u = self.users[n % len(self.users)]
                n += 1
                try:
                    r = c.post(self.url + "/recommend", json={"user_id": u, "scenario": "homefeed", "k": 5})
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:300]}")
                else:
                    self.answers.append(r.json())

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)

    def since(self, n: int) -> list[dict]:
        return self.answers[n:]


def _status(url: str) -> dict:
    return httpx.get(url + "/ops/release", timeout=10).json()


def _wait_answers(load: Load, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(load.answers) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(load.answers) >= n, f"only {len(load.answers)} answers; errors: {load.errors[:3]}"


def _models(answers: list[dict]) -> set[str]:
    return {a["model_version"] for a in answers}


@pytest.mark.slow
def test_no_response_ever_pairs_a_model_with_another_models_index(world):
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.index.milvus import rollback as index_rollback
    from redrec.pipeline.localrun import release_milvus_connections
    from redrec.release.model_store import ModelStore
    from redrec.serving.stack import publish_checkpoint

    p, models = world["params"], world["models"]
    url = json.loads((Path(p.workspace) / "serving" / "server.json").read_text())["url"]
    icfg = IndexConfig(uri=p.milvus_uri, name=p.index_alias)
    users = warm_users(world["data"], 8)
    with Load(url, users) as load:
        _wait_answers(load, 20)
        assert _models(load.answers) == {"v1"}

        # v2's index is published (the alias moves) before any deploy: v1 keeps its own collection
        publish_checkpoint(models["v2"], world["data"], p.milvus_uri, p.index_alias, "v2")
        assert current_version(icfg) == "v2"
        time.sleep(2.5)  # past the server's alias TTL: it has seen the new alias
        n = len(load.answers)
        _wait_answers(load, n + 20)
        st = _status(url)["arms"]["control"]
        assert st["model_version"] == "v1" and st["alias_model_version"] == "v2"
        assert st["collection"] == "redrec_items_vv1" and st["paired_with_alias"] is False, st
        assert "keeps the pair (v1, redrec_items_vv1)" in st["note"]
        assert _models(load.since(n)) == {"v1"}
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200  # still serving a whole pair

        # deploy of v2 killed at each point before its config switch: v1 serves on, intact
        for point in ("deploy:start", "deploy:stored", "deploy:before-config"):
            res = _deploy(p, models["v2"], "redrec_items_vv1", kill_at=point)
            assert res.returncode == -9 and f"killed at {point}" in res.stdout, (point, res.stdout[-2000:], res.stderr[-2000:])
            n = len(load.answers)
            time.sleep(1.5)  # longer than the server's config poll
            _wait_answers(load, n + 10)
            assert _models(load.since(n)) == {"v1"}, point
            assert _status(url)["arms"]["control"]["model_version"] == "v1"
        assert ModelStore(p.model_store_uri()).versions() == ["v1", "v2"]  # the killed 'stored' run got that far

        # killed right after its config switch: the config is the commit point, v2 serves whole
        res = _deploy(p, models["v2"], "redrec_items_vv1", kill_at="deploy:after-config")
        assert res.returncode == -9
        deadline = time.monotonic() + 60
        while _status(url)["arms"]["control"]["model_version"] != "v2" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # requests that started on the v1 generation (a whole v1 pair) finish first
        n = len(load.answers)
        _wait_answers(load, n + 20)
        assert _models(load.since(n)) == {"v2"}
        assert _status(url)["arms"]["control"]["paired_with_alias"] is True

        # the index alone rolled back (`redrec index rollback`): v2 keeps searching v2's collection
        index_rollback(icfg)
        release_milvus_connections()
        time.sleep(2.5)
        n = len(load.answers)
        _wait_answers(load, n + 20)
        assert _models(load.since(n)) == {"v2"}
        st = _status(url)["arms"]["control"]
        assert st["alias_model_version"] == "v1" and st["collection"] == "redrec_items_vv2", st

        # a config naming a model that is not in the store is refused whole: v2 serves on
        cfg_path = Path(p.workspace) / "serving" / "config.yaml"
        good = cfg_path.read_text()
        bad = yaml.safe_load(good)
        bad["experiment"]["arms"][0]["model_version"] = "v9"
        cfg_path.write_text(yaml.safe_dump(bad, sort_keys=False))
        deadline = time.monotonic() + 30
        while not _status(url)["config"]["error"] and time.monotonic() < deadline:
            time.sleep(0.2)
        err = _status(url)["config"]["error"]
        assert "v9" in err and "unknown version" in err, err
        n = len(load.answers)
        _wait_answers(load, n + 10)
        assert _models(load.since(n)) == {"v2"}
        cfg_path.write_text(good)

        # a stored model damaged after publication is refused before it is loaded: v2 serves on
        store = ModelStore(p.model_store_uri())
        store.put(models["v2"], "v3")
        _flip_last_byte(Path(store._dir("v3")) / "serving.safetensors")
        time.sleep(1.5)  # the server has read the good config back
        bad["experiment"]["arms"][0]["model_version"] = "v3"
        cfg_path.write_text(yaml.safe_dump(bad, sort_keys=False))
        deadline = time.monotonic() + 30
        while "v3" not in (_status(url)["config"]["error"] or "") and time.monotonic() < deadline:
            time.sleep(0.2)
        err = _status(url)["config"]["error"]
        assert "v3/serving.safetensors does not match its manifest: SHA-256" in err, err
        n = len(load.answers)
        _wait_answers(load, n + 10)
        assert _models(load.since(n)) == {"v2"}
        assert _status(url)["arms"]["control"]["model_version"] == "v2"
        cfg_path.write_text(good)
        shutil.rmtree(store._dir("v3"))  # the next test lists the releases

    answers = load.answers
    assert not load.errors, load.errors[:5]
    ranked = [a for a in answers if not a["cold_start"] and not a["fallback"]]
    assert len(ranked) == len(answers) > 100
    mismatched = [a for a in ranked if a["index_version"] != a["model_version"]]
    assert not mismatched, mismatched[:3]
    assert _models(ranked) == {"v1", "v2"}


@pytest.mark.slow
def test_release_promote_and_rollback_move_model_and_index_together(world):
    """After the load test: `redrec release` lists both releases, rolls back to v1 and promotes v2
    again; each time alias and serving name the same model."""
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.pipeline.localrun import release_milvus_connections
    from redrec.release.releases import ReleaseError, list_releases, promote, rollback

    p = world["params"]
    url = json.loads((Path(p.workspace) / "serving" / "server.json").read_text())["url"]
    icfg = IndexConfig(uri=p.milvus_uri, name=p.index_alias)
    promote(p, "v2")  # whatever the previous test left: a known start
    rows = {r["model_version"]: r for r in list_releases(p)}
    assert set(rows) == {"v1", "v2"} and rows["v2"]["alias"] and rows["v2"]["deployed"] and not rows["v1"]["deployed"]
    out = rollback(p)
    assert out["version"] == "v1" and current_version(icfg) == "v1"
    st = _status(url)["arms"]["control"]
    assert st["model_version"] == "v1" and st["paired_with_alias"] is True
    r = httpx.post(url + "/recommend", json={"user_id": warm_users(world["data"], 1)[0], "scenario": "ads"}, timeout=30).json()
    assert r["model_version"] == r["index_version"] == "v1"
    with pytest.raises(ReleaseError, match="no release older than v1"):
        rollback(p)
    with pytest.raises(ReleaseError, match="not in the model store"):
        promote(p, "v7")
    promote(p, "v2")
    assert current_version(icfg) == "v2" and _status(url)["arms"]["control"]["model_version"] == "v2"
    # the CLI reads the same state
    cfg = Path(p.workspace) / "run.yaml"
    cfg.write_text(yaml.safe_dump({"params": json.loads(p.model_dump_json())}))
    out = subprocess.run([sys.executable, "-m", "redrec.cli", "release", "list", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = {r["model_version"]: r for r in json.loads(out.stdout)}
    assert listed["v2"]["alias"] and listed["v2"]["deployed"] and listed["v1"]["index_status"] == "ready"
    release_milvus_connections()


# ---- one release at a time (redrec.release.lease) -------------------------------------------------

RELEASE_RUN = """
import json, sys
from redrec.pipeline.config import PipelineParams
from redrec.pipeline import steps
p = PipelineParams(**json.loads(sys.argv[1]))
data_dir, model, metrics, run = sys.argv[2:6]
out = steps.publish(p, data_dir, model, metrics, run_id=run)
steps.deploy(p, model, out["previous_collection"], metrics, run_id=run)
print("released", run, flush=True)
"""


def _candidate(world, version: str) -> tuple[Path, Path]:
    """A candidate model (v2's weights under a new version) and its evaluation against production."""
    import shutil

    d = world["ws"].parent / f"cand-{version}"
    shutil.copytree(world["models"]["v2"], d / "model")
    cfg = json.loads((d / "model" / "config.json").read_text())
    cfg["version"] = version
    (d / "model" / "config.json").write_text(json.dumps(cfg))
    (d / "metrics.json").write_text(json.dumps({"candidate_version": version, "production_version": "v2",
                                                "results": {"candidate": {"overall": {"ndcg@10": 0.5}}}}))
    return d / "model", d / "metrics.json"


def _release_run(world, data_dir: Path, version: str, wait_s: float) -> subprocess.Popen:
    """The pipeline's publish and deploy steps of run ``run-<version>``, in their own process."""
    model, metrics = _candidate(world, version)
    env = {**os.environ, "REDREC_RELEASE_WAIT_S": str(wait_s)}
    return subprocess.Popen([sys.executable, "-c", RELEASE_RUN, world["params"].model_dump_json(), str(data_dir),
                             str(model), str(metrics), f"run-{version}"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _serve_v2(world) -> None:
    """v2 released and served, whatever the tests before left (or did not run)."""
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import client
    from redrec.pipeline.localrun import release_milvus_connections
    from redrec.release.model_store import ModelStore
    from redrec.release.releases import promote
    from redrec.serving.stack import publish_checkpoint

    p = world["params"]
    if not ModelStore(p.model_store_uri()).has("v2"):
        try:
            if not client(IndexConfig(uri=p.milvus_uri, name=p.index_alias)).has_collection(f"{p.index_alias}_vv2"):
                publish_checkpoint(world["models"]["v2"], world["data"], p.milvus_uri, p.index_alias, "v2")
        finally:
            release_milvus_connections()
        _deploy(p, world["models"]["v2"], f"{p.index_alias}_vv1")
    promote(p, "v2")
    release_milvus_connections()


def _pair(p, url: str) -> tuple[str | None, str, str | None]:
    """(alias' model version, the model the server serves, the model the serving config names)."""
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.pipeline.deploy import deployed_version
    from redrec.pipeline.localrun import release_milvus_connections

    try:
        alias = current_version(IndexConfig(uri=p.milvus_uri, name=p.index_alias))
    finally:
        release_milvus_connections()
    return alias, _status(url)["arms"]["control"]["model_version"], deployed_version(p.workspace)


@pytest.mark.slow
def test_releases_are_serialised_and_one_lands_whole(world):
    """A release waits for the lease and names its holder; two releases started together on one
    workspace: one lands, the other waited and then refused (production is no longer what its gate
    compared with); alias, served model and serving config name the same release after both."""
    from redrec.data.parquet import save_parquet
    from redrec.release.lease import FileLease

    p = world["params"]
    url = json.loads((Path(p.workspace) / "serving" / "server.json").read_text())["url"]
    _serve_v2(world)
    assert _pair(p, url) == ("v2", "v2", "v2")
    data_dir = world["ws"].parent / "prepared"
    save_parquet(world["data"], data_dir)

    # someone holds the lease (an operator's promote in progress): a release waits, then fails naming it
    op = FileLease(Path(p.workspace) / "release.lock", "operator-promote", wait_s=1)
    op.acquire()
    try:
        run = _release_run(world, data_dir, "v5", wait_s=1)
        out = run.communicate(timeout=300)[0]
        assert run.returncode != 0
        assert f"held by operator-promote (pid {os.getpid()} on {socket.gethostname()}), acquired 20" in out, out[-3000:]
        assert "waited 1s" in out
        assert _pair(p, url) == ("v2", "v2", "v2")  # nothing moved
    finally:
        op.release()

    runs = {v: _release_run(world, data_dir, v, wait_s=120) for v in ("v3", "v4")}
    outs = {v: r.communicate(timeout=600)[0] for v, r in runs.items()}
    landed = [v for v, r in runs.items() if r.returncode == 0]
    assert len(landed) == 1, {v: o[-2000:] for v, o in outs.items()}
    won = landed[0]
    lost = next(v for v in runs if v != won)
    assert f"released run-{won}" in outs[won]
    assert f"production moved from v2 to {won}" in outs[lost], outs[lost][-3000:]
    deadline = time.monotonic() + 30
    while _pair(p, url)[1] != won and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pair(p, url) == (won, won, won)
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import client
    from redrec.pipeline.localrun import release_milvus_connections

    try:  # the refused run built nothing
        assert not client(IndexConfig(uri=p.milvus_uri, name=p.index_alias)).has_collection(f"{p.index_alias}_v{lost}")
    finally:
        release_milvus_connections()
    assert (Path(p.workspace) / "release.lock").read_text() == ""  # released


# ---- Kubernetes: the release ConfigMap, loaded in place by every serving pod ---------------------

NS = "recsys"


async def _kubelet(api, overlay: Path, stop: asyncio.Event, paused: asyncio.Event) -> None:
    """What the kubelet does for the serving pod's optional ConfigMap volume: the release
    ConfigMap's release.yaml appears at the mount (atomically), and goes when it is deleted."""
    import kmock

    key = (kmock.resource("", "v1", "configmaps"), NS, "redrec-release")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    while not stop.is_set():
        if not paused.is_set():
            obj = api.objects[key] if key in api.objects else None
            text = None if obj is None or obj.deleted else (obj.get("data") or {}).get("release.yaml")
            have = overlay.read_text() if overlay.exists() else None
            if text != have:
                if text is None:
                    overlay.unlink()
                else:
                    tmp = overlay.with_name(".tmp")
                    tmp.write_text(text)
                    os.replace(tmp, overlay)
        await asyncio.sleep(0.1)


def _k8s_objects(api, base_text: str, port: int) -> None:
    import kmock

    for res in ("v1/configmaps", "v1/pods", "apps/v1/deployments", "coordination.k8s.io/v1/leases"):
        api.resources[res] = {}
    api.objects[kmock.resource("", "v1", "configmaps"), NS, "redrec-config"] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "redrec-config", "namespace": NS, "resourceVersion": "1"},
        "data": {"config.yaml": base_text}}
    labels = {"app.kubernetes.io/name": "redrec", "app.kubernetes.io/component": "serving"}
    api.objects[kmock.resource("apps", "v1", "deployments"), NS, "redrec-serving"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redrec-serving", "namespace": NS, "generation": 1},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}}}}

    def pod(name, lbl, phase, ip, deleting=False):
        meta = {"name": name, "namespace": NS, "labels": lbl}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        api.objects[kmock.resource("", "v1", "pods"), NS, name] = {
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "serving", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"phase": phase, "podIP": ip}}

    # the one serving pod is the local server; the others must not be waited for (a dead port each)
    pod("redrec-serving-abc", labels, "Running", "127.0.0.1")
    pod("redrec-serving-old", labels, "Running", "127.0.0.2", deleting=True)
    pod("redrec-serving-new", labels, "Pending", None)
    pod("redrec-ingest-xyz", {**labels, "app.kubernetes.io/component": "ingest"}, "Running", "127.0.0.3")


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.kmock(cls=ApiServer)
async def test_kubernetes_release_is_loaded_in_place_survives_config_changes_and_restores_on_preconditions(
        world, kmock, tmp_path, monkeypatch):
    """deploy_target kubernetes against an emulated API server, the pod being the real local server:
    promote writes the release ConfigMap (never the chart's), every serving pod loads it in place
    (no rollout), a changed config.yaml (a helm upgrade) keeps the release, a failed deploy restores
    it, and a restore that would overwrite another writer's change is refused naming it."""
    from kubernetes.config import kube_config

    from kube_util import kubeconfig
    from redrec.pipeline.k8s_deploy import ReleaseConflict, deploy_kubernetes
    from redrec.pipeline.outputs import InjectedFault
    from redrec.release.releases import promote
    from redrec.serving.config import ReleaseOverlay

    import kmock as km

    p = world["params"]
    url = json.loads((Path(p.workspace) / "serving" / "server.json").read_text())["url"]
    await asyncio.to_thread(_serve_v2, world)
    cfg_path = Path(p.workspace) / "serving" / "config.yaml"
    base_text = cfg_path.read_text()  # what the chart's ConfigMap holds: names v2
    _k8s_objects(kmock, base_text, int(url.rsplit(":", 1)[1]))
    kc = kubeconfig(tmp_path / "kubeconfig", kmock, NS)
    monkeypatch.setenv("KUBECONFIG", kc)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kc)
    monkeypatch.setenv("REDREC_DEPLOY_NAMESPACE", NS)
    monkeypatch.setenv("REDREC_RELEASE_FULLNAME", "redrec")
    pk = p.model_copy(update={"deploy_target": "kubernetes"})
    overlay = _overlay_path(p)
    stop, paused = asyncio.Event(), asyncio.Event()
    kubelet = asyncio.create_task(_kubelet(kmock, overlay, stop, paused))
    CMS = km.resource("", "v1", "configmaps")
    try:
        out = await asyncio.to_thread(promote, pk, "v1")
        assert out["pods"] == ["redrec-serving-abc"] and out["previous"] == "v2"
        assert _pair(p, url)[:2] == ("v1", "v1")
        rel = kmock.objects[CMS, NS, "redrec-release"]
        text1 = rel["data"]["release.yaml"]
        assert ReleaseOverlay.parse(text1).arms == {"control": "v1"}
        assert rel["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "redrec-pipeline"
        st = _status(url)["config"]
        assert st["loaded_sha256"] == hashlib.sha256(text1.encode()).hexdigest() and st["overlay"] == str(overlay)
        assert kmock.objects[CMS, NS, "redrec-config"]["data"]["config.yaml"] == base_text  # helm's, untouched
        assert not [r for r in list(kmock) if r.method == km.method.PATCH]  # no rollout, nothing patched
        lease = kmock.objects[km.resource("coordination.k8s.io", "v1", "leases"), NS, "redrec-release"]
        assert lease["spec"]["acquireTime"] and not lease["spec"].get("holderIdentity")  # held, then freed

        # a helm upgrade changes config.yaml (which still names v2): the release keeps serving v1
        reloads = _status(url)["config"]["reloads"]
        cfg_path.write_text(base_text.replace("holdout_share: 0.0", "holdout_share: 0.01"))
        deadline = time.monotonic() + 30
        while _status(url)["config"]["reloads"] == reloads and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        st = _status(url)
        assert st["config"]["reloads"] == reloads + 1 and st["arms"]["control"]["model_version"] == "v1", st["config"]
        cfg_path.write_text(base_text)

        # a deploy that fails after writing the release: restored on its resourceVersion, v1 serves on
        with pytest.raises(InjectedFault):
            await asyncio.to_thread(promote, pk.model_copy(update={"inject_fault": "deploy"}), "v2")
        assert kmock.objects[CMS, NS, "redrec-release"]["data"]["release.yaml"] == text1
        assert _pair(p, url)[:2] == ("v1", "v1")
        puts = [r for r in list(kmock) if r.method == km.method.PUT and "/configmaps/redrec-release" in str(r.url)]
        assert all(r.data["metadata"]["resourceVersion"] for r in puts) and len(puts) == 2  # the write, the restore

        # someone edits the release while a deploy waits for its pods: the restore does not overwrite it
        paused.set()  # the pod never sees this deploy's release: it times out
        edited = {}

        async def edit_when_written():
            while ReleaseOverlay.parse(kmock.objects[CMS, NS, "redrec-release"]["data"]["release.yaml"]).arms["control"] != "v2":
                await asyncio.sleep(0.05)
            theirs = ReleaseOverlay(arms={"control": "v1"}, release={"by": "kubectl-edit", "at": "now"}).dump()
            obj = dict(kmock.objects[CMS, NS, "redrec-release"].raw)
            await asyncio.to_thread(_replace_cm, kmock, obj, theirs)
            edited["text"] = theirs

        editor = asyncio.create_task(edit_when_written())
        with pytest.raises(ReleaseConflict) as e:
            await asyncio.to_thread(deploy_kubernetes, pk, "v2", 3.0)
        await editor
        msg = str(e.value)
        assert "not restored" in msg and "written by kubectl-edit" in msg and "{'control': 'v1'}" in msg, msg
        assert kmock.objects[CMS, NS, "redrec-release"]["data"]["release.yaml"] == edited["text"]  # theirs stands
        paused.clear()
    finally:
        paused.clear()
        # back to the local deployment: no release file, config.yaml alone
        kmock.objects[CMS, NS, "redrec-release"].delete()
        deadline = time.monotonic() + 30
        while overlay.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await kubelet
        cfg_path.write_text(base_text)
    deadline = time.monotonic() + 30
    want = hashlib.sha256(base_text.encode()).hexdigest()
    while _status(url)["config"]["loaded_sha256"] != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert _status(url)["arms"]["control"]["model_version"] == "v2"


def _replace_cm(api, obj: dict, text: str) -> None:
    """Another writer (kubectl edit) replaces the release ConfigMap through the API."""
    from kubernetes import client

    from kube_util import client_config

    core = client.CoreV1Api(client_config(api))
    cm = core.read_namespaced_config_map("redrec-release", NS)
    cm.data = {"release.yaml": text}
    core.replace_namespaced_config_map("redrec-release", NS, cm)
