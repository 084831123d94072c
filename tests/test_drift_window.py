"""The drift check's streaming read of the serving log (redrec.drift.window): what it keeps is
bounded by the sampling caps however many lines the window holds, below the caps it is what the
full reader returns, and a sampled run says so in its report. Cheap: small synthetic logs written
by the serving log's own writer (AppendLog), a reference recorded without a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from redrec.drift.config import SamplingConfig, Thresholds, load_drift_config
from redrec.drift.monitor import run_check
from redrec.drift.reference import record_reference
from redrec.drift.window import read_window
from redrec.experiments.log import AppendLog, read_log

SCEN = ["homefeed", "search", "ads"]
NOW = 1_700_000_000.0
DAY = 86400.0
DIM = 8


def write_log(log_dir: Path, n_users: int, seed: int = 0, span_s: float = 2 * DAY, rotate_bytes: int = 200_000,
              events_per_user: int = 6) -> dict:
    """Response and feedback lines as the server writes them (AppendLog, rotated files), spread
    over ``span_s`` before NOW: each user sees a few responses and reacts to some of them."""
    rng = np.random.default_rng(seed)
    resp = AppendLog(log_dir / "serving-pod-a-1.jsonl", rotate_bytes=rotate_bytes)
    fb = AppendLog(log_dir / "feedback-pod-a-1.jsonl", rotate_bytes=rotate_bytes)
    n = {"requests": 0, "feedback": 0}
    lines = []
    for u in range(n_users):
        for e in range(events_per_user):
            ts = NOW - rng.random() * span_s
            s = SCEN[(u + e) % 3] if e % 4 else SCEN[u % 3]
            items = [f"i{x}" for x in rng.integers(0, 300, size=10)]
            rid = f"r{seed}-{u}-{e}"
            lines.append((ts, "r", {"request_id": rid, "experiment": "default", "user_id": f"u{u}", "scenario": s,
                                    "arm": "control", "model_version": "v1", "index_version": "x1", "items": items,
                                    "scores": [round(float(x), 6) for x in np.sort(rng.random(10))[::-1]],
                                    "cold_start": False, "fallback": False, "ts": ts, "latency_ms": 3.2,
                                    "history_len": int(rng.integers(1, 40)),
                                    "user_embedding": [round(float(x), 5) for x in rng.normal(size=DIM)]}))
            # every response gets a reaction; an unprompted event besides
            lines.append((ts + 2, "f", {"user_id": f"u{u}", "item_id": items[int(rng.integers(0, 10))], "scenario": s,
                                        "action": "click" if rng.random() < 0.7 else "skip", "ts": int(ts + 1),
                                        "request_id": rid, "received_ts": ts + 2}))
            lines.append((ts + 3, "f", {"user_id": f"u{u}", "item_id": f"i{int(rng.integers(0, 330))}", "scenario": s,
                                        "action": "click", "ts": int(ts + 3), "request_id": None, "received_ts": ts + 3}))
    for _, kind, rec in sorted(lines, key=lambda x: x[0]):
        (resp if kind == "r" else fb).append(rec)
        n["requests" if kind == "r" else "feedback"] += 1
    resp.close()
    fb.close()
    return n


CAPS = SamplingConfig(max_events_per_scenario=400, max_requests_per_scenario=150, max_history_events=3000,
                      max_answers_per_scenario=200)


def test_memory_kept_is_bounded_by_the_caps_however_many_lines_the_window_holds(tmp_path):
    """The window grows 8x; the rows the reader holds (its peak too) stay under the same caps,
    while it still sees, and counts, every line."""
    kept = {}
    for n_users in (250, 2000):
        d = tmp_path / f"log-{n_users}"
        n = write_log(d, n_users)
        w = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY, CAPS, seed=0, keep_top=10)
        sm = w.sampling
        assert w.n_requests + w.n_feedback < n["requests"] + n["feedback"]  # the margin's responses are not read
        assert sum(v["events_seen"] for v in sm["scenarios"].values()) == w.n_feedback
        assert sm["peak_kept_events"] <= CAPS.max_history_events
        assert sm["peak_kept_requests"] <= 3 * CAPS.max_requests_per_scenario
        # feedback files sort before the responses: the answers kept before any response is read
        # are bounded too
        assert sm["peak_kept_answers"] <= 3 * CAPS.max_answers_per_scenario
        assert len(w.events) <= CAPS.max_history_events and len(w.requests) <= 3 * CAPS.max_requests_per_scenario
        for s, v in sm["scenarios"].items():
            assert v["events_kept"] <= CAPS.max_events_per_scenario and v["requests_used"] <= CAPS.max_requests_per_scenario
            assert v["events_seen"] > CAPS.max_events_per_scenario and v["requests_seen"] > CAPS.max_requests_per_scenario
            # sampled, not emptied: a halving leaves about half the cap
            assert v["events_kept"] >= CAPS.max_events_per_scenario / 4 and v["requests_used"] >= CAPS.max_requests_per_scenario / 4
        kept[n_users] = (sm["peak_kept_events"], sm["peak_kept_requests"], sm["scenarios"])
    small, big = kept[250], kept[2000]
    assert sorted(p.name for p in d.glob("*.jsonl"))[0].startswith("feedback-")
    assert sum(v["events_seen"] for v in big[2].values()) > 6 * sum(v["events_seen"] for v in small[2].values())
    assert big[0] <= CAPS.max_history_events and big[1] <= 3 * CAPS.max_requests_per_scenario


def test_below_the_caps_the_window_is_what_the_full_reader_returns(tmp_path):
    d = tmp_path / "log"
    write_log(d, 120)
    start, margin = NOW - DAY, NOW - 2 * DAY
    w = read_window(d, SCEN, start, NOW + 1, margin)
    assert not w.sampling["sampled"]
    full = read_log(d, margin, NOW + 1)
    req = full.requests[full.requests["ts"] >= start].reset_index(drop=True)
    pd.testing.assert_series_equal(w.requests["request_id"], req["request_id"])
    assert w.requests["scores"].tolist() == req["scores"].tolist() and w.requests["items"].tolist() == req["items"].tolist()
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(w.requests["user_embedding"], req["user_embedding"]))
    for c in ("ts", "history_len", "cold_start", "fallback", "arm", "model_version"):
        assert w.requests[c].tolist() == req[c].tolist(), c
    fb = full.feedback
    ev = w.events
    assert len(ev) == len(fb)
    assert ev["user_id"].tolist() == fb["user_id"].tolist() and ev["item_id"].tolist() == fb["item_id"].tolist()
    assert ev["ts"].tolist() == fb["ts"].astype("int64").tolist()
    assert ev["in_window"].tolist() == (fb["received_ts"] >= start).tolist()
    answered = fb[(fb["received_ts"] >= start) & fb["request_id"].notna()]
    assert sorted(w.feedback["request_id"]) == sorted(answered["request_id"])
    assert w.sampled_users(ev["user_id"], ev["scenario"]).all()


def test_the_sample_is_seeded_and_does_not_depend_on_the_line_order(tmp_path):
    d = tmp_path / "log"
    write_log(d, 1500)
    a = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY, CAPS, seed=7, keep_top=10)
    b = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY, CAPS, seed=7, keep_top=10)
    assert a.sampling == b.sampling and a.requests["request_id"].tolist() == b.requests["request_id"].tolist()
    # the same lines in another order (files renamed: read in another sequence) keep the same sample
    for p in d.glob("*.jsonl"):
        lines = p.read_text().splitlines(keepends=True)
        p.write_text("".join(reversed(lines)))
    c = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY, CAPS, seed=7, keep_top=10)
    assert set(c.requests["request_id"]) == set(a.requests["request_id"])
    assert sorted(map(tuple, c.events[["user_id", "ts"]].to_numpy())) == sorted(map(tuple, a.events[["user_id", "ts"]].to_numpy()))
    other = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY, CAPS, seed=8, keep_top=10)
    assert set(other.requests["request_id"]) != set(a.requests["request_id"])


def test_lines_outside_the_window_are_dropped_before_parsing_and_bad_lines_still_counted(tmp_path):
    d = tmp_path / "log"
    write_log(d, 60)
    extra = d / "serving-pod-b-1.jsonl"
    rec = {"request_id": "old", "user_id": "u1", "scenario": "ads", "items": ["i1"], "scores": [0.1], "ts": NOW - 3 * DAY}
    extra.write_text(json.dumps(rec, separators=(",", ":")) + "\n"  # writer format, outside: not parsed
                     + '{"request_id":"x","ts":' + str(NOW - 10) + '}\n'  # inside, missing fields: counted
                     + '{"request_id": "y", "ts": 1}\n'  # another writer's format: parsed, counted
                     + '{"request_id":"z","user_id":"u1","scenario":"ads","items":["i1"],"scores":[0.1],"ts":' + str(NOW - 5))  # torn
    old = d / "serving-pod-c-1.jsonl"
    old.write_text('{"torn')
    os.utime(old, (NOW - 5 * DAY, NOW - 5 * DAY))  # last written before the margin: never opened
    # JSON allows Infinity: a client's ts of Infinity is a bad line, not a crash of the check
    (d / "feedback-pod-b-1.jsonl").write_text('{"user_id":"u1","item_id":"i1","scenario":"ads","action":"click",'
                                               '"ts":Infinity,"request_id":null,"received_ts":' + str(NOW - 5) + '}\n')
    w = read_window(d, SCEN, NOW - DAY, NOW + 1, NOW - 2 * DAY)
    assert w.stats.skipped == {"invalid JSON": 1, "missing field(s) ['user_id', 'scenario', 'items', 'scores']": 2,
                               "field 'ts' is not a finite number": 1}
    assert w.stats.old_files == 1 and w.stats.outside_span >= 1
    assert "old" not in set(w.requests["request_id"])
    assert any("malformed" in p for p in w.problems())


def make_reference(work: Path, out: Path) -> Path:
    """A reference (no model) at ``out`` from the same kind of traffic: other users' feedback, days earlier."""
    write_log(work / "ref-log", 900, seed=5, span_s=DAY)
    fb = read_log(work / "ref-log").feedback
    ev = fb.assign(ts=fb["ts"].astype("int64") - int(3 * DAY))[["user_id", "item_id", "scenario", "action", "ts"]]
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(330)], "title": "t", "body": "b",
                          "tags": [[f"c{i % 7}"] for i in range(330)], "scenarios": [SCEN] * 330, "image": None})
    offline = {s: {"hr@10": 0.1} for s in SCEN}
    return record_reference(ev, items, out, meta={"offline_metrics": offline})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return make_reference(root, root / "reference")


def _check(reference, log_dir, out, caps=None):
    th = Thresholds.model_validate({"defaults": {"behaviour": {"min_current_rows": 50, "min_reference_rows": 50}}})
    over = {"scenarios": SCEN, "reference_dir": reference, "report_dir": out, "serving_log_dir": log_dir, "now": NOW + 1,
            "window_hours": 24, "trigger": False, "thresholds": th}
    if caps is not None:
        over["sampling"] = caps
    return run_check(load_drift_config(None, over))


def test_a_sampled_run_says_so_and_reruns_agree(reference, tmp_path):
    d = tmp_path / "log"
    write_log(d, 1500)
    s1, run1 = _check(reference, d, tmp_path / "r1", CAPS)
    s2, _ = _check(reference, d, tmp_path / "r2", CAPS)
    sm = s1["sampling"]
    assert sm["sampled"] and sm["caps"]["max_events_per_scenario"] == CAPS.max_events_per_scenario
    for s, v in sm["scenarios"].items():
        assert v["events_seen"] > v["events_used"] > 0 and v["events_fraction"] < 1
        assert v["requests_seen"] > v["requests_used"] > 0
        beh = next(c for c in next(x for x in s1["scenarios"] if x["scenario"] == s)["checks"] if c["name"] == "behaviour")
        assert beh["n_current"] == v["events_used"]  # the check ran on the sample
    assert s1["inputs"]["current_events"] == sum(v["events_used"] for v in sm["scenarios"].values())
    assert s1["inputs"]["feedback"] == sum(v["events_seen"] for v in sm["scenarios"].values())
    assert sm == s2["sampling"]
    assert [x["checks"] for x in s1["scenarios"]] == [x["checks"] for x in s2["scenarios"]]
    page = (run1 / "index.html").read_text()
    assert "sampled" in page and f"{sm['scenarios']['ads']['events_used']:,} of {sm['scenarios']['ads']['events_seen']:,}" in page

    # under the caps: nothing sampled, every event judged
    s3, run3 = _check(reference, d, tmp_path / "r3")
    assert not s3["sampling"]["sampled"]
    assert all(v["events_used"] == v["events_seen"] for v in s3["sampling"]["scenarios"].values())
    assert "sampled" not in (run3 / "index.html").read_text()
