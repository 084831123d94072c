"""The one canonical schema every adapter produces and every component consumes.

events: user_id (str), item_id (str), scenario (str), action (str), ts (int64, unix seconds)
items:  item_id (str), title (str), body (str), tags (list[str]), scenarios (list[str]: where the
        item may be shown), image (optional list[float] of one fixed length, or None)

Validation never drops a row silently: in ``strict`` mode the first problems are raised with file,
row and field; in ``drop`` mode bad rows are removed and counted per reason in a ``LoadReport``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

EVENT_COLUMNS = ("user_id", "item_id", "scenario", "action", "ts")
ITEM_COLUMNS = ("item_id", "title", "body", "tags", "scenarios", "image")
OnError = Literal["strict", "drop"]


@dataclass(frozen=True)
class RowProblem:
    source: str
    row: int  # 0-based data row in the source (header excluded)
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: row {self.row}, field '{self.field}': {self.message}"


class SchemaError(ValueError):
    """Raised when input does not match the canonical schema; lists what is wrong and where."""

    def __init__(self, problems: list[RowProblem], total: int | None = None):
        self.problems = problems
        total = len(problems) if total is None else total
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {total - 20} more" if total > 20 else ""
        super().__init__(f"{total} schema problem(s):\n  {shown}{more}")


@dataclass
class LoadReport:
    source: str
    rows_in: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source}: {self.rows_in} rows read, {self.rows_kept} kept, dropped ({reasons})"


def _problems_for(mask: pd.Series, source: str, fld: str, msg: str, index: pd.Index) -> list[RowProblem]:
    bad = index[mask.to_numpy()]
    return [RowProblem(source, int(i), fld, msg) for i in bad]


def validate_events(
    df: pd.DataFrame,
    source: str,
    *,
    on_error: OnError = "strict",
    known_items: set[str] | None = None,
) -> tuple[pd.DataFrame, LoadReport]:
    """Check and normalise an events frame. Row numbers refer to ``df``'s positional order."""
    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(
            [RowProblem(source, -1, c, "column missing; events need " + ", ".join(EVENT_COLUMNS)) for c in missing]
        )
    df = df.reset_index(drop=True)
    report = LoadReport(source, rows_in=len(df))
    problems: list[RowProblem] = []
    bad = pd.Series(False, index=df.index)

    def flag(mask: pd.Series, fld: str, msg: str, reason: str) -> None:
        nonlocal bad
        mask = mask & ~bad  # count each row once, under its first problem
        if mask.any():
            problems.extend(_problems_for(mask, source, fld, msg, df.index))
            report.dropped[reason] += int(mask.sum())
            bad = bad | mask

    for col in ("user_id", "item_id", "scenario", "action"):
        s = df[col]
        empty = s.isna() | (s.astype(str).str.strip() == "")
        flag(empty, col, "empty; every event needs a non-empty " + col, f"empty {col}")
    ts = pd.to_numeric(df["ts"], errors="coerce")
    flag(ts.isna(), "ts", "not an integer unix timestamp (seconds)", "bad ts")
    flag(ts.fillna(0) < 0, "ts", "negative timestamp", "bad ts")
    if known_items is not None:
        unknown = ~df["item_id"].astype(str).isin(known_items)
        flag(unknown, "item_id", "item not in the catalogue; add it to items or drop the event", "unknown item")

    if problems and on_error == "strict":
        raise SchemaError(problems[:200], total=len(problems))
    out = df.loc[~bad, list(EVENT_COLUMNS)].copy()
    for col in ("user_id", "item_id", "scenario", "action"):
        out[col] = out[col].astype(str)
    out["ts"] = ts[~bad].astype("int64")
    out = out.reset_index(drop=True)
    report.rows_kept = len(out)
    return out, report


def _as_str_list(v) -> list[str] | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, str):
        return [t for t in (x.strip() for x in v.replace("|", ",").split(",")) if t]
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in v]
    return None


def validate_items(
    df: pd.DataFrame,
    source: str,
    *,
    scenarios: list[str] | None = None,
    on_error: OnError = "strict",
) -> tuple[pd.DataFrame, LoadReport]:
    """Check and normalise an item catalogue; ``scenarios`` lists the valid eligibility values."""
    required = ("item_id", "title", "scenarios")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SchemaError([RowProblem(source, -1, c, "column missing; items need item_id, title, scenarios") for c in missing])
    df = df.reset_index(drop=True).copy()
    for opt in ("body", "tags", "image"):
        if opt not in df.columns:
            df[opt] = None
    report = LoadReport(source, rows_in=len(df))
    problems: list[RowProblem] = []
    bad = np.zeros(len(df), dtype=bool)

    def add(i: int, fld: str, msg: str, reason: str) -> None:
        if not bad[i]:
            problems.append(RowProblem(source, i, fld, msg))
            report.dropped[reason] += 1
            bad[i] = True

    ids = df["item_id"].astype(str)
    for i in np.flatnonzero(df["item_id"].isna().to_numpy() | (ids.str.strip() == "").to_numpy()):
        add(int(i), "item_id", "empty item id", "empty item_id")
    for i in np.flatnonzero(ids.duplicated(keep="first").to_numpy()):
        add(int(i), "item_id", f"duplicate item id '{ids[i]}'; item ids must be unique", "duplicate item_id")

    tags_out, scen_out, image_out = [], [], []
    image_dim = None
    valid_scen = set(scenarios) if scenarios else None
    for i, (title, tags, scen, image) in enumerate(zip(df["title"], df["tags"], df["scenarios"], df["image"])):
        if title is None or (isinstance(title, float) and math.isnan(title)) or str(title).strip() == "":
            add(i, "title", "empty title; the item tower needs text", "empty title")
        t = _as_str_list(tags)
        if t is None:
            add(i, "tags", "tags must be a list of strings or a comma-separated string", "bad tags")
        s = _as_str_list(scen)
        if not s:
            add(i, "scenarios", "no scenario eligibility; list the scenarios the item may be shown in", "no scenarios")
        elif valid_scen is not None and not set(s) <= valid_scen:
            add(i, "scenarios", f"unknown scenario(s) {sorted(set(s) - valid_scen)}; known: {sorted(valid_scen)}", "unknown scenario")
        img = None
        if image is not None and not (isinstance(image, float) and math.isnan(image)):
            img = np.asarray(image, dtype=np.float32).ravel()
            if image_dim is None:
                image_dim = img.shape[0]
            if img.shape[0] != image_dim:
                add(i, "image", f"image vector has {img.shape[0]} values, others have {image_dim}", "bad image")
            elif not np.isfinite(img).all():
                add(i, "image", "image vector holds NaN or inf", "bad image")
        tags_out.append(t or [])
        scen_out.append(s or [])
        image_out.append(None if img is None else img.tolist())

    if problems and on_error == "strict":
        raise SchemaError(problems[:200], total=len(problems))
    out = pd.DataFrame(
        {
            "item_id": ids,
            "title": df["title"].astype(str),
            "body": df["body"].fillna("").astype(str),
            "tags": tags_out,
            "scenarios": scen_out,
            "image": image_out,
        }
    )[~bad].reset_index(drop=True)
    report.rows_kept = len(out)
    return out, report
