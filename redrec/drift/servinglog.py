"""Read the serving log (request lines ``*.jsonl``, feedback lines ``feedback-*.jsonl``) for a window.

A few malformed lines must not blind the monitor for an hour, so bad lines are skipped and
counted per reason (file and line of the first few kept for the report); the caller decides
whether what is left is enough to judge.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REQUEST_FIELDS = ("request_id", "ts", "user_id", "scenario", "items", "scores")
FEEDBACK_FIELDS = ("request_id", "user_id", "item_id", "scenario", "action", "ts")


@dataclass
class LogRead:
    requests: pd.DataFrame
    feedback: pd.DataFrame
    files: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        if not self.skipped:
            return []
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return [f"serving log: skipped malformed lines ({reasons}); first: " + "; ".join(self.examples[:3])]


def _check(rec, fields: tuple[str, ...]) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    miss = [f for f in fields if rec.get(f) is None]
    if miss:
        return f"missing field(s) {miss}"
    try:
        float(rec["ts"])
    except (TypeError, ValueError):
        return "field 'ts' is not a number"
    if "items" in fields and (not isinstance(rec["items"], list) or not isinstance(rec["scores"], list) or len(rec["items"]) != len(rec["scores"])):
        return "fields 'items' and 'scores' must be lists of equal length"
    return None


def read_serving_log(log_dir: str | Path | None, start: float, end: float) -> LogRead:
    """Requests and feedback with ``start <= ts < end`` from every file under ``log_dir``."""
    req, fb = [], []
    out = LogRead(pd.DataFrame(), pd.DataFrame())
    if log_dir is None or not Path(log_dir).is_dir():
        out.requests, out.feedback = pd.DataFrame(columns=list(REQUEST_FIELDS)), pd.DataFrame(columns=list(FEEDBACK_FIELDS))
        return out
    for path in sorted(Path(log_dir).rglob("*.jsonl")):
        is_fb = path.name.startswith("feedback-")
        fields = FEEDBACK_FIELDS if is_fb else REQUEST_FIELDS
        out.files += 1
        with path.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # a writer killed mid-line leaves a torn last line: skip it, count it
                    out.skipped["invalid JSON"] += 1
                    out.examples.append(f"{path.name}:{n} invalid JSON")
                    continue
                why = _check(rec, fields)
                if why:
                    out.skipped[why] += 1
                    out.examples.append(f"{path.name}:{n} {why}")
                    continue
                if start <= float(rec["ts"]) < end:
                    (fb if is_fb else req).append(rec)
    out.requests = pd.DataFrame(req) if req else pd.DataFrame(columns=list(REQUEST_FIELDS))
    out.feedback = pd.DataFrame(fb) if fb else pd.DataFrame(columns=list(FEEDBACK_FIELDS))
    for df in (out.requests, out.feedback):
        df["ts"] = pd.to_numeric(df["ts"]).astype("float64")
        for c in ("user_id", "scenario", "request_id"):
            df[c] = df[c].astype(str)
    return out
