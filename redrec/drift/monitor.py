"""One drift check: load the reference and the current window, judge each scenario, maybe start
retraining, write the run. ``redrec drift check`` and the chart's CronJob both call ``run_check``.

Exit codes (the CronJob's Job status follows them):
  0  every scenario judged (ok, drift or insufficient data); retraining started or not needed
  2  the run could not judge at all (no reference, broken input files); an error run is written
  3  at least one scenario could not be judged (absent from the reference, unusable features)
  4  drift was found but the retraining pipeline could not be started (or, local, it failed)
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from redrec.drift import checks as C
from redrec.drift.config import DriftConfig
from redrec.drift.features import behaviour_features
from redrec.drift.reference import Reference, ReferenceError, load_reference
from redrec.drift.report import SUMMARY_FORMAT, write_run
from redrec.drift.trigger import maybe_trigger
from redrec.drift.window import read_window
from redrec.experiments.log import RECEIVED
from redrec.schema import EVENT_COLUMNS, SchemaError, validate_events

log = logging.getLogger("redrec.drift")


class InputError(ValueError):
    """An input file cannot be used; the message names the file, the field and the fix."""


def _read_events(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"events file {path} does not exist")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix in (".csv", ".tsv"):
        df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    else:
        raise InputError(f"events file {path}: use .parquet or .csv (canonical columns {', '.join(EVENT_COLUMNS)})")
    try:
        # strict: a broken export should stop the check, not quietly shrink the window
        return validate_events(df, str(path))[0]
    except SchemaError as e:
        raise InputError(str(e)) from None


def current_events(cfg: DriftConfig, feedback: pd.DataFrame, start: float, end: float, margin_start: float,
                   context: pd.DataFrame | None = None) -> pd.DataFrame:
    """The window's behaviour events (``in_window``) with the events before them that sequence
    lengths count: feedback that arrived in the margin, extra events files' margin rows and the
    reference's tail (a young serving log does not hold the history a user brings)."""
    parts = []
    if len(feedback):
        fb = feedback[list(EVENT_COLUMNS)].copy()
        fb["ts"] = fb["ts"].astype("int64")
        fb["in_window"] = (feedback["in_window"] if "in_window" in feedback else feedback[RECEIVED] >= start).to_numpy()
        parts.append(fb)
    for p in cfg.events:
        ev = _read_events(Path(p))
        ev = ev[(ev["ts"] >= margin_start) & (ev["ts"] < end)].copy()
        ev["in_window"] = ev["ts"] >= start
        parts.append(ev)
    if context is not None and len(context) and parts:
        # only the window's users: the tail holds every user's last day (ML-1M: most of the log)
        users = set(pd.concat([p.loc[p["in_window"], "user_id"] for p in parts]).astype(str))
        context = context[context["user_id"].astype(str).isin(users)]
        parts.append(context[list(EVENT_COLUMNS)].assign(in_window=False))
    if not parts:
        cols = {c: pd.Series(dtype="int64" if c == "ts" else object) for c in EVENT_COLUMNS}
        return pd.DataFrame({**cols, "in_window": pd.Series(dtype=bool)})
    ev = pd.concat(parts, ignore_index=True)
    for c in ("user_id", "item_id", "scenario", "action"):
        ev[c] = ev[c].astype(str)
    ev["ts"] = ev["ts"].astype("int64")
    # an event both in the window and in the context counts once, in the window
    ev = ev.sort_values("in_window", ascending=False, kind="stable").drop_duplicates(list(EVENT_COLUMNS))
    return ev.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


def judge_scenario(s: str, ref: Reference, cur_feats: pd.DataFrame, requests: pd.DataFrame, feedback: pd.DataFrame, cfg: DriftConfig) -> C.ScenarioResult:
    th = cfg.thresholds.for_scenario(s)
    if s not in ref.info["scenarios"]:
        msg = (f"scenario '{s}' is absent from the reference (it has {ref.info['scenarios']}): re-record the reference "
               f"from a training window that includes '{s}', or remove it from config 'scenarios'")
        return C.ScenarioResult(s, "error", [C.CheckResult("reference", "error", message=msg)], [msg])
    req = requests[requests["scenario"] == s] if len(requests) else requests
    fb = feedback[feedback["scenario"] == s] if len(feedback) else feedback
    results, problems, snaps = [], [], []
    for fn in (
        lambda: C.behaviour_check(ref.features[ref.features["scenario"] == s], cur_feats[cur_feats["scenario"] == s], th, cfg.seed),
        lambda: C.embedding_check(None if ref.embeddings is None else ref.embeddings[ref.embeddings["scenario"] == s], req, ref.dim, th, cfg.seed),
        lambda: C.prediction_check(None if ref.scores is None else ref.scores[ref.scores["scenario"] == s], req, th, cfg.seed),
    ):
        res, probs, snap = fn()
        results.append(res)
        problems += probs
        if snap is not None:
            snaps.append(snap)
    results.append(C.hit_rate_check(req, fb, ref, s, th))
    results.append(C.serving_mix_check(req, th))
    return C.ScenarioResult(s, C.verdict(results)[0], results, problems, snaps)


def _run_id(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run_check(cfg: DriftConfig) -> tuple[dict, Path]:
    t0 = time.time()
    now = cfg.now if cfg.now is not None else t0
    start = now - cfg.window_hours * 3600
    summary: dict = {
        "format": SUMMARY_FORMAT, "run_id": _run_id(now), "check_uuid": uuid.uuid4().hex[:8], "started": t0, "now": now,
        "window": {"start": start, "end": now}, "reference": {"path": str(cfg.reference_dir)},
        "scenarios": [], "drifted": [], "trigger": None, "problems": [], "inputs": {},
    }
    results: list[C.ScenarioResult] = []
    try:
        ref = load_reference(cfg.reference_dir)
        summary["reference"].update({k: ref.info.get(k) for k in ("window", "created", "n_events", "events_per_scenario", "model")})
        lookback = float(ref.info.get("seq_lookback_hours", 24.0))
        # read a lookback margin before the window so sequence lengths at its start are complete
        margin_start = start - lookback * 3600
        ths = [cfg.thresholds.for_scenario(s) for s in cfg.scenarios]
        keep_top = max(max(t.hit_rate.k, t.prediction.top_k) for t in ths)
        win = read_window(cfg.serving_log_dir, cfg.scenarios, start, now, margin_start, cfg.sampling, cfg.seed, keep_top)
        summary["problems"] += win.problems()
        events = current_events(cfg, win.events, start, now, margin_start, ref.tail)
        feats = behaviour_features(events, ref.items, lookback, first_seen_here=win.first_seen)
        # the window's events of the sampled users (all of them below the cap)
        in_sample = events["in_window"].to_numpy() & win.sampled_users(events["user_id"], events["scenario"])
        feats = feats[in_sample].reset_index(drop=True)
        requests, feedback = win.requests, win.feedback
        summary["inputs"] = {
            "serving_log_dir": str(cfg.serving_log_dir) if cfg.serving_log_dir else None, "serving_log_files": win.stats.files,
            "requests": win.n_requests, "feedback": win.n_feedback, "events_files": [str(p) for p in cfg.events],
            "current_events": int(len(feats)), "skipped_log_lines": dict(win.stats.skipped),
            "lines_outside_window": win.stats.outside_span, "files_older_than_window": win.stats.old_files,
        }
        used = feats["scenario"].value_counts()
        for s, v in win.sampling["scenarios"].items():
            v["events_used"] = int(used.get(s, 0))
        summary["sampling"] = win.sampling
        if win.sampling["sampled"]:
            log.info("serving log sampled above the caps: %s", {s: (v["events_used"], v["events_seen"], v["requests_used"], v["requests_seen"])
                                                               for s, v in win.sampling["scenarios"].items()})
        if len(feats) == 0 and win.n_requests == 0:
            summary["problems"].append(
                f"the current window {_run_id(start)}..{_run_id(now)} holds no events and no requests: check that the serving "
                f"log dir ({cfg.serving_log_dir}) is mounted and written, or pass --events")
        for s in cfg.scenarios:
            r = judge_scenario(s, ref, feats, requests, feedback, cfg)
            log.info("scenario %s: %s %s", s, r.verdict, [f.name for f in r.drifted_features()])
            results.append(r)
        own = [r.scenario for r in results if r.own_drift]
        for r in results:  # attribution needs every scenario's own verdict first
            r.verdict, r.notes = C.verdict(r.checks, [x for x in own if x != r.scenario])
    except (ReferenceError, InputError) as e:
        summary["problems"].insert(0, str(e))
        summary.update(status="error", exit_code=2, finished=time.time())
        return summary, write_run(cfg.report_dir, summary, [])
    summary["scenarios"] = [r.as_dict() for r in results]
    summary["drifted"] = [r.scenario for r in results if r.verdict == "drift"]
    trig = maybe_trigger(cfg, summary["drifted"], summary["run_id"], now)
    summary["trigger"] = trig.as_dict()
    verdicts = {r.verdict for r in results}
    summary["status"] = "drift" if summary["drifted"] else "error" if "error" in verdicts else "ok" if "ok" in verdicts else "insufficient_data"
    summary["exit_code"] = 4 if trig.error else 3 if "error" in verdicts else 0
    summary["finished"] = time.time()
    summary["duration_s"] = summary["finished"] - t0
    return summary, write_run(cfg.report_dir, summary, results)

