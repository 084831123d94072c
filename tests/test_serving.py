"""BentoML serving for real: `bentoml serve` on 127.0.0.1 over a real Feast feature server
(`feast serve`, remote online store) and a real Milvus Lite server, called with BentoML's own
client and with raw HTTP."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# the BentoML model store of this test session; set before bentoml is imported anywhere
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bentoml-"))

import httpx  # noqa: E402
import yaml  # noqa: E402

from redrec.data.synthetic import SyntheticConfig, generate  # noqa: E402
from models_util import SEQ_LEN, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the session server runs with auth on, as the chart runs it: the write and ops routes need this
TOKEN = secrets.token_hex(32)
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from redrec.index.lite import LiteServer
    from redrec.serving.feast_server import FeatureServer
    from redrec.serving.stack import prepare

    work = tmp_path_factory.mktemp("serving")
    data = generate(SyntheticConfig(n_users=120, n_items=200, seed=3))
    models = {"v1": tiny_model(data, work / "m1", 0), "v2": tiny_model(data, work / "m2", 1)}
    lite = LiteServer(work / "milvus.db")
    lite.start()
    fs = None
    try:
        arms = [{"name": "control", "model_version": "v1", "index_alias": "", "share": 0.5},
                {"name": "treatment", "model_version": "v2", "index_alias": "redrec_items_b", "share": 0.5}]
        cfg_path = prepare(data, models, work, lite.uri, arms, experiment="exp1", holdout_share=0.1, seq_len=SEQ_LEN,
                           serving={"max_k": 50, "batch_max_wait_ms": 2.0})
        fs = FeatureServer(work / "feast")
        fs.start()
    except BaseException:
        if fs is not None:
            fs.stop()
        lite.stop()
        raise
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["serving"]["feature_server_url"] = fs.url
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    w = {"work": work, "data": data, "models": models, "lite": lite, "fs": fs, "config": cfg_path, "cfg": cfg}
    yield w
    w["fs"].stop()
    w["lite"].stop()


@pytest.fixture(scope="session")
def server(world):
    from redrec.serving.local import LocalServer

    cfg = json.loads(json.dumps(world["cfg"]))
    (world["work"] / "api-tokens").write_text(f"# the session's token\n{TOKEN}\n")
    cfg["auth"] = {"enabled": True, "tokens_file": str(world["work"] / "api-tokens")}
    path = world["work"] / "config-auth.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    srv = LocalServer(path)
    srv.start(timeout_s=240)
    yield srv
    srv.stop()


def post(server, route, **body):
    # json.dumps, not httpx's encoder: bad-input tests send what a sloppy client sends (NaN included)
    return httpx.post(server.url + route, content=json.dumps(body), headers={"content-type": "application/json", **AUTH},
                      timeout=30)


def rec(server, user, scenario, k=10, **kw):
    r = post(server, "/recommend", user_id=user, scenario=scenario, k=k, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def warm_users(world, n=5):
    ev = world["data"].events
    counts = ev.groupby("user_id")["scenario"].nunique()
    return [str(u) for u in counts[counts == 3].index[:n]]


def seen_items(world, user):
    """What the feature store holds for the user: the last SEQ_LEN events per scenario."""
    ev = world["data"].events
    ev = ev[ev["user_id"] == user]
    return {i for _, g in ev.groupby("scenario") for i in g["item_id"].tail(SEQ_LEN)}


def eligible(world, scenario):
    items = world["data"].items
    return {i for i, s in zip(items["item_id"], items["scenarios"]) if scenario in list(s)}


def test_health_routes_and_openapi(server):
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    spec = httpx.get(server.url + "/docs.json").json()
    for route in ("/recommend", "/similar_items", "/record_events"):
        assert route in spec["paths"], sorted(spec["paths"])


def test_bentoml_client_and_raw_http_agree(server, world):
    import bentoml

    user = warm_users(world)[0]
    with bentoml.SyncHTTPClient(server.url) as client:
        via_client = client.recommend(user_id=user, scenario="search", k=7)
    raw = rec(server, user, "search", k=7)
    via_client = via_client if isinstance(via_client, dict) else via_client.model_dump()
    assert via_client["items"] == raw["items"] and len(raw["items"]) == 7
    assert via_client["request_id"] != raw["request_id"]
    assert raw["scores"] == sorted(raw["scores"], reverse=True)


def test_scenarios_differ_and_respect_eligibility_and_seen_items(server, world):
    for user in warm_users(world, 4):
        seen = seen_items(world, user)
        lists = {}
        for s in world["data"].scenarios:
            out = rec(server, user, s, k=10)
            assert not out["cold_start"] and out["model_version"] in ("v1", "v2", "popularity")
            assert set(out["items"]) <= eligible(world, s), s
            assert not set(out["items"]) & seen, "a seen item was recommended"
            lists[s] = out["items"]
        assert len({tuple(v) for v in lists.values()}) == len(lists), lists
    # without exclusion, the seen items are back in the candidate set
    user = warm_users(world)[0]
    full = rec(server, user, "homefeed", k=50, exclude_seen=False)
    assert set(full["items"]) & seen_items(world, user)


def test_recorded_events_change_the_next_answer(server, world):
    user = warm_users(world, 6)[5]
    first = rec(server, user, "homefeed", k=10)
    top = first["items"][0]
    r = post(server, "/record_events", events=[
        {"user_id": user, "item_id": top, "scenario": "homefeed", "action": "click", "ts": int(time.time()),
         "request_id": first["request_id"]}])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    second = rec(server, user, "homefeed", k=10)
    assert top not in second["items"]  # now seen, so excluded
    # not merely the old list shifted up by one: the tower read the click (same length on both sides)
    assert (second["items"][:9], second["scores"][:9]) != (first["items"][1:], first["scores"][1:])
    fb = [json.loads(l) for f in (world["work"] / "serving-log").glob("feedback-*.jsonl") for l in f.read_text().splitlines()]
    # the event time as sent, and when the server took it (drift windows select by arrival)
    assert any(l["request_id"] == first["request_id"] and l["item_id"] == top and 0 <= time.time() - l["received_ts"] < 120 for l in fb)


def test_user_vector_changes_with_the_new_event(server, world):
    """Not only the exclusion: the tower reads the fresh event (with exclusion off, scores move)."""
    user = warm_users(world, 7)[6]
    before = rec(server, user, "search", k=20, exclude_seen=False)
    item = sorted(eligible(world, "ads"))[3]
    r = post(server, "/record_events", events=[{"user_id": user, "item_id": item, "scenario": "ads", "action": "share"}])
    assert r.status_code == 200, r.text
    after = rec(server, user, "search", k=20, exclude_seen=False)
    assert before["scores"] != after["scores"]


def test_cold_start_user_gets_the_scenarios_popular_items(server, world):
    ev = world["data"].events
    for s in world["data"].scenarios:
        out = rec(server, "brand-new-user-1", s, k=5)
        assert out["cold_start"] is True
        assert set(out["items"]) <= eligible(world, s)
        assert out["scores"] == sorted(out["scores"], reverse=True)
        # popularity counts every event of an item (any scenario) from the online store
        top = ev["item_id"].value_counts().reindex(sorted(eligible(world, s))).fillna(0).max()
        assert top <= out["scores"][0] <= top + 5  # earlier tests push a few events


def test_similar_items(server, world):
    item = sorted(eligible(world, "homefeed"))[0]
    r = post(server, "/similar_items", item_id=item, scenario="homefeed", k=5)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["items"]) == 5 and item not in out["items"]
    assert set(out["items"]) <= eligible(world, "homefeed")


@pytest.mark.parametrize("route,body,status,field", [
    ("/recommend", {"user_id": "u1", "scenario": "nope", "k": 5}, 400, "scenario"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": -3}, 400, "k"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": 51}, 400, "k"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": "ten"}, 400, "k"),
    ("/recommend", {"user_id": "", "scenario": "search", "k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": "   ", "scenario": "search", "k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": "x" * 300, "scenario": "search", "k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": "x" * 5000, "scenario": "search", "k": 5}, 400, "user_id"),
    ("/recommend", {"scenario": "search", "k": 5}, 400, "user_id"),
    ("/similar_items", {"item_id": "no-such-item", "scenario": "search", "k": 5}, 404, "item_id"),
    ("/similar_items", {"item_id": "it0000001", "scenario": "search", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": 5, "context": {"x": float("nan")}}, 400, "context"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": 5, "context": {"x": float("inf")}}, 400, "context"),
    ("/recommend", {"user_id": "u1", "scenario": "search", "k": 5, "context": {"blob": "x" * 5000}}, 400, "context"),
    ("/record_events", {"events": [{"user_id": "u1", "item_id": "it0000001", "scenario": "search", "action": "click",
                                    "ts": 10**20}]}, 400, "ts"),
    ("/record_events", {"events": []}, 400, "events"),
    # within the schema's bound (year 9999) but beyond events.max_future_skew_s: it would sort after
    # every later event of the user for good
    ("/record_events", {"events": [{"user_id": "u1", "item_id": "it0000001", "scenario": "search", "action": "click",
                                    "ts": int(time.time()) + 3600}]}, 400, "events[0].ts"),
    ("/record_events", {"events": [{"user_id": "u1", "item_id": "nope", "scenario": "search", "action": "click"}]}, 400, "item_id"),
    ("/record_events", {"events": [{"user_id": "u1", "item_id": "it0000001", "scenario": "x", "action": "click"}]}, 400, "scenario"),
    ("/record_events", {"events": [{"user_id": "u1", "item_id": "it0000001", "scenario": "search", "action": "clik"}]}, 400, "action"),
])
def test_bad_input_gets_a_4xx_naming_the_field(server, route, body, status, field):
    r = post(server, route, **body)
    assert r.status_code == status, (r.status_code, r.text)
    assert field in r.text, r.text


def test_an_unknown_value_is_echoed_cut_short(server):
    """The engine names the unknown item, action or scenario without sending a long value back whole."""
    # within the request model's bounds (serving.max_item_id_len 256, actions 64), unknown to the model
    for field, value in (("item_id", "i" * 250), ("action", "a" * 60)):
        ev = {"user_id": "u1", "item_id": "it0000001", "scenario": "search", "action": "click", field: value}
        r = post(server, "/record_events", events=[ev])
        assert r.status_code == 400 and r.json()["field"] == f"events[0].{field}", r.text
        assert len(r.content) < 400, r.text
    r = post(server, "/record_events", events=[{"user_id": "u1", "item_id": "i" * 250, "scenario": "search", "action": "click"}])
    assert "(250 characters)" in r.json()["error"] and "i" * 65 not in r.json()["error"], r.text


def test_non_json_bodies_are_a_415_with_the_error_body(server):
    for ctype, body in (("multipart/form-data", b"--x\r\n"), ("application/x-www-form-urlencoded", b"user_id=u1"),
                        ("text/plain", b"hello")):
        for route in ("/recommend", "/similar_items", "/record_events", "/batching_stats"):
            r = httpx.post(server.url + route, content=body, headers={"content-type": ctype, **AUTH}, timeout=30)
            assert r.status_code == 415, (route, ctype, r.status_code, r.text)
            assert r.json()["field"] == "content-type" and ctype in r.json()["error"]


def test_malformed_json_is_a_400(server):
    for payload in (b'{"user_id": "u1", "scenario": ', b"not json", b"[1, 2]"):
        r = httpx.post(server.url + "/recommend", content=payload, headers={"content-type": "application/json"})
        assert r.status_code == 400, (payload, r.status_code, r.text)


def test_arms_are_the_hash_assignment_and_every_response_is_logged(server, world):
    from redrec.experiments.assignment import assign
    from redrec.experiments.log import read_serving_log
    from redrec.serving.config import ServingConfig

    spec = ServingConfig.from_yaml(world["config"]).experiment
    users = [f"arm-user-{i}" for i in range(40)] + warm_users(world, 10)
    got = {}
    for u in users:
        out = rec(server, u, "ads", k=3)
        assert out["arm"] == assign(spec, u)
        again = rec(server, u, "ads", k=3)
        assert again["arm"] == out["arm"]  # stable
        got[out["request_id"]] = out
        if out["arm"] == "treatment" and not out["cold_start"]:
            assert out["model_version"] == "v2"
        if out["arm"] == "holdout":
            assert out["model_version"] == "popularity"
    assert {o["arm"] for o in got.values()} >= {"control", "treatment"}
    logged = read_serving_log(world["work"] / "serving-log").set_index("request_id")
    for rid, out in got.items():
        row = logged.loc[rid]
        assert row["arm"] == out["arm"] and list(row["items"]) == out["items"] and row["user_id"] == out["user_id"]


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(server, world):
    """Requests arriving together are served by one micro-batch (one Feast read, one forward): the
    log says so (batch_size, stage timings), and each request's answer is the one it gets alone."""
    import asyncio

    from redrec.experiments.log import read_log

    pairs = [(u, s) for u in warm_users(world, 8) for s in ("homefeed", "search", "ads")]
    alone = {(u, s): rec(server, u, s, k=7)["items"] for u, s in pairs}

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/recommend", json={"user_id": u, "scenario": s, "k": 7}) for u, s in pairs))
        return [r.json() for r in rs]

    t0 = time.time()
    outs = asyncio.run(together())
    for (u, s), out in zip(pairs, outs):
        assert (out["user_id"], out["scenario"]) == (u, s)
        assert out["items"] == alone[(u, s)], (u, s)
    logged = read_log(world["work"] / "serving-log", start=t0).requests.set_index("request_id")
    rows = logged.loc[[o["request_id"] for o in outs]]
    assert rows["batch_size"].max() > 1, rows["batch_size"].tolist()
    # the world's collection is small: the server holds a copy and searches it in process
    release = httpx.get(server.url + "/ops/release", headers=AUTH, timeout=30).json()
    arm = release["arms"]["control"]
    assert arm["searched"].startswith("in process, exactly"), arm
    # serving.torch_threads (1) caps numpy's BLAS too: its default pool (one thread per core)
    # spins against the tower and the event loop on shared cores
    assert release["threads"]["torch"] == 1, release["threads"]
    assert {v for k, v in release["threads"].items() if k.startswith("blas ")} == {1}, release["threads"]
    for c in ("queue_ms", "feast_ms", "tower_ms", "search_ms", "latency_ms"):
        assert (rows[c] >= 0).all(), c


def test_bento_builds_offline(world):
    import bentoml

    from redrec.serving.local import build_bento

    tag = build_bento(models=["redrec:v1"])
    bento = bentoml.get(tag)
    assert "redrec:v1" in {str(m.tag) for m in bento.info.models}
    assert (Path(bento.path) / "src" / "redrec" / "serving" / "engine.py").is_file()


def test_killed_milvus_gives_503_and_the_server_keeps_running(server, world):
    import signal

    from redrec.index.lite import LiteServer

    user = warm_users(world)[1]
    assert rec(server, user, "search")["items"]
    lite = world["lite"]
    os.killpg(lite.proc.pid, signal.SIGKILL)
    lite.proc.wait()
    lite.proc = None
    # the index is searched in process (a copy of the collection), but the alias is resolved in
    # Milvus at least every milvus.alias_ttl_s: past that, a dead Milvus is an outage
    time.sleep(world["cfg"]["milvus"].get("alias_ttl_s", 1.0) + 0.1)
    try:
        r = post(server, "/recommend", user_id=user, scenario="search", k=5)
        assert r.status_code == 503, r.text
        assert "milvus" in r.json()["error"].lower()
        assert httpx.get(server.url + "/livez").status_code == 200
        assert server.alive()
        time.sleep(2.1)  # readiness is cached for 2 s
        assert httpx.get(server.url + "/readyz").status_code == 503
        # a cold user needs no index: still served
        assert rec(server, "cold-during-outage", "search")["cold_start"]
    finally:
        world["lite"] = LiteServer(lite.data_path, port=lite.port)
        world["lite"].start()
    deadline = time.time() + 60
    while time.time() < deadline:
        r = post(server, "/recommend", user_id=user, scenario="search", k=5)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text


def fallback_config(world, tmp_path, milvus: dict | None = None, **serving) -> Path:
    """The world's serving config with the popularity fallback configured (plus ``serving`` and
    ``milvus`` overrides) and its own serving log, for a server of the test's own."""
    cfg = json.loads(json.dumps(world["cfg"]))
    cfg["milvus"].update(milvus or {})
    cfg["serving"].update(on_dependency_error="popularity", **serving)
    cfg["serving"]["serving_log"]["dir"] = str(tmp_path / "log")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_with_the_fallback_configured_a_milvus_outage_keeps_the_pod_ready_and_serving(world, tmp_path):
    """serving.on_dependency_error: popularity — Milvus killed: /readyz stays 200 (degraded, says
    why), warm users get the scenario's popular items flagged fallback, nothing is a 5xx."""
    import signal

    from redrec.index.lite import LiteServer
    from redrec.serving.local import LocalServer

    path = fallback_config(world, tmp_path)
    user = warm_users(world)[2]
    with LocalServer(path) as srv:
        assert not rec(srv, user, "ads")["fallback"]
        lite = world["lite"]
        os.killpg(lite.proc.pid, signal.SIGKILL)
        lite.proc.wait()
        lite.proc = None
        try:
            time.sleep(2.1)  # readiness is cached for 2 s
            r = httpx.get(srv.url + "/readyz", timeout=30)
            assert r.status_code == 200, r.text
            status = httpx.get(srv.url + "/ops/release", timeout=30).json()
            assert status["readiness"].startswith("degraded, serving the popularity fallback: milvus unreachable")
            out = rec(srv, user, "ads")
            assert out["fallback"] and out["model_version"] == "popularity" and out["index_version"] is None
            assert len(out["items"]) == 10
        finally:
            world["lite"] = LiteServer(lite.data_path, port=lite.port)
            world["lite"].start()
    # without the fallback the same outage is a 503 and an unready pod: test_killed_milvus_gives_503...


def test_two_workers_answer_alike_and_lose_no_pushed_event(world, tmp_path):
    """serving.workers 2: two processes answer (a log file each), with the same answer for the
    same request; events for one user posted concurrently, so both workers read-modify-write the
    user's window at once, all land (the push lock spans the processes)."""
    import asyncio

    from redrec.serving.config import ServingConfig
    from redrec.serving.features import open_repo
    from redrec.serving.local import LocalServer

    path = fallback_config(world, tmp_path, workers=2)
    repo = open_repo(ServingConfig.from_yaml(path))
    user = warm_users(world, 9)[8]
    items = sorted(eligible(world, "ads"))[:SEQ_LEN]
    log = tmp_path / "log"

    def lines(kind):
        return {f.name: len(f.read_text().splitlines()) for f in log.glob(f"{kind}-*.jsonl")}

    async def burst(url, route, bodies):
        # a connection per request: a worker that wakes first takes every pending connection, so
        # a burst may still land on one worker; the loop below repeats until one reaches both
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            return await asyncio.gather(*(c.post(route, json=b) for b in bodies))

    with LocalServer(path) as srv:
        answers = []
        for _ in range(20):  # on a loaded machine one worker may take several bursts in a row
            answers += asyncio.run(burst(srv.url, "/recommend", [{"user_id": user, "scenario": "search", "k": 10}] * 40))
            served = lines("serving")
            if sum(1 for n in served.values() if n) == 2:
                break
        assert sum(1 for n in served.values() if n) == 2, served  # both processes served
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        assert len({tuple(r.json()["items"]) for r in answers}) == 1
        both = 0
        for attempt in range(6):
            t0 = int(time.time()) - 1000 + 100 * attempt
            before = lines("feedback")
            pushed = asyncio.run(burst(srv.url, "/record_events", [
                {"events": [{"user_id": user, "item_id": i, "scenario": "ads", "action": "click", "ts": t0 + n}]}
                for n, i in enumerate(items)]))
            assert all(r.status_code == 200 for r in pushed), [r.text for r in pushed if r.status_code != 200]
            window = repo.online_sequences([user], ["ads"])["ads"][0]
            assert list(zip(window["item_ids"], window["timestamps"])) == [(i, t0 + n) for n, i in enumerate(items)], attempt
            both += sum(n > before.get(f, 0) for f, n in lines("feedback").items()) == 2
            if both:
                break
        # a release is served once every worker serves it, not the one that answered the deployer
        from redrec.pipeline.deploy import wait_serving

        cfg = yaml.safe_load(path.read_text())
        cfg["experiment"]["name"] = "exp1-reloaded"
        text = yaml.safe_dump(cfg, sort_keys=False)
        path.write_text(text)
        status = wait_serving(srv.url, text, 60)
        assert len(status["config"]["workers"]) == 2
        want = status["config"]["pod_loaded_sha256"]
        with httpx.Client(base_url=srv.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            seen = {c.get("/ops/release").json()["config"]["loaded_sha256"] for _ in range(20)}
        assert seen == {want}
    assert both, "no burst of pushes reached both workers"


@pytest.mark.slow
def test_a_hung_feature_server_costs_a_deadline_not_the_arm(world, tmp_path):
    """The feature server frozen (SIGSTOP: connections accepted, never answered). Each request
    fails within serving.feast_timeout_s instead of wedging the arm's batch thread: with the
    fallback configured it is served popularity, /readyz says Feast is timing out (degraded);
    once Feast answers again, the model serves again."""
    import signal

    from redrec.serving.local import LocalServer

    path = fallback_config(world, tmp_path, feast_timeout_s=1.0)
    user = warm_users(world)[3]
    with LocalServer(path) as srv:
        assert not rec(srv, user, "search")["fallback"]
        fs = world["fs"]
        os.killpg(fs.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):  # more requests than one deadline: none waits for the previous one
                t0 = time.monotonic()
                out = rec(srv, user, "search")
                assert out["fallback"] and out["model_version"] == "popularity", out
                assert time.monotonic() - t0 < 10
            time.sleep(2.1)  # readiness is cached for 2 s
            r = httpx.get(srv.url + "/readyz", timeout=30)
            assert r.status_code == 200, r.text
            status = httpx.get(srv.url + "/ops/release", timeout=30).json()
            assert "feast timing out" in status["readiness"], status["readiness"]
        finally:
            os.killpg(fs.proc.pid, signal.SIGCONT)
        # readiness recovers by itself, with no request to clear it (an unready pod gets none)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            readiness = httpx.get(srv.url + "/ops/release", timeout=30).json()["readiness"]
            if "feast timing out" not in readiness:
                break
            time.sleep(1)
        assert "feast timing out" not in readiness, readiness
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = rec(srv, user, "search")
            if not out["fallback"]:
                break
            time.sleep(0.5)
        assert not out["fallback"] and out["model_version"] != "popularity", out


@pytest.mark.slow
def test_the_catalogue_read_at_start_is_not_held_to_the_per_request_deadline(world, tmp_path):
    """The server reads the whole catalogue's popularity once as it starts, under
    serving.startup_catalogue_timeout_s. A per-request Feast deadline shorter than that read (here
    1 ms) must not keep the server unready, every probe starting the read again."""
    from redrec.serving.local import LocalServer

    srv = LocalServer(fallback_config(world, tmp_path, feast_timeout_s=0.001)).start(timeout_s=90)
    try:
        assert httpx.get(srv.url + "/readyz", timeout=30).status_code == 200
        # the history read misses its 1 ms: the popularity read at start is what answers
        out = rec(srv, warm_users(world)[0], "search")
        assert out["fallback"] and out["model_version"] == "popularity" and len(out["items"]) == 10, out
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_hung_milvus_costs_a_deadline_and_shows_in_readyz(world, tmp_path):
    """Milvus frozen (SIGSTOP): pymilvus alone would retry a search for about a minute. Each
    request gets the popularity fallback within milvus.timeout_s, /readyz says Milvus is timing
    out (degraded), and once Milvus answers again the model serves and readiness clears."""
    import signal

    from redrec.serving.local import LocalServer

    # every search goes to Milvus here (no in-process copy): its search deadline is what is tested
    path = fallback_config(world, tmp_path, milvus={"timeout_s": 1.0, "exact_search_max_items": 0})
    user = warm_users(world)[4]
    with LocalServer(path) as srv:
        assert not rec(srv, user, "ads")["fallback"]
        lite = world["lite"]
        os.killpg(lite.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                t0 = time.monotonic()
                out = rec(srv, user, "ads")
                assert out["fallback"] and out["model_version"] == "popularity", out
                assert time.monotonic() - t0 < 10
            time.sleep(2.1)  # readiness is cached for 2 s
            r = httpx.get(srv.url + "/readyz", timeout=30)
            assert r.status_code == 200, r.text
            readiness = httpx.get(srv.url + "/ops/release", timeout=60).json()["readiness"]
            assert "milvus timing out" in readiness, readiness
        finally:
            os.killpg(lite.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = rec(srv, user, "ads")
            readiness = httpx.get(srv.url + "/ops/release", timeout=30).json()["readiness"]
            if not out["fallback"] and "timing out" not in readiness:
                break
            time.sleep(1)
        assert not out["fallback"] and readiness == "ready", (out, readiness)


def test_feature_server_down_gives_503(server, world):
    from redrec.serving.feast_server import FeatureServer

    fs = world["fs"]
    fs.stop()
    try:
        r = post(server, "/recommend", user_id=warm_users(world)[2], scenario="homefeed", k=5)
        assert r.status_code == 503, r.text
        assert "feast" in r.json()["error"].lower()
        assert server.alive() and httpx.get(server.url + "/livez").status_code == 200
    finally:
        world["fs"] = FeatureServer(fs.repo_dir, port=fs.port)
        world["fs"].start()
    assert rec(server, warm_users(world)[2], "homefeed")["items"]


def test_openapi_is_the_contract_and_fuzzing_finds_no_server_error(server, world, tmp_path):
    """The OpenAPI document names what the server accepts (the config's scenarios, k's bounds) and
    the error body it sends; schemathesis (every check, bounded examples, the token) then finds no
    5xx, no response outside that document and no declared auth left unenforced."""
    import re
    import shutil

    from redrec.serving.config import ServingConfig

    cfg = ServingConfig.from_yaml(world["config"])
    spec = httpx.get(server.url + "/docs.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    rec_schema = spec["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    rec_schema = schemas[rec_schema["$ref"].split("/")[-1]] if "$ref" in rec_schema else rec_schema
    (Path(os.environ.get("REDREC_DEBUG_DIR", tmp_path)) / "openapi.json").write_text(json.dumps(spec, indent=1))
    assert rec_schema["properties"]["scenario"]["enum"] == cfg.scenarios
    assert rec_schema["properties"]["k"]["maximum"] == cfg.serving.max_k and rec_schema["properties"]["k"]["minimum"] == 1
    for route in ("/recommend", "/similar_items", "/record_events"):
        responses = spec["paths"][route]["post"]["responses"]
        assert {"400", "415", "503"} <= set(map(str, responses)), (route, responses.keys())
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert schemas["Error"]["required"] == ["error"]
    # what it declares for 400 is what it sends, for the server's checks and pydantic's alike
    for body in ({"user_id": "u1", "scenario": "nope"}, {"user_id": "u1", "scenario": cfg.scenarios[0], "k": 10**6}):
        r = post(server, "/recommend", **body)
        assert r.status_code == 400 and set(r.json()) == {"error", "field"}, r.text
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    log_start = server.log_path.stat().st_size
    proc = subprocess.run(
        [st, "run", server.url + "/docs.json", "--url", server.url, "--checks", "all",
         # a schema-valid request may still name an item or action outside the model's catalogue,
         # which no static schema can list: its 400 {error, field} is right, not a contract breach
         "--exclude-checks", "positive_data_acceptance", "--max-examples", "40",
         "--seed", "7", "--request-timeout", "30", "--include-path-regex", "^/(recommend|similar_items|record_events)$",
         # with the token: the fuzzing reaches the routes behind auth (its ignored_auth check sends none)
         "--header", f"Authorization: Bearer {TOKEN}",
         "--report", "junit", "--report-dir", str(tmp_path / "st"), "--no-color"],
        # cwd: schemathesis keeps its crash cache in the working directory, not in the checkout
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # the token took the fuzzing past auth: /record_events answered more than 401s (access log)
    fuzzed = server.log_path.read_bytes()[log_start:].decode(errors="replace")
    statuses = set(re.findall(r"path=/record_events,[^)]*\) \(status=(\d+)", fuzzed))
    assert statuses - {"401", "403"}, statuses


def ingest_traffic(world, n_users: int, per_user: int, seed: int = 11) -> list[list[dict]]:
    """Per user, events in send order: 10% out of order (older than the user's newest), 10% in
    the same second as the previous one, 5% exact duplicates of the previous (in-order) event."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scenarios = world["cfg"]["scenarios"]
    pools = {s: sorted(eligible(world, s)) for s in scenarios}
    actions = sorted(world["data"].events["action"].unique())
    base = int(time.time()) - 30 * 86400
    out = []
    for u in range(n_users):
        t, evs, prev_late = base, [], True
        for _ in range(per_user):
            r = rng.random()
            if r < 0.05 and not prev_late:
                evs.append(dict(evs[-1]))
                continue
            late = 0.05 <= r < 0.15
            if late:
                ts = t - int(rng.integers(1, 20_000))
            else:
                t += 0 if r < 0.25 else int(rng.integers(1, 900))
                ts = t
            s = scenarios[int(rng.integers(len(scenarios)))]
            evs.append({"user_id": f"ingest-u{u}", "item_id": pools[s][int(rng.integers(len(pools[s])))], "scenario": s,
                        "action": actions[int(rng.integers(len(actions)))], "ts": ts})
            prev_late = late
        out.append(evs)
    return out


def reference_windows(traffic, scenarios, seq_len=SEQ_LEN) -> dict[str, dict[str, list]]:
    """The naive reference: per user and scenario, the events deduplicated, sorted by ts (arrival
    order within a second), the last ``seq_len``."""
    ref = {}
    for evs in traffic:
        seen, uniq = set(), []
        for e in evs:
            key = (e["scenario"], e["item_id"], e["action"], e["ts"])
            if key not in seen:
                seen.add(key)
                uniq.append(e)
        ref[evs[0]["user_id"]] = {s: [(e["item_id"], e["action"], e["ts"]) for e in
                                      sorted((e for e in uniq if e["scenario"] == s), key=lambda e: e["ts"])][-seq_len:]
                                  for s in scenarios}
    return ref


@pytest.mark.slow
def test_two_pods_and_two_ingest_workers_lose_nothing_through_the_event_log(world, tmp_path):
    """events.log: redis. Two serving pods (separate process groups and lock directories, two
    workers each) append to one redis-server; two ingest workers apply the log to Feast (the
    feature server, over Feast's Redis online store in the same redis-server). 20,000 events from 500 users, each user's events alternating between the
    pods, 10% out of order, 10% sharing a second, 5% exact duplicates; one ingest worker SIGKILLed
    halfway and restarted. Every window equals the naive reference, every popularity count is exact."""
    import asyncio
    import signal
    from collections import Counter

    from redrec.serving.config import IngestConfig
    from redrec.serving.feast_server import FeatureServer, with_online_store
    from redrec.serving.features import open_repo
    from redrec.serving.local import LocalServer
    from services_util import Redis

    redis = Redis()
    procs: list[subprocess.Popen] = []
    fs = None
    try:
        # the production online store behind the feature server: Redis (Feast's SQLite store shares
        # one connection between the server's threads, and concurrent writers roll back each other)
        fs = FeatureServer(with_online_store(world["work"] / "feast", tmp_path / "feast-redis",
                                             {"type": "redis", "connection_string": f"127.0.0.1:{redis.port}"}))
        fs.start()
        cfg = json.loads(json.dumps(world["cfg"]))
        cfg["serving"]["feature_server_url"] = fs.url
        cfg["serving"].update(workers=2, max_events_per_call=1000)
        cfg["events"] = {"log": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0", "partitions": 8,
                         "lease_ttl_s": 2.0, "block_ms": 50}
        paths = []
        for pod in ("a", "b"):
            (tmp_path / pod / "tmp").mkdir(parents=True)
            cfg["serving"]["serving_log"]["dir"] = str(tmp_path / pod / "log")
            paths.append(tmp_path / pod / "config.yaml")
            paths[-1].write_text(yaml.safe_dump(cfg, sort_keys=False))
        repo = open_repo(IngestConfig.from_yaml(paths[0]))
        traffic = ingest_traffic(world, 500, 40)
        items = sorted({e["item_id"] for evs in traffic for e in evs})
        pop0 = repo.online_popularity(items)

        def ingest(name: str) -> subprocess.Popen:
            log = open(tmp_path / f"ingest-{name}.log", "ab")
            p = subprocess.Popen([sys.executable, "-m", "redrec.cli", "features", "ingest", "--config", str(paths[0]),
                                  "--worker-id", name], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            procs.append(p)
            return p

        async def send(urls, rounds):
            async with httpx.AsyncClient(timeout=60) as c:
                for calls in rounds:  # a round holds at most one chunk per user: a user's order is kept
                    rs = await asyncio.gather(*(c.post(urls[n % 2] + "/record_events", json={"events": body}, headers=AUTH)
                                                for n, body in enumerate(calls)))
                    bad = [r.text for r in rs if r.status_code != 200]
                    assert not bad, bad[:3]

        chunk = 5
        rounds = []
        for j in range(0, 40, chunk):
            flat = [e for evs in traffic for e in evs[j : j + chunk]]
            rounds.append([flat[k : k + 50] for k in range(0, len(flat), 50)])
        env = [{"TMPDIR": str(tmp_path / pod / "tmp")} for pod in ("a", "b")]  # each pod its own lock directory
        with LocalServer(paths[0], env=env[0]) as a, LocalServer(paths[1], env=env[1]) as b:
            workers = {"w1": ingest("w1"), "w2": ingest("w2")}
            t0 = time.monotonic()
            asyncio.run(send([a.url, b.url], rounds[:4]))
            os.killpg(workers["w1"].pid, signal.SIGKILL)  # mid-stream: its read, unacknowledged entries are reclaimed
            workers["w1"].wait(10)
            asyncio.run(send([b.url, a.url], rounds[4:]))
            workers["w1"] = ingest("w1")
            sent_s = time.monotonic() - t0
            deadline = time.monotonic() + 240
            r = redis.client
            streams = [f"redrec:events:p{p}" for p in range(8)]
            while True:
                backlog = sum(r.xlen(s) for s in streams) + r.scard("redrec:events:pop:dirty") + r.scard("redrec:events:pop:flushing")
                if backlog == 0:
                    break
                assert time.monotonic() < deadline, f"log not drained: {backlog} entries left"
                assert all(p.poll() is None for p in workers.values()), (tmp_path / "ingest-w2.log").read_text()[-3000:]
                time.sleep(0.5)
            print(f"20,000 events sent in {sent_s:.1f}s, drained after {time.monotonic() - t0:.1f}s")
            ref = reference_windows(traffic, world["cfg"]["scenarios"])
            users = list(ref)
            got = repo.online_sequences(users, world["cfg"]["scenarios"])
            wrong = []
            for s in world["cfg"]["scenarios"]:
                for u, w in zip(users, got[s]):
                    have = list(zip(w["item_ids"], w["actions"], w["timestamps"])) if w else []
                    if have != ref[u][s]:
                        wrong.append((u, s, have, ref[u][s]))
            assert not wrong, (len(wrong), wrong[:2])
            distinct = Counter(e["item_id"] for evs in traffic for e in {(e["scenario"], e["item_id"], e["action"], e["ts"]): e
                                                                          for e in evs}.values())
            pop = repo.online_popularity(items)
            assert {i: pop[i] - pop0[i] for i in items} == {i: distinct[i] for i in items}
            assert sum(distinct.values()) < 20_000  # the duplicates were there, and were not counted
            # the log down: an event cannot be accepted, so it is refused, never answered "accepted"
            redis.stop()
            r = httpx.post(a.url + "/record_events", headers=AUTH, timeout=60, json={"events": traffic[0][:1]})
            assert r.status_code == 503 and "event log unavailable" in r.json()["error"], r.text
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
        if fs is not None:
            fs.stop()
        redis.stop()


def _metric(text: str, name: str, **labels) -> float:
    """A counter's value on /metrics (BentoML's multiprocess registry: one line per label set)."""
    import re

    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} ([0-9.e+]+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_a_full_log_volume_costs_the_log_line_not_the_response(world, tmp_path):
    """The serving log's volume (a small tmpfs) filled to the last byte: /recommend still answers
    200 with items, redrec_log_write_failures_total rises, /readyz stays 200 and says why; once
    space is freed lines are logged again, and what is on disk reads back whole."""
    from redrec.experiments.log import read_log
    from redrec.serving.local import LocalServer

    from services_util import small_disk

    with small_disk(tmp_path / "logfs", "256k") as logfs:
        path = fallback_config(world, tmp_path)
        cfg = yaml.safe_load(path.read_text())
        cfg["serving"]["serving_log"]["dir"] = str(logfs)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        users = warm_users(world, 5)
        with LocalServer(path) as srv:
            before = [rec(srv, u, "homefeed")["request_id"] for u in users]
            filler = logfs / "filler"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            during = []
            for u in users * 4:
                out = rec(srv, u, "homefeed")  # asserts the 200
                assert len(out["items"]) == 10
                during.append(out["request_id"])
            metrics = httpx.get(srv.url + "/metrics", timeout=30).text
            lost = _metric(metrics, "redrec_log_write_failures_total", log="serving")
            assert lost >= len(during) - 2, metrics[-2000:]  # the log file's last page may hold a line or two
            ready = httpx.get(srv.url + "/readyz", timeout=30)
            assert ready.status_code == 200
            assert "degraded, serving log not written" in ready.text and "No space left on device" in ready.text
            status = httpx.get(srv.url + "/ops/release", timeout=30).json()
            assert status["serving_log"]["serving"]["failed"] == lost
            filler.unlink()
            after = [rec(srv, u, "homefeed")["request_id"] for u in users]
        lr = read_log(logfs)
        assert lr.n_skipped == 0, lr.problems()
        logged = list(lr.requests["request_id"])
        assert logged[:len(before)] == before and logged[-len(after):] == after
        assert len(logged) == len(before) + len(during) - int(lost) + len(after)


def test_sigterm_under_load_fails_no_request(world, tmp_path):
    """Two servers behind a balancer that routes to the backends whose /readyz answers 200 (what
    a Service's endpoints do); clients in a closed loop on keep-alive connections. SIGTERM to one
    server's process group (its supervisor and workers, as a pod deletion sends): it drains
    (unready at once, Connection: close, still answering) and exits; no request fails."""
    import random
    import signal

    from redrec.serving.local import LocalServer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [fallback_config(world, tmp_path / n, drain_s=2.0) for n in ("a", "b")]
    users = warm_users(world, 8)
    with LocalServer(paths[0]) as a, LocalServer(paths[1]) as b:
        backends = {a.url: True, b.url: True}
        stop, results, lock = threading.Event(), [], threading.Lock()

        def probe():
            with httpx.Client(timeout=2) as c:
                while not stop.is_set():
                    for url in backends:
                        try:
                            backends[url] = c.get(url + "/readyz").status_code == 200
                        except httpx.HTTPError:
                            backends[url] = False
                    time.sleep(0.2)

        def client(n):
            pools = {url: httpx.Client(base_url=url, timeout=30) for url in backends}
            rnd = random.Random(n)
            while not stop.is_set():
                ready = [u for u, ok in backends.items() if ok]
                url = rnd.choice(ready)
                try:
                    r = pools[url].post("/recommend", json={"user_id": rnd.choice(users), "scenario": "search", "k": 10})
                    out = (url, r.status_code, r.headers.get("connection"))
                except httpx.HTTPError as e:
                    out = (url, type(e).__name__, None)
                with lock:
                    results.append(out)
            for p in pools.values():
                p.close()

        threads = [threading.Thread(target=probe)] + [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(3)
            n_before = len(results)
            os.killpg(a.proc.pid, signal.SIGTERM)
            # while it drains: unready, still answering, and asking each client to reconnect
            with httpx.Client(base_url=a.url, timeout=10) as c:
                probe_a = c.get("/readyz")
                direct = c.post("/recommend", json={"user_id": users[0], "scenario": "search", "k": 10})
            assert probe_a.status_code == 503 and "draining" in probe_a.text, probe_a.text
            assert direct.status_code == 200 and direct.headers.get("connection") == "close"
            a.proc.wait(timeout=60)
            time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert n_before > 20 and len(results) > n_before + 20
