"""The drift monitor reads the serving log with the platform's one reader
(``redrec.experiments.log.read_log``), for a time window."""

from __future__ import annotations

from pathlib import Path

from redrec.experiments.log import FEEDBACK_FIELDS, REQUEST_FIELDS, LogRead, read_log

__all__ = ["FEEDBACK_FIELDS", "REQUEST_FIELDS", "LogRead", "read_serving_log"]


def read_serving_log(log_dir: str | Path | None, start: float, end: float) -> LogRead:
    """Requests and feedback with ``start <= ts < end`` from every file under ``log_dir``."""
    return read_log(log_dir, start, end)
