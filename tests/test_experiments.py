"""A/B: hash assignment, the crash-safe serving log, and the report's statistics and outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from redrec.experiments.assignment import HOLDOUT, ExperimentSpec, assign
from redrec.experiments.log import AppendLog, read_feedback, read_serving_log
from redrec.experiments.report import analyse, write_report

ROOT = Path(__file__).resolve().parents[1]


def spec(holdout=0.1, shares=(0.5, 0.3, 0.2), name="exp"):
    return ExperimentSpec(name=name, holdout_share=holdout, arms=[
        {"name": f"a{i}", "model_version": f"v{i}", "share": s} for i, s in enumerate(shares)])


def test_assignment_matches_shares_over_10k_users():
    sp = spec()
    users = [f"user-{i}" for i in range(10_000)]
    arms = [assign(sp, u) for u in users]
    for g, share in sp.expected_shares().items():
        got = arms.count(g) / len(users)
        assert abs(got - share) < 0.015, (g, got, share)  # ~4 standard errors at n=10k
    assert [assign(sp, u) for u in users] == arms  # deterministic


def test_assignment_is_stable_across_processes_and_independent_of_holdout():
    sp = spec()
    code = ("import json,sys; from redrec.experiments.assignment import ExperimentSpec, assign; "
            "sp = ExperimentSpec.model_validate_json(sys.argv[1]); print(json.dumps([assign(sp, f'u{i}') for i in range(500)]))")
    out = subprocess.run([sys.executable, "-c", code, sp.model_dump_json()], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert json.loads(out.stdout) == [assign(sp, f"u{i}") for i in range(500)]
    # changing the holdout moves users in/out of the holdout only, never between arms
    a, b = spec(holdout=0.0), spec(holdout=0.2)
    for i in range(2000):
        x, y = assign(a, f"u{i}"), assign(b, f"u{i}")
        assert y == HOLDOUT or x == y
    # another experiment name reshuffles
    assert [assign(spec(name="other"), f"u{i}") for i in range(200)] != [assign(sp, f"u{i}") for i in range(200)]


@pytest.mark.parametrize("raw,msg", [
    ({"arms": [{"name": "a", "model_version": "v1", "share": 0.6}, {"name": "b", "model_version": "v2", "share": 0.6}]}, "sum to 1"),
    ({"arms": [{"name": "a", "model_version": "v1", "share": 0.5}, {"name": "a", "model_version": "v2", "share": 0.5}]}, "duplicate"),
    ({"arms": []}, "arms"),
    ({"holdout_share": 0.7, "arms": [{"name": "a", "model_version": "v1", "share": 1}]}, "holdout_share"),
    ({"arms": [{"name": "holdout", "model_version": "v1", "share": 1}]}, "reserved"),
    ({"arms": [{"name": "a", "model_version": "v1", "share": 0}]}, "share"),
])
def test_bad_experiment_configs_are_refused(raw, msg):
    with pytest.raises(ValidationError, match=msg):
        ExperimentSpec.model_validate(raw)


def test_unknown_model_versions_are_refused():
    with pytest.raises(ValueError, match=r"model_version.*'v1'"):
        spec(holdout=0, shares=(0.5, 0.5)).check_versions({"v0"})
    spec(holdout=0, shares=(0.5, 0.5)).check_versions({"v0", "v1"})


def test_serving_config_validates_the_chart_schema(tmp_path):
    import yaml

    from redrec.serving.config import ConfigError, ServingConfig

    good = {"scenarios": ["homefeed", "search"], "log_level": "INFO",
            "experiment": {"name": "e", "holdout_share": 0.0, "arms": [{"name": "control", "model_version": "bundled",
                                                                        "index_alias": "redrec_items", "share": 1.0}]},
            "serving": {"max_k": 200, "port": 3000, "feature_server_url": "http://redrec-feast:6566",
                        "serving_log": {"dir": "/var/lib/redrec/serving-log", "per_pod_file": True}},
            "milvus": {"uri": "http://milvus:19530", "collection_alias": "redrec_items"},
            "drift": {"kfp_host": "http://ml-pipeline:8888", "kfp_namespace": "redrec", "pipeline_id": "x"}}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(good))
    cfg = ServingConfig.from_yaml(p)
    assert cfg.serving.feature_server_url == "http://redrec-feast:6566" and cfg.alias_for("control") == "redrec_items"
    bad = {**good, "serving": {**good["serving"], "max_k": 0, "feature_server_url": "redrec-feast:6566"}}
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        ServingConfig.from_yaml(p)
    assert "serving.max_k" in str(e.value) and "serving.feature_server_url" in str(e.value)


WRITER = """
import sys
from redrec.experiments.log import AppendLog
log = AppendLog(sys.argv[1])
i = 0
while True:
    log.append({"request_id": f"r{i}", "ts": 1.0, "user_id": "u", "scenario": "s", "arm": "a",
                "model_version": "v", "items": ["x"] * 50, "scores": [0.5] * 50, "cold_start": False})
    print(i, flush=True)  # the acknowledgement: only after append() returned
    i += 1
"""


def test_serving_log_keeps_every_acknowledged_line_through_sigkill(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(d / "serving-x.jsonl")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    acked = -1
    for line in p.stdout:
        acked = int(line)
        if acked >= 300:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rows = read_serving_log(d)
    ids = rows["request_id"].tolist()
    assert len(ids) >= acked + 1 and ids[: acked + 1] == [f"r{i}" for i in range(acked + 1)]
    assert rows.attrs["torn_lines"] == 0


def test_reader_skips_a_torn_last_line(tmp_path):
    log = AppendLog(tmp_path / "serving-a.jsonl")
    log.append({"request_id": "r1", "ts": 1.0, "user_id": "u", "scenario": "s", "arm": "a", "model_version": "v",
                "items": [], "scores": [], "cold_start": True})
    log.close()
    with open(tmp_path / "serving-a.jsonl", "a") as f:
        f.write('{"request_id": "r2", "ts"')
    rows = read_serving_log(tmp_path)
    assert rows["request_id"].tolist() == ["r1"] and rows.attrs["torn_lines"] == 1


T0 = 1.7e9  # the simulated experiment's first response


def simulate(d: Path, sp: ExperimentSpec, ctr: dict[str, float], n_users=6000, seed=0, reqs=3, days=1,
             pre_rate=0.0, latency: dict[str, float] | None = None, fallback: dict[str, float] | None = None):
    """Users assigned by the real hash; each response is clicked with the arm's probability.

    ``pre_rate`` > 0: users differ in propensity (a gamma factor with mean 1 scales their click
    probability), and each has Poisson(pre_rate x factor) positive feedback events (no request_id:
    unprompted behaviour) in the 14 days before the experiment, so the pre-period predicts the
    in-experiment clicks (the CUPED covariate); a few more events fall before that window and
    after the experiment started without a click's request (both outside the covariate).
    ``latency`` / ``fallback``: per arm, the mean ``latency_ms`` (exponential) and the share of
    ``fallback`` responses written on each response line (the guardrails)."""
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng(seed + 10_000)  # the pre-period and guardrail fields: the clicks draw as before
    resp, fb = AppendLog(d / "serving-sim.jsonl"), AppendLog(d / "feedback-sim.jsonl")
    rows, fbs = [], []
    for u in range(n_users):
        user = f"u{u}"
        arm = assign(sp, user)
        factor = extra.gamma(1.0) if pre_rate > 0 else 1.0
        if pre_rate > 0:
            for _ in range(extra.poisson(pre_rate * factor)):
                t = T0 - extra.uniform(60, 14 * 86400 - 60)
                fbs.append({"user_id": user, "item_id": f"i{extra.integers(100)}", "scenario": "homefeed", "action": "like",
                            "ts": t, "received_ts": t})
            t = T0 - extra.uniform(15, 40) * 86400  # before the window
            fbs.append({"user_id": user, "item_id": "i1", "scenario": "homefeed", "action": "like", "ts": t, "received_ts": t})
        for r in range(reqs):
            scen = ("homefeed", "search")[r % 2]
            rid = f"{user}-{r}"
            items = [f"i{rng.integers(100)}" for _ in range(5)]
            ts = T0 + (u % days) * 86400.0  # users arrive over ``days`` UTC days
            row = {"request_id": rid, "ts": ts, "user_id": user, "scenario": scen, "arm": arm,
                   "model_version": arm, "items": items, "scores": [1.0] * 5, "cold_start": False}
            if latency:
                row["latency_ms"] = round(float(extra.exponential(latency[arm])), 3)
            if fallback:
                row["fallback"] = bool(extra.random() < fallback[arm])
            rows.append(row)
            if rng.random() < min(1.0, ctr[arm] * factor):
                fbs.append({"request_id": rid, "user_id": user, "item_id": items[0], "scenario": scen, "action": "click", "ts": ts + 1})
            elif rng.random() < 0.05:  # a skip is not a click; an event on another item is not a hit
                fbs.append({"request_id": rid, "user_id": user, "item_id": items[1], "scenario": scen, "action": "skip", "ts": ts + 1})
    resp.append_many(rows)
    fb.append_many(fbs)


def test_report_finds_a_real_lift_with_a_covering_ci(tmp_path):
    sp = ExperimentSpec(name="e", holdout_share=0.1, arms=[{"name": "control", "model_version": "v1", "share": 0.5},
                                                            {"name": "treat", "model_version": "v2", "share": 0.5}])
    simulate(tmp_path, sp, {"control": 0.10, "treat": 0.13, HOLDOUT: 0.08})
    rep = analyse(tmp_path, sp)
    lift = next(l for l in rep.lifts["overall"] if l.metric == "ctr" and l.arm == "treat")
    assert lift.significant and lift.ci_low < 0.3 < lift.ci_high and lift.p_value < 0.01
    assert abs(rep.overall["control"].ctr - 0.10) < 0.01 and abs(rep.overall["treat"].ctr - 0.13) < 0.012
    assert set(rep.per_scenario) == {"homefeed", "search"}
    assert not rep.srm["mismatch"]
    paths = write_report(rep, tmp_path / "out")
    assert "<svg" in paths["html"].read_text() and json.loads(paths["json"].read_text())["control"] == "control"


def test_report_sees_no_lift_in_an_aa_test_and_flags_srm(tmp_path):
    sp = ExperimentSpec(name="aa", arms=[{"name": "a", "model_version": "v1", "share": 0.5},
                                          {"name": "b", "model_version": "v1", "share": 0.5}])
    simulate(tmp_path, sp, {"a": 0.1, "b": 0.1}, seed=1)
    rep = analyse(tmp_path, sp)
    lift = next(l for l in rep.lifts["overall"] if l.metric == "ctr")
    assert not lift.significant and lift.ci_low < 0 < lift.ci_high
    assert not rep.srm["mismatch"]
    # analysed against a 70/30 design, the 50/50 traffic is a sample ratio mismatch
    skewed = ExperimentSpec(name="aa", arms=[{"name": "a", "model_version": "v1", "share": 0.7},
                                              {"name": "b", "model_version": "v1", "share": 0.3}])
    assert analyse(tmp_path, skewed).srm["mismatch"]


def test_ab_report_cli(tmp_path):
    import yaml

    sp = ExperimentSpec(name="e", arms=[{"name": "control", "model_version": "v1", "share": 0.5},
                                         {"name": "treat", "model_version": "v2", "share": 0.5}])
    simulate(tmp_path / "log", sp, {"control": 0.1, "treat": 0.12}, n_users=800)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"scenarios": ["homefeed", "search"], "experiment": json.loads(sp.model_dump_json()),
                                   "milvus": {"uri": "http://127.0.0.1:1"}}))
    out = subprocess.run([sys.executable, "-m", "redrec.cli", "ab", "report", "--log-dir", str(tmp_path / "log"),
                          "--config", str(cfg), "--out", str(tmp_path / "rep")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "treat" in out.stdout and (tmp_path / "rep" / "ab_report.html").is_file() and (tmp_path / "rep" / "ab_lift.svg").is_file()
    bad = subprocess.run([sys.executable, "-m", "redrec.cli", "ab", "report", "--log-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "does not exist" in bad.stdout
    assert len(read_feedback(tmp_path / "log")) > 0


def test_log_rotates_by_size_and_age_and_prunes_only_expired_files(tmp_path):
    import os
    import time

    rec = {"request_id": "r", "ts": 1.0, "user_id": "u", "scenario": "s", "arm": "a", "model_version": "v",
           "items": ["i1"], "scores": [0.5], "cold_start": False}
    line = len(json.dumps(rec, separators=(",", ":"))) + 1
    stale = tmp_path / "serving-gone-1.jsonl"
    stale.write_text(json.dumps(rec) + "\n")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    log = AppendLog(tmp_path / "serving-p-1.jsonl", rotate_bytes=3 * (line + 1), retention_s=3600)
    for i in range(7):
        log.append({**rec, "request_id": f"r{i}"})
    files = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    # 3 lines per file, a new one at the 4th and 7th line; the other pod's 2-hour-old file pruned
    assert files == ["serving-p-1.1.jsonl", "serving-p-1.2.jsonl", "serving-p-1.jsonl"], files
    assert [len((tmp_path / f).read_text().splitlines()) for f in files] == [3, 1, 3]
    assert sorted(read_serving_log(tmp_path)["request_id"]) == [f"r{i}" for i in range(7)]  # nothing lost
    log.close()
    aged = AppendLog(tmp_path / "serving-q-1.jsonl", rotate_s=0.05)
    aged.append(rec)
    time.sleep(0.1)
    aged.append(rec)
    assert (tmp_path / "serving-q-1.1.jsonl").exists()
    aged.close()


def test_lift_p_value_and_interval_never_disagree():
    """Significant exactly when the interval excludes no lift, for both metrics, over many
    random arm pairs (small, large, equal and different rates)."""
    from redrec.experiments.report import ArmStats, _lift

    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for _ in range(400):
        arms = []
        for name in ("treatment", "control"):
            users = int(rng.integers(50, 5000))
            hits = int(rng.binomial(users, rng.uniform(0.02, 0.4)))
            resp = users * 3
            clicks = int(rng.binomial(resp, rng.uniform(0.02, 0.3)))
            arms.append(ArmStats(name, users, resp, clicks, hits, clicks / resp, math.sqrt(clicks / resp * (1 - clicks / resp) / users),
                                 hits / users, math.sqrt(hits / users * (1 - hits / users) / users)))
        for metric in ("hit_rate", "ctr"):
            lf = _lift(metric, arms[0], arms[1], 0.95)
            excludes = lf.ci_low > 0 or lf.ci_high < 0
            assert lf.significant == excludes, lf
            assert lf.ci_low <= lf.value <= lf.ci_high, lf
            seen[lf.significant] += 1
    assert seen[True] > 50 and seen[False] > 50  # both outcomes were exercised


def test_ab_reader_skips_and_counts_bad_lines_instead_of_stopping(tmp_path):
    """The A/B analysis and the drift monitor read the log with the same reader: a line without
    a field, or with mismatched items/scores, is skipped and counted, the rest is analysed."""
    from redrec.experiments.log import read_log

    good = {"request_id": "r1", "ts": 1.0, "user_id": "u", "scenario": "s", "arm": "a", "model_version": "v",
            "items": ["i1"], "scores": [0.5], "cold_start": False}
    lines = [good, {**good, "request_id": "r2", "arm": None}, {**good, "request_id": "r3", "scores": []},
             {**good, "request_id": "r4"}]
    (tmp_path / "serving-p-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = read_serving_log(tmp_path)
    assert rows["request_id"].tolist() == ["r1", "r4"] and rows.attrs["skipped_lines"] == 2
    d = read_log(tmp_path, 0, 10)
    # the drift monitor does not need the arm: only the items/scores line is unusable to it
    assert d.requests["request_id"].tolist() == ["r1", "r2", "r4"] and d.n_skipped == 1
