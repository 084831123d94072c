"""The chart as rendered, run in real containers of the project image.

`helm template` renders the chart (ci/default-values.yaml plus the addresses of this host's
services); each workload's container then runs as the kubelet would start it (docker_util:
command, args, env, ConfigMaps at their mount paths, Secrets, claims, user, read-only root,
capabilities dropped) against a real Redis (online store), PostgreSQL (SQL registry, TLS) and a
Milvus Lite server, after the training pipeline published the first release into them with the
cluster's Feast config. Serving must become ready and answer, record_events must land in Redis through
the event log and the ingest Deployment (its Redis user created with README's ACL command),
`helm test`'s pod must pass, the drift job must read what serving logged and write its report.
The production values' feature server (Postgres online store, verify-full against the server's
CA, SQL registry) runs too.
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from docker_util import docker, pod_run_args, record_timing
from services_util import Postgres, Redis, readme_event_log_acl
from test_chart import CI_VALUES, NAMESPACE, RELEASE, Helm, find_helm
from test_containers import TINY

ROOT = Path(__file__).resolve().parents[1]
# the test server trusts every login; the chart still passes the passwords by Secret. The registry
# one is part of a URL (the chart says: URL-encoded); the online store one may hold anything
REGISTRY_PASSWORD = "unused"
ONLINE_PASSWORD = "p@ss: w'ord #1"
# the event log's Redis user is created with README's ACL command, so its password is checked
EVENTS_PASSWORD = "ev: p@ss #2"
API_TOKEN = "chart-test-token-0123456789abcdef"


def _wait_http(url: str, name: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as e:
            last = repr(e)
        state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            break
        time.sleep(1)
    logs = docker("logs", name)
    raise AssertionError(f"{name} never answered {url} ({last}):\n{(logs.stdout + logs.stderr)[-5000:]}")


@pytest.fixture(scope="module")
def cluster(image, tmp_path_factory):
    """Redis, Postgres and Milvus Lite on the host; the first release published by the training
    pipeline with the cluster's Feast config (Redis online store, SQL registry in Postgres)."""
    from redrec.index.lite import free_port
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.localrun import release_milvus_connections, run_local, stop_milvus

    pg, redis = Postgres(), Redis()
    pg.start()
    saved = dict(os.environ)
    ws = tmp_path_factory.mktemp("chart") / "ws"
    try:
        os.environ.update({**pg.env(), "REDIS_CONNECTION_STRING": f"127.0.0.1:{redis.port}"})
        params = PipelineParams(**TINY, workspace=str(ws), deploy_target="none",
                                feature_store_yaml=str(ROOT / "feature_repo" / "k8s" / "feature_store.redis.yaml"))
        t0 = time.monotonic()
        buf = io.StringIO()
        with redirect_stdout(buf):
            res = run_local(params)
        assert res.ok, res.error + buf.getvalue()[-4000:]
        record_timing("chart_first_release_pipeline_s", time.monotonic() - t0)
        release_milvus_connections()
        version = json.loads((res.run_dir / "train" / "model" / "config.json").read_text())["version"]
        yield {"pg": pg, "redis": redis, "ws": ws, "milvus_uri": res.summary["milvus_uri"], "version": version,
               "res": res, "ports": {"serving": free_port(), "feast": free_port(), "ingest": free_port()}}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        release_milvus_connections()
        stop_milvus(ws)
        redis.stop()
        pg.stop()


def overlay(cluster: dict, image: str) -> dict:
    """What an operator sets for this cluster: the image, the services' addresses, the release."""
    repo, tag = image.rsplit(":", 1)
    return {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "config": {"experiment": {"arms": [{"name": "control", "modelVersion": cluster["version"], "indexAlias": "", "share": 1.0}]}},
        "milvus": {"uri": cluster["milvus_uri"]},
        # the pipeline workspace claim holds the model store and the drift reference
        "modelStore": {"uri": "/var/lib/redrec/model-store", "existingClaim": "redrec-pipeline-workspace"},
        "serving": {"containerPort": cluster["ports"]["serving"], "service": {"port": cluster["ports"]["serving"]},
                    "servingLog": {"rotateMegabytes": 1}},
        "feast": {"port": cluster["ports"]["feast"],
                  "registry": {"type": "sql", "sql": {"host": "127.0.0.1", "port": cluster["pg"].port, "database": "postgres",
                                                      "user": "feast", "sslmode": "require",
                                                      "passwordSecret": {"name": "feast-registry", "key": "password"}}},
                  "onlineStore": {"type": "redis", "redis": {"connectionString": f"127.0.0.1:{cluster['redis'].port}"}}},
        # the event log in the same Redis, as its own least-privilege ACL user
        "events": {"redis": {"url": f"redis://127.0.0.1:{cluster['redis'].port}/0"}},
        "ingest": {"healthPort": cluster["ports"]["ingest"]},
    }


def render(tmp_path: Path, values_file: Path, extra: dict) -> list[dict]:
    helm = Helm(find_helm(), tmp_path / "helm-home")
    over = tmp_path / f"overlay-{values_file.stem}.yaml"
    # JSON (valid YAML) quotes every string: a version such as 20261202060512_4e31 is a number to helm's YAML
    over.write_text(json.dumps(extra))
    return helm.template("-f", values_file, "-f", over)


def one(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def start(doc, container, name, **kw) -> str:
    r = docker("run", *pod_run_args(doc, container, name=name, **kw))
    assert r.returncode == 0, r.stderr
    return name


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chart_workloads_run_as_rendered(image, cluster, tmp_path):
    import httpx
    import redis as redis_py

    from redrec.features import FeatureRepo

    ws = cluster["ws"]
    serving_log = tmp_path / "serving-log-claim"
    serving_log.mkdir()
    # what fsGroup does on a cluster: the pods' group may write the claims
    for d in (serving_log, ws / "drift", *[p for p in (ws / "drift").rglob("*") if p.is_dir()]):
        os.chmod(d, 0o777)
    docs = render(tmp_path, CI_VALUES / "default-values.yaml", overlay(cluster, image))
    claims = {"redrec-pipeline-workspace": ws, f"{RELEASE}-redrec-serving-log": serving_log}
    secrets = {("feast-registry", "password"): REGISTRY_PASSWORD, ("redrec-events-redis", "password"): EVENTS_PASSWORD,
               ("redrec-api-tokens", "tokens"): f"# rotated in 2026-12\n{API_TOKEN}\n"}
    redis_py.Redis(port=cluster["redis"].port).execute_command(*readme_event_log_acl(EVENTS_PASSWORD))
    fs_host, serving_host = f"{RELEASE}-redrec-feast.{NAMESPACE}.svc", f"{RELEASE}-redrec-serving"
    common = dict(docs=docs, workdir=tmp_path / "pods", image=image, secrets=secrets, claims=claims,
                  hosts=[fs_host, serving_host])
    ports = cluster["ports"]
    names = []
    try:
        t0 = time.monotonic()
        names.append(start(one(docs, "Deployment", f"{RELEASE}-redrec-feast"), "feature-server", f"rr-feast-{ports['feast']}", **common))
        _wait_http(f"http://127.0.0.1:{ports['feast']}/health", names[-1])
        record_timing("chart_feature_server_ready_s", time.monotonic() - t0)
        t0 = time.monotonic()
        names.append(start(one(docs, "Deployment", f"{RELEASE}-redrec-serving"), "serving", f"rr-serving-{ports['serving']}", **common))
        # `helm test`: the chart's test pod, as rendered, waits for the Service's /readyz
        test_pod = one(docs, "Pod", f"{RELEASE}-redrec-test-ready")
        tname = start(test_pod, "readyz", f"rr-test-{ports['serving']}", **common)
        code = docker("wait", tname, timeout=400).stdout.strip()
        out = docker("logs", tname)
        docker("rm", "-f", tname)
        if code != "0":
            _wait_http(f"http://127.0.0.1:{ports['serving']}/readyz", names[-1], timeout=1)
        assert code == "0" and "ready:" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
        record_timing("chart_serving_ready_s", time.monotonic() - t0)

        # the ingest Deployment applies the event log to Feast
        names.append(start(one(docs, "Deployment", f"{RELEASE}-redrec-ingest"), "ingest", f"rr-ingest-{ports['ingest']}", **common))
        _wait_http(f"http://127.0.0.1:{ports['ingest']}/healthz", names[-1], timeout=120)

        url = f"http://127.0.0.1:{ports['serving']}"
        auth = {"authorization": f"Bearer {API_TOKEN}"}
        ev = _events(cluster["res"])
        users = list(ev["user_id"].unique()[:40])
        first = None
        for i, u in enumerate(users):
            r = httpx.post(url + "/recommend", json={"user_id": str(u), "scenario": ("homefeed", "search", "ads")[i % 3], "k": 5},
                           timeout=30)
            assert r.status_code == 200, r.text
            first = first or r.json()
        assert first["model_version"] == first["index_version"] == cluster["version"] and not first["cold_start"]
        assert len(first["items"]) == 5 and not first["fallback"]
        st = httpx.get(url + "/ops/release", headers=auth, timeout=30).json()
        assert st["arms"]["control"]["paired_with_alias"] is True and st["model_source"].startswith("model store")
        # record_events appends to the log (Redis Streams); the ingest container applies it through the
        # feature server to the online store in Redis: read back from Redis itself
        keys_before = redis_py.Redis(port=cluster["redis"].port).dbsize()
        item = str(ev["item_id"].iloc[-1])
        ts = int(time.time())  # inside the drift window (the synthetic log is older)
        r = httpx.post(url + "/record_events", headers=auth, timeout=30,
                       json={"events": [{"user_id": str(users[0]), "item_id": item, "scenario": "search", "action": "click",
                                         "ts": ts, "request_id": first["request_id"]}]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        repo = FeatureRepo(tmp_path / "feast-host", fs_yaml=ROOT / "feature_repo" / "k8s" / "feature_store.redis.yaml")
        os.environ.update({**cluster["pg"].env(), "REDIS_CONNECTION_STRING": f"127.0.0.1:{cluster['redis'].port}"})
        deadline = time.monotonic() + 30
        while (last := repo.online_history(str(users[0]))[-1]).ts != ts and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (last.item_id, last.scenario, last.action, last.ts) == (item, "search", "click", ts)
        assert redis_py.Redis(port=cluster["redis"].port).dbsize() >= keys_before
        health = httpx.get(f"http://127.0.0.1:{ports['ingest']}/healthz", timeout=10).json()
        assert health["ok"] and health["applied"] >= 1 and health["partitions"], health
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert 'redrec_responses_total{kind="model",scenario="homefeed"}' in metrics, metrics[-3000:]

        # the drift CronJob's container reads the log the serving container wrote, writes its report
        logged = [p for p in serving_log.rglob("*.jsonl")]
        assert logged and all(p.stat().st_uid != 0 for p in logged)  # written by the pod's user
        t0 = time.monotonic()
        cj = one(docs, "CronJob", f"{RELEASE}-redrec-drift")
        dname = start(cj, "drift-check", "rr-drift-job", **common)
        code = docker("wait", dname, timeout=900).stdout.strip()
        out = docker("logs", dname)
        docker("rm", "-f", dname)
        record_timing("chart_drift_job_s", time.monotonic() - t0)
        assert code == "0", out.stdout[-3000:] + out.stderr[-3000:]
        (summary_path,) = list((ws / "drift" / "reports").glob("*/summary.json"))
        summary = json.loads(summary_path.read_text())
        assert summary["inputs"]["serving_log_dir"] == "/var/log/redrec/serving"
        assert summary["inputs"]["requests"] == len(users) and summary["inputs"]["feedback"] == 1, summary["inputs"]
        assert (summary_path.parent / "index.html").exists()
    finally:
        for n in names:
            docker("rm", "-f", n)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_production_feature_server_verifies_postgres_tls(image, cluster, tmp_path):
    """ci/production-values.yaml's feature server: Postgres online store with sslmode verify-full
    against the CA from its Secret, SQL registry over TLS. The test server's self-signed
    certificate (CN 127.0.0.1) is the CA; the registry holds the pipeline's definitions."""
    import httpx

    pg = cluster["pg"]
    ca = (pg.root / "data" / "server.crt").read_text()
    extra = overlay(cluster, image)
    extra["global"] = {"imageRegistry": ""}
    extra["image"]["digest"] = ""
    extra["feast"]["registry"]["sql"].update(sslmode="verify-full", passwordSecret={"name": "feast-registry-db", "key": "password"})
    extra["feast"]["onlineStore"] = {"type": "postgres", "postgres": {
        "host": "127.0.0.1", "port": pg.port, "database": "postgres", "dbSchema": "redrec", "user": "feast", "sslmode": "verify-full",
        "sslRootCertSecret": {"name": "feast-online-db-ca", "key": "ca.crt"},
        "passwordSecret": {"name": "feast-online-db", "key": "password"}}}
    # the online rows in Postgres: the pipeline's data materialised with the repo's Postgres config
    from redrec.features import FeatureRepo

    saved = dict(os.environ)
    try:
        os.environ.update(pg.env())
        data = _prepared(cluster["res"])
        repo = FeatureRepo(tmp_path / "pg-repo", fs_yaml=ROOT / "feature_repo" / "k8s" / "feature_store.postgres.yaml")
        repo.build_sources(data)
        repo.apply()
        repo.materialize()
        user = str(data.events["user_id"].iloc[0])
        expected = [h.item_id for h in repo.online_history(user, ["homefeed"])]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert expected
    docs = render(tmp_path, CI_VALUES / "production-values.yaml", extra)
    dep = one(docs, "Deployment", f"{RELEASE}-redrec-feast")
    secrets = {("feast-registry-db", "password"): REGISTRY_PASSWORD, ("feast-online-db", "password"): ONLINE_PASSWORD,
               ("feast-online-db-ca", "ca.crt"): ca}
    name = start(dep, "feature-server", f"rr-feast-prod-{cluster['ports']['feast']}", docs=docs, workdir=tmp_path / "pods",
                 image=image, secrets=secrets, claims={})
    try:
        base = f"http://127.0.0.1:{cluster['ports']['feast']}"
        _wait_http(base + "/health", name)
        r = httpx.post(base + "/get-online-features", json={"features": ["seq_homefeed:item_ids"], "entities": {"user_id": [user]}},
                       timeout=30)
        # read over verify-full TLS from Postgres: the user's homefeed window as materialised
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["metadata"]["feature_names"] == ["user_id", "item_ids"]
        assert out["results"][1]["values"][0][-len(expected):] == expected, out
    finally:
        docker("rm", "-f", name)


def _prepared(res):
    from redrec.pipeline.steps import load_prepared

    return load_prepared(res.run_dir / "prepare-data" / "data")


def _events(res):
    return _prepared(res).events
