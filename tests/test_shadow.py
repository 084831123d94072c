"""Shadow releases for real: a `bentoml serve` process serving v1 mirrors requests to candidate
v2 (its own model and its own Milvus Lite collection), put in and out of shadow by `redrec
release shadow`'s function on the workspace's serving config. The caller's answers never change
and never fail because of the shadow; the shadow log is read by the shadow report only; promote
--require-shadow reads that report."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from models_util import SEQ_LEN, tiny_model, warm_users

ROOT = Path(__file__).resolve().parents[1]
SCEN = ("homefeed", "search", "ads")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.index.lite import LiteServer, free_port
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.localrun import release_milvus_connections
    from redrec.release.model_store import ModelStore
    from redrec.release.releases import Release
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare, publish_checkpoint

    work = tmp_path_factory.mktemp("shadow")
    ws = work / "ws"
    data = generate(SyntheticConfig(n_users=120, n_items=200, seed=3))
    models = {v: tiny_model(data, work / f"m{v}", seed, meta={"version": v}) for seed, v in enumerate(("v1", "v2"))}
    store = ModelStore(str(ws / "model-store"))
    for v, ndcg in (("v1", 0.18), ("v2", 0.21)):  # release records, as the pipeline's deploy step writes them
        store.put(models[v], v, meta=Release(v, f"redrec_items_v{v}", "redrec_items",
                                             metrics={"overall": {"ndcg@10": ndcg}}).as_meta())
    lite = LiteServer(work / "milvus.db")
    lite.start()
    srv = None
    try:
        # the candidate's collection is published first: the alias ends on v1's, v2's is kept beside it
        publish_checkpoint(models["v2"], data, lite.uri, "redrec_items", "v2")
        arms = [{"name": "control", "model_version": "v1", "index_alias": "", "share": 1.0}]
        cfg_path = prepare(data, models, ws / "serving", lite.uri, arms, experiment="exp", seq_len=SEQ_LEN,
                           model_store=str(ws / "model-store"))
        release_milvus_connections()
        params = PipelineParams(dataset="synthetic", workspace=str(ws), milvus_uri=lite.uri, model_store=str(ws / "model-store"),
                                serving_port=free_port())
        srv = LocalServer(cfg_path, port=params.serving_port)
        srv.start(timeout_s=240)
        # as a local deploy leaves it: `redrec release shadow` finds the running server here
        (ws / "serving" / "server.json").write_text(json.dumps({"pid": srv.proc.pid, "url": srv.url, "version": "v1"}))
        yield {"ws": ws, "data": data, "models": models, "params": params, "srv": srv, "url": srv.url,
               "config": cfg_path, "log": ws / "serving" / "serving-log", "answers": {}}
    finally:
        if srv is not None:
            srv.stop()
        lite.stop()


def _rec(url: str, user: str, scenario: str, k: int = 10) -> httpx.Response:
    r = httpx.post(url + "/recommend", json={"user_id": user, "scenario": scenario, "k": k}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _requests(world, n_users=6):
    return [(u, s) for u in warm_users(world["data"], n_users) for s in SCEN]


def _status(world) -> dict:
    return httpx.get(world["url"] + "/ops/release", timeout=10).json()


def _shadow_lines(world, rids=None) -> list[dict]:
    from redrec.experiments.log import shadow_files

    out = [json.loads(line) for f in shadow_files(world["log"]) for line in f.read_text().splitlines() if line.strip()]
    return [x for x in out if rids is None or x.get("request_id") in rids]


def _wait_lines(world, rids: set[str], n: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _shadow_lines(world, rids)
        if len(got) >= n:
            return got
        time.sleep(0.2)
    return _shadow_lines(world, rids)


def _strip(body: bytes) -> bytes:
    return re.sub(rb'"request_id":"[0-9a-f]+"', b'"request_id":""', body)


def test_responses_are_identical_with_the_shadow_on_and_off(world):
    from redrec.release.shadow import set_shadow

    out = set_shadow(world["params"], "v2", 1.0)
    assert out["shadow"] == {"model_version": "v2", "share": 1.0} and out["url"] == world["url"]
    st = _status(world)["shadow"]
    assert st["model_version"] == "v2" and st["share"] == 1.0
    reqs = _requests(world)
    on = [_rec(world["url"], u, s) for u, s in reqs]
    rids = {r.json()["request_id"] for r in on}
    lines = _wait_lines(world, rids, len(rids))
    assert {x["request_id"] for x in lines} == rids  # share 1.0: every request the model ranked is mirrored
    assert all(x["error"] is None and x["candidate_version"] == "v2" and x["production_version"] == "v1"
               and len(x["candidate_items"]) == 10 for x in lines), lines[:2]
    # the candidate read the same history: it excluded the same seen items production excluded
    assert any(x["candidate_items"] != x["production_items"] for x in lines)

    assert set_shadow(world["params"], None, 1.0)["shadow"] is None
    assert _status(world)["shadow"]["model_version"] is None
    off = [_rec(world["url"], u, s) for u, s in reqs]
    for a, b in zip(on, off):
        assert _strip(a.content) == _strip(b.content)
    world["answers"] = {(u, s): r.json()["items"] for (u, s), r in zip(reqs, off)}


def test_a_failing_candidate_never_reaches_the_caller(world):
    from redrec.pipeline.deploy import wait_serving

    path = world["config"]
    good = path.read_text()
    cfg = yaml.safe_load(good)
    # its collection is not there: every search of the candidate fails (PairMismatch)
    cfg["shadow"] = {"model_version": "v2", "index_alias": "redrec_gone", "share": 1.0}
    text = yaml.safe_dump(cfg, sort_keys=False)
    path.write_text(text)
    wait_serving(world["url"], text, 60)
    reqs = _requests(world)
    got = [_rec(world["url"], u, s) for u, s in reqs]
    assert {(u, s): r.json()["items"] for (u, s), r in zip(reqs, got)} == world["answers"]
    rids = {r.json()["request_id"] for r in got}
    lines = _wait_lines(world, rids, len(rids))
    assert len(lines) == len(rids) and all("redrec_gone" in x["error"] and x["candidate_items"] == [] for x in lines)
    st = _status(world)["shadow"]
    assert st["counts"]["error"] >= len(rids) and "redrec_gone" in st["last_error"]
    metrics = httpx.get(world["url"] + "/metrics", timeout=10).text
    m = re.search(r'redrec_shadow_requests_total\{[^}]*outcome="error"[^}]*\} (\d+(?:\.\d+)?)', metrics)
    assert m and float(m.group(1)) >= len(rids), metrics[-3000:]

    # an unknown candidate version is refused whole, naming the field; the arms serve on
    cfg["shadow"] = {"model_version": "v9", "share": 1.0}
    bad = yaml.safe_dump(cfg, sort_keys=False)
    path.write_text(bad)
    with pytest.raises(RuntimeError, match=r"refused the new config.*shadow\.model_version: unknown version 'v9'"):
        wait_serving(world["url"], bad, 60)
    assert _rec(world["url"], *reqs[0]).json()["items"] == world["answers"][reqs[0]]
    path.write_text(good)
    wait_serving(world["url"], good, 60)


def test_the_shadow_log_holds_about_share_of_requests_and_no_reader_reads_it(world):
    from redrec.drift.window import read_window
    from redrec.experiments.log import read_feedback, read_serving_log
    from redrec.experiments.report import analyse as ab_analyse
    from redrec.release.shadow import set_shadow
    from redrec.serving.shadow import mirrored

    set_shadow(world["params"], "v2", 0.3)
    reqs = _requests(world, 50)
    got = [_rec(world["url"], u, s).json() for u, s in reqs]
    rids = {g["request_id"] for g in got}
    want = {r for r in rids if mirrored(r, 0.3)}
    lines = _wait_lines(world, rids, len(want))
    assert {x["request_id"] for x in lines} == want  # exactly the hash's choice, reproducible
    assert 0.15 < len(want) / len(rids) < 0.45, (len(want), len(rids))
    # users act on some mirrored answers: the report's replay joins these by request_id
    events = [{"user_id": g["user_id"], "item_id": g["items"][0], "scenario": g["scenario"], "action": "click",
               "request_id": g["request_id"]} for g in got if g["request_id"] in want][:20]
    assert httpx.post(world["url"] + "/record_events", json={"events": events}, timeout=30).status_code == 200

    served = sum(len(f.read_text().splitlines()) for f in world["log"].glob("serving-*.jsonl"))
    assert len(_shadow_lines(world)) > 0 and served > 0
    responses = read_serving_log(world["log"])
    assert len(responses) == served and responses.attrs["skipped_lines"] == 0
    assert "candidate_version" not in responses.columns
    assert len(read_feedback(world["log"])) == len(events)
    win = read_window(world["log"], list(SCEN), 0, time.time() + 60, 0)
    assert win.n_requests == served and not win.stats.skipped, win.stats.skipped
    ab = ab_analyse(world["log"])
    assert ab.n_responses == served and ab.torn_lines == 0


def test_shadow_report_in_a_browser(world, tmp_path):
    from browser_util import Browser

    from redrec.experiments.shadow_report import analyse, write_report
    from redrec.pipeline.config import ShadowGate
    from redrec.release.model_store import ModelStore

    rep = analyse(world["log"], "v2", ModelStore(str(world["ws"] / "model-store")))
    o = rep["overall"]
    assert rep["production_version"] == "v1" and o["requests"] > 0 and o["errors"] > 0  # the failing stretch is in it
    assert 0 <= o["overlap@10"] <= 1 and -1 <= o["kendall_tau_b"] <= 1 and set(rep["per_scenario"]) == set(SCEN)
    assert rep["offline"]["delta"] == pytest.approx(0.03) and o["replay"]["clicked_items"] == 20
    # every click was on production's first item: the replay says production, the offline delta the candidate
    assert o["replay"]["in_production"] == 1.0 and rep["agreement"]["verdict"] in ("agree", "disagree")
    paths = write_report(rep, tmp_path / "out", ShadowGate(min_requests=10, max_error_rate=1.0))
    b = Browser()
    try:
        page = b.open(paths["html"], "shadow-report")
        assert page.console_errors == [] and page.failed_requests == []
        text = page.text()
        assert "candidate v2 vs production v1" in text and f"{o['overlap@10']:.4g}" in text, text[:2000]
        assert page.count("#scenarios tr") == 1 + 1 + 3 and page.count("#scores tr") == 1 + 2 * 4
        assert page.count("#score-hist rect") == 2 * 20  # candidate and production bars per bin
        assert "PASSED" in page.page.inner_text("#gate")
        assert rep["agreement"]["verdict"].upper() in page.page.inner_text("#verdict")
        assert page.screenshot.stat().st_size > 10_000
    finally:
        b.close()


def test_promote_require_shadow_refuses_without_a_passing_report(world, tmp_path):
    from redrec.experiments.shadow_report import analyse, write_report
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_version
    from redrec.pipeline.config import ShadowGate
    from redrec.pipeline.localrun import release_milvus_connections
    from redrec.release.releases import ReleaseError, promote
    from redrec.release.shadow import default_report_dir

    # the alias moves, the serving config is the test's own: deploy_target none
    p = world["params"].model_copy(update={"deploy_target": "none"})
    gate = ShadowGate(min_requests=10, max_error_rate=0.5)
    with pytest.raises(ReleaseError, match="no shadow report for v2 at .*redrec release shadow v2"):
        promote(p, "v2", shadow_gate=gate)
    rep = analyse(world["log"], "v2")
    write_report(rep, default_report_dir(p, "v2"))
    with pytest.raises(ReleaseError, match=r"error_rate 0\.\d+ > release.shadow_gate.max_error_rate 0.01"):
        promote(p, "v2", shadow_gate=ShadowGate(min_requests=10))
    with pytest.raises(ReleaseError, match=r"\d+ mirrored requests < release.shadow_gate.min_requests 1000000"):
        promote(p, "v2", shadow_gate=ShadowGate(min_requests=1_000_000, max_error_rate=1.0))
    with pytest.raises(ReleaseError, match="report is of candidate 'v2', not 'v1'"):
        promote(p, "v1", shadow_gate=gate, shadow_report=default_report_dir(p, "v2"))
    assert current_version(IndexConfig(uri=p.milvus_uri, name=p.index_alias)) == "v1"  # nothing moved
    out = promote(p, "v2", shadow_gate=gate)
    assert out["version"] == "v2" and current_version(IndexConfig(uri=p.milvus_uri, name=p.index_alias)) == "v2"
    release_milvus_connections()


# ---- no services --------------------------------------------------------------------------------


def test_a_full_shadow_queue_drops_and_counts(tmp_path):
    """offer() never blocks: beyond shadow.max_in_flight the mirror is dropped, counted, and the
    drop logged by the worker's next write (no worker runs here, so the queue only fills)."""
    from redrec.serving.config import ShadowSpec
    from redrec.serving.shadow import Shadow

    sh = Shadow(engine=None, log_dir=tmp_path, writer_args={})
    seen = []
    sh.on_event = seen.append
    sh._state = (ShadowSpec(model_version="v2", share=1.0, max_in_flight=3), object())
    resp = {"arm": "control", "cold_start": False, "fallback": False, "model_version": "v1"}
    for n in range(10):
        sh.offer({**resp, "request_id": f"r{n}"}, 10, True, [])
    assert sh.counts["mirrored"] == 3 and sh.counts["dropped"] == 7 and seen.count("dropped") == 7
    assert sh._drops == {"max_in_flight": 7}
    sh.offer({**resp, "request_id": "r-cold", "cold_start": True}, 10, True, [])  # popularity: not compared
    sh.offer({**resp, "request_id": "r-none"}, 10, True, None)  # the history read failed: nothing to mirror
    assert sh.counts["mirrored"] + sh.counts["dropped"] == 10
    sh._write([{"ts": 1.0, "event": "dropped", "reason": "max_in_flight", "n": 7}])
    assert [f.name.startswith("shadow-") for f in tmp_path.iterdir()] == [True]


def test_shadow_config_is_validated_and_carried_by_the_release_overlay(tmp_path):
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.deploy import _next_config
    from redrec.serving.config import ConfigError, ReleaseOverlay, ServingConfig, apply_overlay

    base = {"scenarios": ["a"], "milvus": {"uri": "http://127.0.0.1:1"},
            "experiment": {"arms": [{"name": "control", "model_version": "v1", "share": 1.0}]}}
    with pytest.raises(ConfigError, match=r"shadow.share: Input should be greater than 0"):
        ServingConfig.from_dict({**base, "shadow": {"model_version": "v2", "share": 0}})
    cfg = ServingConfig.from_dict({**base, "shadow": {"model_version": "v2"}})
    assert cfg.shadow.share == 0.1 and cfg.shadow_alias() == "redrec_items"
    with pytest.raises(ValueError, match=r"shadow.model_version: unknown version 'v2'.*known: \['v1'\]"):
        cfg.check_shadow_version(["v1"], "the store")
    # on Kubernetes the overlay carries it; {} turns off one config.yaml names; absent leaves it
    ov = ReleaseOverlay.parse(ReleaseOverlay(arms={"control": "v1"}, shadow={"model_version": "v3", "share": 0.5}).dump())
    assert apply_overlay(json.loads(json.dumps(base)), ov)["shadow"] == {"model_version": "v3", "share": 0.5}
    with_shadow = {**base, "shadow": {"model_version": "v2"}}
    assert apply_overlay(json.loads(json.dumps(with_shadow)), ReleaseOverlay(arms={"control": "v1"}, shadow={}))["shadow"] is None
    assert apply_overlay(json.loads(json.dumps(with_shadow)), ReleaseOverlay(arms={"control": "v1"}))["shadow"]["model_version"] == "v2"
    assert "shadow" not in ReleaseOverlay(arms={"control": "v1"}).dump()  # an overlay without one hashes as before
    with pytest.raises(ConfigError, match="shadow.share"):
        ReleaseOverlay.parse("arms: {control: v1}\nshadow: {model_version: v3, share: 2}\n")
    # a local deploy keeps the shadow through a release, and drops it when its candidate is promoted
    p = PipelineParams(dataset="synthetic", workspace=str(tmp_path), milvus_uri="http://127.0.0.1:1")
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "config.yaml").write_text(yaml.safe_dump(with_shadow))
    assert _next_config(p, json.loads(json.dumps(with_shadow)), "v3", ["a"])["shadow"]["model_version"] == "v2"
    assert "shadow" not in _next_config(p, json.loads(json.dumps(with_shadow)), "v2", ["a"])
