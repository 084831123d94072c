"""Team-draft interleaving: the draft's rules, the analysis on planted preferences, and the real
`bentoml serve` merging two arms' rankings with the teams on the serving log, clicks credited
through /record_events and `redrec ab report` reading them back."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bentoml-"))

from redrec.experiments.interleaving import credit, draft_seed, team_draft  # noqa: E402
from redrec.experiments.interleaving_report import preference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _lists(rng, n_items=40, k=10):
    pool = [f"i{j}" for j in range(n_items)]
    a = list(rng.choice(pool, size=k + int(rng.integers(0, 5)), replace=False))
    # b overlaps a partly, sometimes wholly, sometimes not at all
    mode = rng.integers(0, 3)
    b = list(a) if mode == 0 else list(rng.choice(pool, size=k, replace=False)) if mode == 1 else list(reversed(a))
    return a, b


def test_team_draft_is_fair_has_no_duplicates_and_is_deterministic_per_request():
    rng = np.random.default_rng(0)
    first_b = 0
    for trial in range(500):
        a, b = _lists(rng)
        k = int(rng.integers(1, 12))
        seed = draft_seed("exp", f"req-{trial}")
        items, teams = team_draft(a, b, k, seed)
        assert len(items) == len(set(items)) == min(k, len(set(a) | set(b)))
        assert abs(teams.count(0) - teams.count(1)) <= 1, (a, b, k, teams)
        # every item a team placed is that team's best item not shown before it
        shown: set[str] = set()
        for item, t in zip(items, teams):
            src = (a, b)[t]
            assert item == next(x for x in src if x not in shown)
            shown.add(item)
        # the same request id gives the same list (a replay reproduces it), on any process
        assert team_draft(a, b, k, draft_seed("exp", f"req-{trial}")) == (items, teams)
        first_b += teams[0]
    assert 200 < first_b < 300  # the coin of the first pick is fair
    # another request id draws other coins
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    assert len({tuple(team_draft(a, b, 10, draft_seed("exp", f"r{i}"))[1]) for i in range(20)}) > 1
    assert draft_seed("exp", "r1") == int.from_bytes(
        __import__("hashlib").sha256("exp\x1finterleave\x1fr1".encode()).digest()[:8], "big")
    assert credit(["a", "b", "a"], ["x", "y", "z"], {"y", "z", "w"}) == {"b": 1, "a": 1}


def _planted(better: str, n_users: int, seed: int) -> pd.DataFrame:
    """Users of a world with a known relevance per item: ranker A orders by it (the better one
    when ``better == 'A'``), B shuffles; or both order by it (``better == ''``: identical)."""
    rng = np.random.default_rng(seed)
    rows = []
    exam = 1 / (1 + np.arange(10)) ** 0.8
    for u in range(n_users):
        rel = {f"i{j}": r for j, r in enumerate(rng.beta(0.5, 3, size=60))}
        best = sorted(rel, key=rel.get, reverse=True)[:10]
        other = list(rng.permutation(list(rel)))[:10]
        a, b = (best, other) if better == "A" else (other, best) if better == "B" else (best, list(best))
        for s in range(3):
            rid = f"u{u}-{s}"
            items, teams = team_draft(a, b, 10, draft_seed("planted", rid))
            clicked = {i for r, i in enumerate(items) if rng.random() < exam[r] * rel[i]}
            c = credit(["ctl" if t == 0 else "trt" for t in teams], items, clicked)
            rows.append({"user_id": f"u{u}", "c_control": c.get("ctl", 0), "c_treatment": c.get("trt", 0),
                         "first": teams[0]})
    return pd.DataFrame(rows)


def test_a_known_better_ranker_wins_and_an_identical_pair_ties():
    for better, expect in (("B", 1), ("A", -1)):
        p = preference("overall", _planted(better, 300, seed=1), 0.95)
        assert p.p_value < 1e-6 and np.sign(p.share - 0.5) == expect, p
        assert (p.ci_low > 0.5) if expect > 0 else (p.ci_high < 0.5)
        assert np.sign(p.delta_ab) == expect
    # identical rankers: the teams split the same list by coin flips, no preference over many seeds
    pvals = [preference("overall", _planted("", 200, seed=s), 0.95).p_value for s in range(20)]
    assert sum(p < 0.05 for p in pvals) <= 3, pvals  # ~1 of 20 expected by chance
    p = preference("overall", _planted("", 2000, seed=99), 0.95)
    assert p.ci_low < 0.5 < p.ci_high and abs(p.first_pick_treatment - 0.5) < 0.03


# ---- the real service ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """`bentoml serve` with an interleaving experiment of two models: v1 and a copy whose item
    embeddings are shuffled between items (a ranker that knows nothing), over Feast and Milvus Lite."""
    import yaml

    from models_util import SEQ_LEN, tiny_model
    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.index.lite import LiteServer
    from redrec.serving.feast_server import FeatureServer
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare

    work = tmp_path_factory.mktemp("interleaving")
    data = generate(SyntheticConfig(n_users=120, n_items=200, seed=5))
    v1 = tiny_model(data, work / "m1", 0)
    v2 = work / "m2"
    import shutil

    shutil.copytree(v1, v2)
    emb = np.load(v1 / "item_embeddings.npy")
    np.save(v2 / "item_embeddings.npy", emb[np.random.default_rng(0).permutation(len(emb))])
    arms = [{"name": "prod", "model_version": "v1", "index_alias": "", "share": 0.5},
            {"name": "cand", "model_version": "v2", "index_alias": "redrec_items_b", "share": 0.5}]
    with LiteServer(work / "milvus.db") as uri:
        cfg_path = prepare(data, {"v1": v1, "v2": v2}, work, uri, arms, experiment="inter1", holdout_share=0.1,
                           seq_len=SEQ_LEN, serving={"batch_max_wait_ms": 2.0}, model_store=str(work / "store"))
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["experiment"]["type"] = "interleaving"
        token = secrets.token_hex(16)
        (work / "tokens").write_text(token + "\n")
        cfg["auth"] = {"enabled": True, "tokens_file": str(work / "tokens")}
        with FeatureServer(work / "feast") as fs_url:
            cfg["serving"]["feature_server_url"] = fs_url
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            with LocalServer(cfg_path) as srv:
                yield {"url": srv.url, "work": work, "data": data, "config": cfg_path,
                       "auth": {"authorization": f"Bearer {token}"}, "log": Path(cfg["serving"]["serving_log"]["dir"])}


def _log_lines(d: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(d.glob("*.jsonl")) if not f.name.startswith("feedback-")
            for x in f.read_text().splitlines() if x.strip()]


def test_the_service_interleaves_two_arms_and_the_report_credits_clicks(interleaved):
    import httpx

    from models_util import warm_users
    from redrec.experiments.assignment import HOLDOUT, INTERLEAVED
    from redrec.experiments.simulate import collect

    srv = interleaved
    users = sorted(srv["data"].events["user_id"].astype(str).unique())
    asks = [{"user_id": u, "scenario": s, "k": 10} for u in users for s in ("homefeed", "search")]
    out = collect(srv["url"], asks, concurrency=8, headers=srv["auth"])
    by_id = {r["request_id"]: r for r in out}
    lines = {r["request_id"]: r for r in _log_lines(srv["log"])}
    assert set(by_id) <= set(lines)
    inter = [lines[r] for r in by_id if lines[r]["arm"] == INTERLEAVED and lines[r].get("teams")]
    assert {r["arm"] for r in out} == {INTERLEAVED, HOLDOUT}
    assert len(inter) > 150
    for rec in inter:
        assert rec["items"] == by_id[rec["request_id"]]["items"] and len(rec["items"]) == 10
        assert len(set(rec["items"])) == 10 and len(rec["teams"]) == 10
        assert abs(rec["teams"].count("prod") - rec["teams"].count("cand")) <= 1
        assert rec["arm_versions"] == {"prod": "v1", "cand": "v2"}
        # a replay of the logged line reproduces the shown list and its teams
        items, teams = team_draft(rec["rankings"]["prod"], rec["rankings"]["cand"], 10,
                                  draft_seed("inter1", rec["request_id"]))
        assert items == rec["items"] and [("prod", "cand")[t] for t in teams] == rec["teams"]
    # each team's items are its own arm's ranking: the same user asked again draws other coins, but
    # every list is a merge of the same two rankings (prod's items in prod's order)
    u = warm_users(srv["data"], 1)[0]
    again = collect(srv["url"], [{"user_id": u, "scenario": "homefeed", "k": 10}] * 12, headers=srv["auth"])
    logged = [lines2 for lines2 in _log_lines(srv["log"]) if lines2["request_id"] in {r["request_id"] for r in again}]
    orders = {tuple(r["teams"]) for r in logged}
    assert len(orders) > 1
    prod_seq = [[i for i, t in zip(r["items"], r["teams"]) if t == "prod"] for r in logged]
    union = max(prod_seq, key=len)
    for seq in prod_seq:  # a team's picks are in its ranking's order
        assert [i for i in union if i in seq] == [i for i in seq if i in union]

    # clicks on the prod ranker's items only: the report must credit prod and find the preference
    events = []
    for rec in inter:
        for item, team in zip(rec["items"], rec["teams"]):
            if team == "prod" and rec["items"].index(item) < 3:
                events.append({"user_id": rec["user_id"], "item_id": item, "scenario": rec["scenario"],
                               "action": "click", "request_id": rec["request_id"]})
    with httpx.Client(base_url=srv["url"], headers=srv["auth"], timeout=60) as c:
        for i in range(0, len(events), 200):
            r = c.post("/record_events", json={"events": events[i:i + 200]})
            assert r.status_code == 200, r.text
    rep_dir = srv["work"] / "report"
    run = subprocess.run([sys.executable, "-m", "redrec.cli", "ab", "report", "--log-dir", str(srv["log"]),
                          "--config", str(srv["config"]), "--out", str(rep_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rep = json.loads((rep_dir / "interleaving_report.json").read_text())
    o = rep["preferences"]["overall"]
    assert rep["type"] == "interleaving" and rep["control"] == "prod" and rep["treatment"] == "cand"
    assert o["credit_control"] == len(events) and o["credit_treatment"] == 0
    clickers = {e["user_id"] for e in events}
    assert o["losses"] == len(clickers) > 50 and o["wins"] == 0 and o["ties"] == 0
    assert o["significant"] and o["share"] == 0.0 and rep["verdict"] == "users prefer prod"
    assert set(rep["preferences"]) == {"overall", "homefeed", "search"}
    assert rep["srm"]["groups"] == ["interleaved", "holdout"] and not rep["srm"]["mismatch"] and not rep["problems"]
    assert "users prefer prod" in run.stdout
    # without the config the log still says it is interleaved: the same analysis, arms in name order
    run2 = subprocess.run([sys.executable, "-m", "redrec.cli", "ab", "report", "--log-dir", str(srv["log"]),
                           "--out", str(srv["work"] / "report2")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run2.returncode == 0, run2.stdout + run2.stderr
    assert json.loads((srv["work"] / "report2" / "interleaving_report.json").read_text())["verdict"] == "users prefer prod"

    # the page, as an owner opens it: no console errors, no outside request, the verdict and a
    # mark with its interval per scope on the preference chart
    from browser_util import Browser

    b = Browser()
    try:
        page = b.open(rep_dir / "interleaving_report.html", "interleaving-report")
        assert page.console_errors == [] and page.failed_requests == []
        assert "users prefer prod" in page.page.inner_text("#verdict")
        assert page.count("#preference-chart circle") == 3 and page.count("#preference-chart line") == 4
        assert page.count("#preferences tr") == 4 and "no mismatch" in page.page.inner_text("#srm")
        assert page.screenshot.stat().st_size > 10_000
    finally:
        b.close()


def test_a_broken_holdout_split_is_flagged(tmp_path):
    """Half the users held out where the config says a tenth: the preference is reported with the
    sample ratio mismatch named as a problem."""
    from redrec.experiments.assignment import ExperimentSpec
    from redrec.experiments.interleaving_report import analyse_interleaving
    from redrec.experiments.log import AppendLog

    spec = ExperimentSpec(name="x", type="interleaving", holdout_share=0.1,
                          arms=[{"name": "a", "model_version": "v1", "share": 0.5}, {"name": "b", "model_version": "v2", "share": 0.5}])
    log, fb = AppendLog(tmp_path / "serving-p.jsonl"), AppendLog(tmp_path / "feedback-p.jsonl")
    for u in range(2000):
        held = u % 2 == 0
        items, teams = team_draft(["i1", "i2"], ["i3", "i4"], 4, draft_seed("x", f"r{u}"))
        log.append({"request_id": f"r{u}", "ts": 1.7e9, "experiment": "x", "user_id": f"u{u}", "scenario": "s",
                    "arm": "holdout" if held else "interleaved", "model_version": "v1", "items": items,
                    "scores": [1.0] * 4, "cold_start": False, "teams": None if held else [("a", "b")[t] for t in teams]})
        fb.append({"request_id": f"r{u}", "user_id": f"u{u}", "item_id": items[0], "scenario": "s", "action": "click",
                   "ts": 1.7e9 + 1})
    rep = analyse_interleaving(tmp_path, spec)
    assert rep.srm["mismatch"] and rep.srm["observed"] == [1000, 1000]
    assert any("sample ratio mismatch" in p for p in rep.problems)
    assert rep.n_responses == 1000 and rep.preferences["overall"].users == 1000


def test_interleaving_config_needs_two_arms():
    from redrec.experiments.assignment import ExperimentSpec

    with pytest.raises(ValueError, match="exactly two arms"):
        ExperimentSpec(type="interleaving", arms=[{"name": "a", "model_version": "v", "share": 1.0}])
    with pytest.raises(ValueError, match="type"):
        ExperimentSpec(type="ab-test", arms=[{"name": "a", "model_version": "v", "share": 1.0}])
