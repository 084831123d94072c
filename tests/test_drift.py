"""Drift monitoring end to end on synthetic data with a real (tiny) model, Evidently, kfp.local and
kfp.Client against a local stand-in of the KFP REST API (it plays the remote cluster).

The world: one synthetic population split into two disjoint user halves over the same period.
Half A is the training window (reference, model); half B is "live" traffic, replayed through the
model into a serving log (requests + feedback, contract 1). The planted shift rewrites half B's
search events only: popular-head items and mostly skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest
import yaml

from redrec.data import RecData, chronological_split, encode
from redrec.data.synthetic import SyntheticConfig, generate
from redrec.drift.config import DEFAULT_THRESHOLDS, Thresholds, load_drift_config
from redrec.drift.model_side import serve_like
from redrec.drift.monitor import run_check
from redrec.drift.reference import record_reference
from redrec.drift.trigger import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
SCEN = ["homefeed", "search", "ads"]

TINY_PIPELINE = '''
from kfp import dsl

@dsl.component
def retrain(marker: str) -> str:
    import pathlib, time
    p = pathlib.Path(marker)
    with open(p, "a") as f:
        f.write(f"{time.time()}\\n")
    return marker

@dsl.pipeline
def tiny_pipeline(marker: str):
    retrain(marker=marker)
'''


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _serving_log(ck, events: pd.DataFrame, items: pd.DataFrame, log_dir: Path, every: int = 4) -> None:
    """A request before every ``every``-th event (served by the model) and every event as feedback."""
    ev = events.reset_index(drop=True)
    rid = np.array([f"fb-{i}" for i in range(len(ev))], dtype=object)
    sel = np.arange(0, len(ev), every)
    rid[sel] = [f"req-{i}" for i in sel]
    req = pd.DataFrame({"request_id": rid[sel], "user_id": ev["user_id"].to_numpy()[sel],
                        "scenario": ev["scenario"].to_numpy()[sel], "ts": ev["ts"].to_numpy()[sel] - 0.5})
    served, _ = serve_like(ck, ev, items, req)
    _write_jsonl(log_dir / "serving-pod-0.jsonl", served.to_dict("records"))
    fb = ev.assign(request_id=rid)
    _write_jsonl(log_dir / "feedback-pod-0.jsonl", fb.to_dict("records"))


def _replay_hit_rate(ck, events, items, n=300, k=10, seed=0) -> dict:
    """The offline metric the pipeline would hand over: HR@k replayed on the training window."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in SCEN:
        ev = events[events["scenario"] == s]
        ev = ev.iloc[np.sort(rng.choice(len(ev), size=min(n, len(ev)), replace=False))]
        req = pd.DataFrame({"request_id": [f"o{i}" for i in range(len(ev))], "user_id": ev["user_id"].to_numpy(),
                            "scenario": s, "ts": ev["ts"].to_numpy() - 0.5})
        served, _ = serve_like(ck, events, items, req, top_k=k)
        out[s] = {f"hr@{k}": float(np.mean([i in its for i, its in zip(ev["item_id"], served["items"])]))}
    return out


def _plant_search_shift(events: pd.DataFrame, ref_ev: pd.DataFrame, items: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """The planted shift, search only: traffic jumps to the popular head and is mostly skipped."""
    pop = ref_ev["item_id"].value_counts()
    search_items = items.loc[items["scenarios"].map(lambda s: "search" in s), "item_id"]
    head = [i for i in search_items if pop.get(i, 0) >= pop.quantile(0.9)]
    rng = np.random.default_rng(seed)
    shifted = events.copy()
    m = (shifted["scenario"] == "search").to_numpy()
    shifted.loc[m, "item_id"] = rng.choice(head, size=int(m.sum()))
    shifted.loc[m, "action"] = np.where(rng.random(int(m.sum())) < 0.8, "skip", "click")
    return shifted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from redrec.experiment import ExperimentConfig, train_variant
    from redrec.model.checkpoint import export_checkpoint

    root = tmp_path_factory.mktemp("drift")
    # 1000 users per half: with 300, the halves' event times (users start at random days) differ by
    # sampling alone by 0.04-0.09 normed Wasserstein in item_age_rank, near the shipped 0.1
    data = generate(SyntheticConfig(n_users=2000, n_items=200, seed=3))
    ev = data.events
    users = sorted(ev["user_id"].unique())
    ref_ev = ev[ev["user_id"].isin(set(users[::2]))].reset_index(drop=True)
    cur_ev = ev[ev["user_id"].isin(set(users[1::2]))].reset_index(drop=True)
    ref_data = RecData("ref", ref_ev, data.items, data.scenarios, data.actions)
    enc = encode(ref_data)
    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": ["redrec"], "out_dir": str(root / "train"),
        "model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
        "train": {"epochs": 1, "batch_size": 32, "negatives": 64, "progress": False, "warmup_steps": 2, "max_steps": 8},
    })
    trainer, _ = train_variant(cfg, "redrec", ref_data, enc, chronological_split(enc), root / "train", resume=False)
    ck = export_checkpoint(trainer.module, root / "model", enc.item_ids, {"variant": "redrec"})
    offline = _replay_hit_rate(ck, ref_ev, data.items)
    # the live half are users arriving during the window: the reference replays past events
    ref_dir = record_reference(ref_ev, data.items, root / "reference", model_dir=ck,
                               meta={"offline_metrics": offline}, max_requests=600, requests_at="events")

    shifted = _plant_search_shift(cur_ev, ref_ev, data.items)
    _serving_log(ck, cur_ev, data.items, root / "log-noshift")
    _serving_log(ck, shifted, data.items, root / "log-shift")
    module_dir = root / "pipelines"
    module_dir.mkdir()
    mod = f"tiny_retrain_{uuid.uuid4().hex[:6]}"
    (module_dir / f"{mod}.py").write_text(TINY_PIPELINE)
    # the shipped thresholds, as shipped: no-shift data must pass them untouched
    thresholds = DEFAULT_THRESHOLDS
    return {
        "root": root, "data": data, "ref_dir": ref_dir, "ref_ev": ref_ev, "cur_ev": cur_ev, "ck": ck, "offline": offline,
        "now": float(ev["ts"].max() + 60), "module_dir": module_dir, "module": mod, "thresholds": thresholds,
    }


def _cfg(world, tmp_path, log="log-shift", **kw):
    over = {
        "scenarios": SCEN, "reference_dir": world["ref_dir"], "report_dir": tmp_path / "reports",
        "serving_log_dir": world["root"] / log, "now": world["now"], "window_hours": 24 * 40,
        "local_pipeline": f"{world['module']}:tiny_pipeline", "pipeline_params": {"marker": str(tmp_path / "retrained.txt")},
        "thresholds_path": world["thresholds"],
    }
    over.update(kw)
    return load_drift_config(None, over)


@pytest.fixture
def local_kfp(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world["module_dir"]))
    # the SubprocessRunner starts `python3` from PATH: make it this environment's interpreter
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


class _Page(HTMLParser):
    """Collect the text of elements by id and all visible text: what a reader sees."""

    def __init__(self):
        super().__init__()
        self.stack, self.by_id, self.text, self.links = [], {}, [], []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.in_script = tag in ("script", "style")
        self.stack.append(a.get("id"))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag):
        self.in_script = False
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.in_script:
            return
        self.text.append(data)
        for i in self.stack:
            if i:
                self.by_id.setdefault(i, []).append(data)

    def section(self, id_: str) -> str:
        return " ".join(self.by_id.get(id_, []))


def _page(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


# --------------------------------------------------------------------------------------------

def test_planted_shift_flags_exactly_that_scenario_and_retrains_once_per_cooldown(world, tmp_path, local_kfp):
    cfg = _cfg(world, tmp_path, cooldown_hours=6)
    summary, run_dir = run_check(cfg)
    verdicts = {s["scenario"]: s["verdict"] for s in summary["scenarios"]}
    assert verdicts == {"homefeed": "ok", "search": "drift", "ads": "ok"}, summary["scenarios"]
    search = next(s for s in summary["scenarios"] if s["scenario"] == "search")
    assert {"action", "pop_bucket"} <= set(search["top_drifted"])
    assert search["drift_share"] >= 0.3
    assert summary["drifted"] == ["search"] and summary["exit_code"] == 0
    trig = summary["trigger"]
    assert trig["fired"] and trig["mode"] == "local" and trig["state"] == "SUCCEEDED", trig
    assert len((tmp_path / "retrained.txt").read_text().splitlines()) == 1  # the pipeline really ran

    # the same drift an hour later: inside the cool-down, nothing new starts
    s2, _ = run_check(cfg.model_copy(update={"now": world["now"] + 3600}))
    assert s2["drifted"] == ["search"] and not s2["trigger"]["fired"]
    assert "cool-down" in s2["trigger"]["reason"]
    assert len((tmp_path / "retrained.txt").read_text().splitlines()) == 1
    # after the cool-down a persisting drift starts one more run
    s3, _ = run_check(cfg.model_copy(update={"now": world["now"] + 7 * 3600}))
    assert s3["trigger"]["fired"]
    assert len((tmp_path / "retrained.txt").read_text().splitlines()) == 2

    # machine summary and the pages on disk
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["drifted"] == ["search"] and on_disk["trigger"]["run_name"] == trig["run_name"]
    index = _page(run_dir / "index.html")
    table = index.section("scenarios")
    assert "search" in table and "DRIFTED" in table and "action" in table
    assert {"homefeed.html", "search.html", "ads.html"} <= set(index.links)
    page = _page(run_dir / "search.html")
    assert "DRIFTED" in " ".join(page.text)
    top = page.section("top-drifted")
    assert "action" in top and "pop_bucket" in top
    assert "retraining STARTED" in page.section("next")
    raw = (run_dir / "search.html").read_text()
    assert "drawDashboard" in raw and '"action"' in raw  # Evidently's dashboard data, embedded
    assert "src=\"http" not in raw  # self-contained: no external scripts
    ok_page = _page(run_dir / "homefeed.html")
    assert "OK" in ok_page.section("verdict") and "DRIFTED" not in ok_page.section("verdict")
    # its user embeddings moved with the search traffic: said, and attributed, not alarmed
    assert "attributed to the behaviour drift in search" in ok_page.section("notes")
    # history keeps every run
    history = _page(tmp_path / "reports" / "index.html")
    assert len([link for link in history.links if link.endswith("/index.html")]) == 3
    assert not list((tmp_path / "reports").glob(".*.tmp"))


def test_no_shift_gives_no_alarm(world, tmp_path, local_kfp):
    summary, run_dir = run_check(_cfg(world, tmp_path, log="log-noshift"))
    assert {s["scenario"]: s["verdict"] for s in summary["scenarios"]} == {s: "ok" for s in SCEN}, summary["scenarios"]
    assert not summary["trigger"]["fired"] and summary["exit_code"] == 0
    assert not (tmp_path / "retrained.txt").exists() and not (tmp_path / "reports" / STATE_FILE).exists()
    for s in summary["scenarios"]:
        checks = {c["name"]: c for c in s["checks"]}
        # every check was really judged on this data, not skipped
        assert {checks[n]["status"] for n in ("behaviour", "user_embedding", "served_score", "online_hit_rate", "serving_mix")} == {"ok"}, s
        # and no single feature crossed its shipped threshold: nothing for a reader to chase
        assert not [f["name"] for f in checks["behaviour"]["features"] if f["drifted"]], s


def test_cold_starts_and_fallbacks_do_not_look_like_score_drift(world, tmp_path, local_kfp):
    """Live traffic mixes model-ranked responses with cold starts and fallbacks that log popularity
    counts (thousands) in the same 'scores' field: the model-side checks compare model outputs
    only, so the same model on the same users is still ok everywhere."""
    log = tmp_path / "log"
    lines = [json.loads(x) for x in (world["root"] / "log-noshift" / "serving-pod-0.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(3)
    for n, r in enumerate(lines):
        if n % 4 == 0:  # a quarter of the traffic: cold starts and popularity fallbacks
            r.update(cold_start=n % 8 == 0, fallback=n % 8 == 4, model_version="popularity",
                     scores=sorted(rng.integers(1000, 5000, len(r["scores"])).astype(float).tolist(), reverse=True))
            r.pop("user_embedding", None)
    _write_jsonl(log / "serving-pod-0.jsonl", lines)
    (log / "feedback-pod-0.jsonl").write_text((world["root"] / "log-noshift" / "feedback-pod-0.jsonl").read_text())
    summary, _ = run_check(_cfg(world, tmp_path, log=str(log), trigger=False))
    for s in summary["scenarios"]:
        checks = {c["name"]: c for c in s["checks"]}
        assert s["verdict"] == "ok" and checks["served_score"]["status"] == "ok", s
        assert checks["served_score"]["score"] < 0.1, checks["served_score"]
        # 12.5 % fallbacks: an alert of its own (an outage), reported in the notes, never drift
        mix = checks["serving_mix"]
        assert mix["status"] == "alert" and "popularity fallback" in mix["message"] and abs(mix["score"] - 0.125) < 0.03, mix
        assert any(n.startswith("ALERT serving_mix") for n in s["notes"]), s["notes"]
    assert summary["drifted"] == [] and summary["exit_code"] == 0


def test_behaviour_drift_share_agrees_with_evidently_and_score_drift(world, tmp_path):
    """With the model-side checks alone (behaviour disabled), an unexplained model-side drift
    flags the scenario: here the serving log's scores are pushed up, as a changed model would."""
    log = tmp_path / "log"
    lines = [json.loads(x) for x in (world["root"] / "log-noshift" / "serving-pod-0.jsonl").read_text().splitlines()]
    for r in lines:
        if r["scenario"] == "ads":
            r["scores"] = [s + 0.5 for s in r["scores"]]
    _write_jsonl(log / "serving-pod-0.jsonl", lines)
    (log / "feedback-pod-0.jsonl").write_text((world["root"] / "log-noshift" / "feedback-pod-0.jsonl").read_text())
    summary, _ = run_check(_cfg(world, tmp_path, log=str(log), trigger=False))
    v = {s["scenario"]: s for s in summary["scenarios"]}
    assert v["ads"]["verdict"] == "drift" and v["ads"]["top_drifted"] == ["served_score"]
    assert v["homefeed"]["verdict"] == v["search"]["verdict"] == "ok"
    assert summary["trigger"]["reason"] == "trigger disabled (--no-trigger)"


def test_sequence_lengths_right_after_a_deploy_count_the_history_the_log_has_not_seen(world, tmp_path):
    """A user's first events after the reference window: their trailing counts come from the
    reference's tail plus the log, exactly as if the log had held the whole history."""
    from redrec.drift.features import behaviour_features, item_stats
    from redrec.drift.monitor import current_events
    from redrec.drift.reference import load_reference

    ev = world["ref_ev"].sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    later = ev.groupby("user_id").cumcount(ascending=False) < 10  # each user's last 10 events
    ref = load_reference(record_reference(ev[~later], world["data"].items, tmp_path / "ref"))
    assert ref.tail is not None and 0 < len(ref.tail) <= (~later).sum()  # synthetic sessions fit in a day
    feedback = ev[later].assign(request_id=None, received_ts=float(ev["ts"].max() + 10))
    cfg = _cfg(world, tmp_path)
    now = float(ev["ts"].max() + 20)
    cur = current_events(cfg, feedback, now - 3600, now, now - 3600 - 86400, ref.tail)
    got = behaviour_features(cur, ref.items, 24)[cur["in_window"].to_numpy()]
    want = behaviour_features(ev, ref.items, 24)[later.to_numpy()]
    assert len(got) == later.sum() and (want["seq_len"] > 10).mean() > 0.5  # most users had history before
    assert sorted(got["seq_len"]) == sorted(want["seq_len"])
    # without the tail the log alone undercounts: what every check right after a deploy saw
    bare = current_events(cfg, feedback, now - 3600, now, now - 3600 - 86400)
    assert behaviour_features(bare, ref.items, 24)["seq_len"].max() <= 9


def test_item_age_rank_is_the_share_of_known_items_first_seen_at_or_after_the_item():
    from redrec.drift.features import behaviour_features, item_stats

    items = pd.DataFrame({"item_id": ["a", "b", "c"], "tags": [["x"], ["x"], ["y"]]})
    day = 86400
    ref = pd.DataFrame({"user_id": "u", "item_id": ["a", "b", "c"], "scenario": "homefeed", "action": "click",
                        "ts": [0, 10 * day, 20 * day]})
    stats = item_stats(ref, items, 10)
    cur = pd.DataFrame({"user_id": "v", "item_id": ["a", "c", "b", "d"], "scenario": "homefeed", "action": "click",
                        "ts": [30 * day, 30 * day, 5 * 365 * day, 31 * day]})
    f = behaviour_features(cur, stats, 24)
    # a is the oldest of 3 known items, c the newest; d is new here (first seen at 31 days);
    # years later the rank of b has not moved, where its age in days would have
    assert f["item_age_rank"].round(4).tolist() == [1.0, round(1 / 3, 4), 0.75, 0.25]


def test_too_little_current_data_is_insufficient_not_an_alarm(world, tmp_path, local_kfp):
    # a 3-hour window at the end of the shifted traffic: a few dozen events per scenario
    summary, _ = run_check(_cfg(world, tmp_path, window_hours=3))
    assert {s["verdict"] for s in summary["scenarios"]} == {"insufficient_data"}, summary["scenarios"]
    b = next(c for c in summary["scenarios"][1]["checks"] if c["name"] == "behaviour")
    assert "at least 1000 needed" in b["message"]
    assert not summary["trigger"]["fired"] and summary["exit_code"] == 0
    # an empty window says so
    empty, _ = run_check(_cfg(world, tmp_path, now=world["now"] + 400 * 86400, window_hours=1))
    assert empty["status"] == "insufficient_data" and "holds no events and no requests" in empty["problems"][0]


# --------------------------------------------------------------------------------------------
# bad input

def test_missing_column_in_events_file_fails_cleanly(world, tmp_path):
    bad = world["cur_ev"].drop(columns=["action"])
    bad.to_parquet(tmp_path / "events.parquet")
    summary, run_dir = run_check(_cfg(world, tmp_path, events=[tmp_path / "events.parquet"]))
    assert summary["exit_code"] == 2 and summary["status"] == "error"
    assert "'action'" in summary["problems"][0] and "events.parquet" in summary["problems"][0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "error"
    assert "action" in _page(run_dir / "index.html").section("problems")
    assert sorted(p.name for p in run_dir.iterdir()) == ["index.html", "summary.json"]
    assert not list((tmp_path / "reports").glob(".*"))


def test_scenario_absent_from_reference_and_missing_reference(world, tmp_path):
    summary, run_dir = run_check(_cfg(world, tmp_path, scenarios=["homefeed", "live"], trigger=False))
    live = next(s for s in summary["scenarios"] if s["scenario"] == "live")
    assert live["verdict"] == "error" and "absent from the reference" in live["problems"][0]
    assert summary["exit_code"] == 3
    assert "absent from the reference" in _page(run_dir / "live.html").section("problems")

    summary, _ = run_check(_cfg(world, tmp_path, reference_dir=tmp_path / "nowhere"))
    assert summary["exit_code"] == 2 and "no drift reference" in summary["problems"][0]


def test_nan_only_scores_and_malformed_lines(world, tmp_path):
    log = tmp_path / "log"
    lines = (world["root"] / "log-noshift" / "serving-pod-0.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for r in recs:
        r["scores"] = [float("nan")] * len(r["scores"])
        r.pop("user_embedding")
    _write_jsonl(log / "serving-pod-0.jsonl", recs)
    with (log / "serving-pod-0.jsonl").open("a") as f:
        f.write('{"request_id": "x", "ts": 1}\n{"torn line')  # a writer killed mid-line
    (log / "feedback-pod-0.jsonl").write_text((world["root"] / "log-noshift" / "feedback-pod-0.jsonl").read_text())
    summary, _ = run_check(_cfg(world, tmp_path, log=str(log), trigger=False))
    for s in summary["scenarios"]:
        checks = {c["name"]: c for c in s["checks"]}
        assert checks["served_score"]["status"] == "error" and "NaN" in checks["served_score"]["message"]
        assert checks["user_embedding"]["status"] == "insufficient_data"
        assert "omits 'user_embedding'" in checks["user_embedding"]["message"]
        assert s["verdict"] == "ok"  # behaviour and hit rate still judged
    assert summary["inputs"]["skipped_log_lines"] == {"invalid JSON": 1, "missing field(s) ['user_id', 'scenario', 'items', 'scores']": 1}
    assert any("malformed" in p for p in summary["problems"])


def test_thresholds_are_typed_per_scenario(tmp_path):
    t = Thresholds.from_yaml(DEFAULT_THRESHOLDS)
    assert t.for_scenario("ads").behaviour.features["category"].threshold == 0.2
    assert t.for_scenario("ads").behaviour.features["hour"].threshold == 0.1
    assert t.for_scenario("homefeed").behaviour.features["category"].threshold == 0.1
    bad = tmp_path / "t.yaml"
    bad.write_text("scenarios:\n  ads:\n    behaviour:\n      features:\n        colour: {method: psi, threshold: 0.2}\n")
    with pytest.raises(ValueError, match="colour"):
        Thresholds.from_yaml(bad)
    bad.write_text("defaults:\n  embedding:\n    treshold: 0.7\n")
    with pytest.raises(ValueError, match="treshold"):
        Thresholds.from_yaml(bad)
    with pytest.raises(ValueError, match="reference_dir"):
        load_drift_config(None, {"scenarios": ["a"], "report_dir": tmp_path})


# --------------------------------------------------------------------------------------------
# the cluster path: kfp.Client with the projected ServiceAccount token, against a KFP stand-in

class KfpStandIn:
    """Enough of the KFP v2beta1 REST API for kfp.Client: healthz, experiments, pipeline
    versions, runs (create/list). Rejects calls without the expected bearer token."""

    def __init__(self, token: str):
        self.token, self.experiments, self.runs, self.calls = token, [], [], []
        stand_in = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _auth(self):
                stand_in.calls.append((self.command, self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    self._send(401, {"error": "missing or wrong service-account token"})
                    return False
                return True

            def do_GET(self):
                if not self._auth():
                    return
                u = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                if u.path == "/apis/v2beta1/healthz":
                    return self._send(200, {"multi_user": True})
                if u.path == "/apis/v2beta1/experiments":
                    name = json.loads(q.get("filter", "{}")).get("predicates", [{}])[0].get("stringValue")
                    return self._send(200, {"experiments": [e for e in stand_in.experiments if e["display_name"] == name]})
                if u.path.startswith("/apis/v2beta1/pipelines/") and u.path.endswith("/versions"):
                    pid = u.path.split("/")[4]
                    return self._send(200, {"pipeline_versions": [{"pipeline_id": pid, "pipeline_version_id": "v-latest",
                                                                   "display_name": "v1", "created_at": "2024-01-01T00:00:00Z"}]})
                if u.path == "/apis/v2beta1/runs":
                    runs = [r for r in stand_in.runs if r["experiment_id"] == q.get("experiment_id", r["experiment_id"])]
                    return self._send(200, {"runs": sorted(runs, key=lambda r: r["created_at"], reverse=True)})
                self._send(404, {"error": u.path})

            def do_POST(self):
                if not self._auth():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                if self.path == "/apis/v2beta1/experiments":
                    e = {**body, "experiment_id": f"exp-{len(stand_in.experiments)}", "created_at": now}
                    stand_in.experiments.append(e)
                    return self._send(200, e)
                if self.path == "/apis/v2beta1/runs":
                    r = {**body, "run_id": f"run-{len(stand_in.runs)}", "created_at": now, "state": "PENDING"}
                    stand_in.runs.append(r)
                    return self._send(200, r)
                self._send(404, {"error": self.path})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _chart_config(tmp_path: Path, world, kfp_host: str) -> Path:
    """config.yaml exactly as charts/redrec/templates/configmap.yaml renders it."""
    cfg = {
        "scenarios": SCEN, "log_level": "INFO",
        "experiment": {"name": "default", "holdout_share": 0.0,
                       "arms": [{"name": "control", "model_version": "bundled", "index_alias": "redrec_items", "share": 1.0}]},
        "serving": {"max_k": 200, "port": 3000, "feature_server_url": "http://feast:6566",
                    "serving_log": {"dir": str(world["root"] / "log-shift"), "per_pod_file": True}},
        "milvus": {"uri": "http://milvus:19530", "collection_alias": "redrec_items"},
        "drift": {"kfp_host": kfp_host, "kfp_namespace": "wrong-ns", "pipeline_id": "pipe-123"},
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_cronjob_entry_point_starts_one_kfp_run_with_the_sa_token(world, tmp_path):
    token = tmp_path / "token"
    token.write_text("sa-token-abc")
    with KfpStandIn("sa-token-abc") as kfp:
        config = _chart_config(tmp_path, world, "http://unused.invalid:8888")
        env = dict(os.environ, KF_PIPELINES_SA_TOKEN_PATH=str(token), REDREC_KFP_NAMESPACE="team-recs",
                   REDREC_SERVING_LOG_DIR=str(world["root"] / "log-shift"), PYTHONUNBUFFERED="1")

        def cronjob(out: Path, now: float):
            # the CronJob's command line (charts/redrec/templates/drift-cronjob.yaml) plus extraArgs
            return subprocess.run(
                [sys.executable, "-m", "redrec.cli", "drift", "check", "--config", str(config), "--kfp-host", kfp.url,
                 "--pipeline-id", "pipe-123", "--reference", str(world["ref_dir"]), "--out", str(out),
                 "--now", str(now), "--window-hours", str(24 * 40), "--thresholds", str(world["thresholds"])],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

        first = cronjob(tmp_path / "pod1", world["now"])
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(kfp.runs) == 1
        run = kfp.runs[0]
        assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-123", "pipeline_version_id": "v-latest"}
        assert run["display_name"].startswith("redrec-drift-retrain-")
        assert kfp.experiments[0]["namespace"] == "team-recs"  # env wins over the file, as in the pod
        assert all(auth == "Bearer sa-token-abc" for _, _, auth in kfp.calls)
        s1 = json.loads(next((tmp_path / "pod1").glob("*/summary.json")).read_text())
        assert s1["trigger"]["fired"] and s1["trigger"]["run_id"] == "run-0" and s1["trigger"]["mode"] == "cluster"
        assert "search" in first.stdout and "fired" in first.stdout

        # next hour, a fresh pod (its disk is new): KFP itself tells it a run started recently
        second = cronjob(tmp_path / "pod2", world["now"] + 3600)
        assert second.returncode == 0, second.stdout + second.stderr
        assert len(kfp.runs) == 1
        s2 = json.loads(next((tmp_path / "pod2").glob("*/summary.json")).read_text())
        assert not s2["trigger"]["fired"] and "cool-down: KFP run run-0" in s2["trigger"]["reason"]

    # KFP down: the check still writes its report, and exits 4 so the Job shows the failure
    summary, _ = run_check(_cfg(world, tmp_path, kfp_host="http://127.0.0.1:9", pipeline_id="p", kfp_namespace="team-recs"))
    assert summary["exit_code"] == 4 and not summary["trigger"]["fired"] and summary["trigger"]["error"]


def test_drift_pages_in_a_browser(world, tmp_path):
    """The on-call engineer's view: the run's index and a drifted scenario's page in headless
    Chromium, with Evidently's embedded dashboard drawn, no console error, nothing fetched."""
    from browser_util import Browser

    summary, run_dir = run_check(_cfg(world, tmp_path, trigger=False))
    assert summary["drifted"] == ["search"]
    b = Browser()
    try:
        index = b.open(run_dir / "index.html", "drift-index")
        assert index.console_errors == [] and index.failed_requests == []
        text = index.text()
        assert "search" in text and "DRIFTED" in text and "homefeed" in text
        page = b.open(run_dir / "search.html", "drift-search")
        assert page.console_errors == [] and page.failed_requests == []
        assert "DRIFTED" in page.text() and "action" in page.text()
        # Evidently's dashboard is drawn from its embedded data: its plots are real SVG in the DOM
        assert page.count("svg") >= 3, page.count("svg")
        assert page.screenshot.stat().st_size > 20_000
        # the history over runs: drift share per scenario as a line, the alarm level marked
        run_check(_cfg(world, tmp_path, trigger=False).model_copy(update={"now": world["now"] + 3600}))
        hist = b.open(tmp_path / "reports" / "index.html", "drift-history")
        assert hist.console_errors == [] and hist.failed_requests == []
        assert hist.count("#drift-share-chart polyline") == 3 and hist.count("#drift-share-chart circle") == 6
        assert "alarm 0.3" in hist.text() and hist.count("#runs tr") == 3
    finally:
        b.close()


# ---- held-out events replayed through the real service, right after a deploy ----------------

REPLAY_USERS = 300  # per replay window: 2,400-6,500 events per scenario
REPLAY_EVERY = 8  # a request before every 8th event of a user: 300-900 model-ranked requests per scenario


@pytest.fixture(scope="module")
def deployed(world, tmp_path_factory):
    """The local pipeline (kfp.local, Feast, Milvus Lite, BentoML server) trained on the world's
    reference half and deployed; the other half has never reached the service."""
    from redrec.index.lite import free_port
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.deploy import stop_local
    from redrec.pipeline.localrun import ensure_milvus, release_milvus_connections, run_local, stop_milvus

    base = tmp_path_factory.mktemp("deployed")
    world["ref_ev"].to_parquet(base / "events.parquet", index=False)
    world["data"].items.to_parquet(base / "items.parquet", index=False)
    ws = base / "ws"
    params = PipelineParams(
        dataset="parquet", dataset_args={"events": str(base / "events.parquet"), "items": str(base / "items.parquet")},
        experiment={"model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
                    "train": {"epochs": 4, "batch_size": 64, "warmup_steps": 2, "patience_steps": 16, "lr": 0.003}},
        drift_reference_at="events",  # the live half are users arriving, not returning
        workspace=str(ws), milvus_uri=ensure_milvus(ws), serving_port=free_port())
    try:
        res = run_local(params)
        assert res.ok, res.error
        yield {"params": params, "url": res.summary["service"], "ws": ws}
    finally:
        stop_local(ws)
        release_milvus_connections()
        stop_milvus(ws)


def _replay(url: str, events: pd.DataFrame, every: int = REPLAY_EVERY) -> tuple[float, float]:
    """The users' events in order, as an app and its event collector send them: a /recommend
    before every ``every``-th event of a user, then the events up to that user's next request,
    the first of them answering the request. Round r asks every user with an r-th chunk at once,
    then records all those chunks in /record_events calls of up to 1000 events (the collector
    batches across users). Returns the wall-clock span the service saw them in."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    cols = ["user_id", "item_id", "scenario", "action", "ts"]
    chunks = {u: [g.iloc[i : i + every] for i in range(0, len(g), every)]
              for u, g in events.sort_values(["user_id", "ts"], kind="stable")[cols].groupby("user_id")}
    t0 = time.time()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        def ask(chunk: pd.DataFrame) -> list[dict]:
            rows = [{**r, "ts": int(r["ts"])} for r in chunk.to_dict("records")]
            r = client.post(url + "/recommend", json={"user_id": rows[0]["user_id"], "scenario": rows[0]["scenario"], "k": 10})
            assert r.status_code == 200, r.text
            rows[0]["request_id"] = r.json()["request_id"]
            return rows

        for r in range(max(len(c) for c in chunks.values())):
            rows = [e for answered in pool.map(ask, [c[r] for c in chunks.values() if len(c) > r]) for e in answered]
            for i in range(0, len(rows), 1000):
                resp = client.post(url + "/record_events", json={"events": rows[i : i + 1000]})
                assert resp.status_code == 200 and resp.json()["accepted"] == len(rows[i : i + 1000]), resp.text
    t1 = time.time()
    time.sleep(0.05)  # the next replay's lines are stamped after this window's end
    return t0, t1


@pytest.mark.slow
def test_replayed_heldout_events_are_ok_and_a_planted_shift_is_caught(world, deployed, tmp_path):
    users = sorted(world["cur_ev"]["user_id"].unique())
    cur = world["cur_ev"]
    calm = cur[cur["user_id"].isin(set(users[:REPLAY_USERS]))]
    moved = _plant_search_shift(cur[cur["user_id"].isin(set(users[REPLAY_USERS : 2 * REPLAY_USERS]))], world["ref_ev"], world["data"].items)
    ws = deployed["ws"]

    def check(span, name):
        return run_check(load_drift_config(None, {
            "scenarios": SCEN, "reference_dir": ws / "drift" / "reference", "report_dir": tmp_path / name,
            "serving_log_dir": ws / "serving-log", "now": span[1], "window_hours": (span[1] - span[0]) / 3600,
            "thresholds_path": DEFAULT_THRESHOLDS, "trigger": False}))[0]

    calm_span = _replay(deployed["url"], calm)
    moved_span = _replay(deployed["url"], moved)

    summary = check(calm_span, "calm")
    by = {s["scenario"]: s for s in summary["scenarios"]}
    assert {s: by[s]["verdict"] for s in SCEN} == {s: "ok" for s in SCEN}, summary["scenarios"]
    assert summary["inputs"]["requests"] == sum(-(-n // REPLAY_EVERY) for n in calm.groupby("user_id").size())
    assert summary["inputs"]["feedback"] == len(calm) and not summary["inputs"]["skipped_log_lines"]
    for s in SCEN:
        checks = {c["name"]: c for c in by[s]["checks"]}
        # every check judged this window on the shipped thresholds, and no feature crossed its own
        assert {checks[n]["status"] for n in ("behaviour", "user_embedding", "served_score", "online_hit_rate", "serving_mix")} == {"ok"}, by[s]
        assert not [f["name"] for f in checks["behaviour"]["features"] if f["drifted"]], by[s]

    summary = check(moved_span, "moved")
    verdicts = {s["scenario"]: s["verdict"] for s in summary["scenarios"]}
    assert verdicts == {"homefeed": "ok", "search": "drift", "ads": "ok"}, summary["scenarios"]
    search = next(s for s in summary["scenarios"] if s["scenario"] == "search")
    assert {"action", "pop_bucket"} <= set(search["top_drifted"])


def test_model_outputs_are_compared_at_like_history_lengths():
    """Short and long histories give different embeddings with no drift at all: a window of long
    histories only is judged against the reference's long histories (and drifts without lengths)."""
    from redrec.drift import checks as C

    th = Thresholds.from_yaml(DEFAULT_THRESHOLDS).for_scenario("homefeed")
    rng = np.random.default_rng(0)
    dim = 8

    def unit(centre, n):
        v = rng.normal(centre, 1.0, size=(n, dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    short, long = np.r_[2.0, np.zeros(dim - 1)], np.r_[np.zeros(dim - 1), 2.0]
    ref = pd.DataFrame(np.vstack([unit(short, 1000), unit(long, 1000)]), columns=[f"e{d}" for d in range(dim)])
    ref.insert(0, "history_len", [3] * 1000 + [150] * 1000)
    cur = pd.DataFrame({"user_embedding": list(unit(long, 600)), "history_len": 150, "cold_start": False})
    matched, _, _ = C.embedding_check(ref, cur, dim, th, 0)
    assert matched.status == "ok" and matched.score < 0.6 and "1000 of 2000 rows" in matched.message, matched
    unmatched, _, _ = C.embedding_check(ref, cur.drop(columns="history_len"), dim, th, 0)
    assert unmatched.status == "drift" and unmatched.score > 0.7, unmatched
    # a real move at like lengths still drifts
    moved = cur.assign(user_embedding=list(unit(-long, 600)))
    assert C.embedding_check(ref, moved, dim, th, 0)[0].status == "drift"
