"""Offline sources for the Feast repo, built from a ``RecData`` with vectorised pandas/numpy/arrow.

Tables (all parquet, one ``event_timestamp`` column, microseconds in UTC: Feast's DuckDB offline
store cannot cast nanosecond timestamps):

- ``events.parquet``: the canonical behaviour log (``user_id, item_id, scenario, action, ts``).
- ``seq_<scenario>.parquet``: one row per (user, second) with events of that scenario. The row
  at a user's second *t* holds the state *after* all of that second's events: the last
  ``seq_len`` item ids, actions and unix timestamps of that user in that scenario up to and
  including *t*, oldest first (same-second events in their stable log order). A point-in-time
  join at time t therefore sees exactly the events with ``ts <= t`` (``training_set`` asks for
  ``< label time``). One row per second, not per event: rows of one second would tie on the
  join's timestamp and a store may pick any of them (DuckDB picked a burst's first state).
  Each user of the table also gets one empty window stamped at the epoch ("no history yet"):
  Feast 0.67's file offline store drops an entity row outright when the entity has feature rows
  but all of them are later than the row's timestamp (its left join is followed by a filter
  that removes the future matches); the epoch row makes such a join find the empty state.
- ``items.parquet``: the catalogue's text fields and eligibility, stamped at the epoch so every
  point-in-time join finds them (the catalogue is treated as static; re-build to change it).
- ``item_popularity.parquet``: one row per (item, distinct event second): the item's cumulative
  number of events up to and including that second, so popularity is point-in-time correct too
  (plus a zero at the epoch per item, for the same reason as above).
- ``scenarios.json``: the scenario list and sequence length the tables were built with; the Feast
  definitions read it so ``feast apply`` declares one view per scenario of the data at hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from redrec.data.dataset import RecData

EPOCH = pd.Timestamp(0, unit="s", tz="UTC")
SEQ_FEATURES = ("item_ids", "actions", "timestamps")
DEFAULT_SEQ_LEN = 50
DEFAULT_SCENARIOS = ("homefeed", "search", "ads")  # the synthetic world; replaced by scenarios.json


def scenario_slug(scenario: str) -> str:
    """A name-safe form of a scenario for Feast object names (``seq_<slug>``)."""
    slug = re.sub(r"[^0-9A-Za-z_]", "_", str(scenario)).strip("_").lower()
    if not slug:
        raise ValueError(f"scenario {scenario!r} has no usable characters for a feature view name")
    return slug


def check_scenarios(scenarios: list[str]) -> list[str]:
    scenarios = [str(s) for s in scenarios]
    if not scenarios:
        raise ValueError("at least one scenario is needed to declare sequence views")
    slugs: dict[str, str] = {}
    for s in scenarios:
        slug = scenario_slug(s)
        if slug in slugs and slugs[slug] != s:
            raise ValueError(f"scenarios {slugs[slug]!r} and {s!r} map to the same view name 'seq_{slug}'")
        slugs[slug] = s
    return scenarios


def seq_table_name(scenario: str) -> str:
    return f"seq_{scenario_slug(scenario)}"


@dataclass(frozen=True)
class SourcePaths:
    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def item_popularity(self) -> Path:
        return self.root / "item_popularity.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "scenarios.json"

    def seq(self, scenario: str) -> Path:
        return self.root / f"{seq_table_name(scenario)}.parquet"


def read_manifest(root: str | Path) -> dict | None:
    p = SourcePaths(Path(root)).manifest
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _ts_column(ts: np.ndarray) -> pa.Array:
    return pa.array(ts.astype("datetime64[s]").astype("datetime64[us]"), type=pa.timestamp("us", tz="UTC"))


def sequence_table(events: pd.DataFrame, seq_len: int, epoch_rows: bool = True) -> pa.Table:
    """Last-``seq_len`` windows of one scenario's events (already filtered), one row per
    (user, second): the window after the last of that second's events.

    ``events`` must be grouped by user and time-ordered within a user (``RecData`` sorts them
    stably by (user_id, ts)). Built without Python loops: each row's window is the slice
    ``[max(first row of its user, i - seq_len + 1), i]`` of the scenario's event array.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(events)
    users = events["user_id"].to_numpy()
    if n:
        new_user = np.empty(n, dtype=bool)
        new_user[0] = True
        new_user[1:] = users[1:] != users[:-1]
        if pd.Index(users[new_user]).has_duplicates:
            raise ValueError("events must be grouped by user (sort by user_id, ts first)")
        group_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    else:
        group_start = np.zeros(0, dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)
    start = np.maximum(group_start, idx - seq_len + 1)
    lengths = idx - start + 1
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    # position of every flattened window element in the scenario's event array
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
    take = pa.array(flat, type=pa.int64())
    off = pa.array(offsets.astype(np.int32) if total < 2**31 else offsets)
    list_cls = pa.ListArray if total < 2**31 else pa.LargeListArray

    def windows(values: pa.Array) -> pa.Array:
        return list_cls.from_arrays(off, values.take(take))

    ts = events["ts"].to_numpy(np.int64)
    # the last event of each (user, second) carries the state a join at any later time must see
    last = np.ones(n, dtype=bool)
    if n:
        last[:-1] = new_user[1:] | (ts[1:] != ts[:-1])
    table = pa.table(
        {
            "user_id": pa.array(users.astype(str), type=pa.string()),
            "event_timestamp": _ts_column(ts),
            "item_ids": windows(pa.array(events["item_id"].astype(str).to_numpy(), type=pa.string())),
            "actions": windows(pa.array(events["action"].astype(str).to_numpy(), type=pa.string())),
            "timestamps": windows(pa.array(ts, type=pa.int64())),
        }
    )
    if not last.all():
        table = table.filter(pa.array(last))
    if epoch_rows and n:
        first = users[new_user].astype(str)
        m = len(first)
        empty = pa.array([[]] * m, type=table.schema.field("item_ids").type)
        empty_ts = pa.array([[]] * m, type=table.schema.field("timestamps").type)
        head = pa.table(
            {
                "user_id": pa.array(first, type=pa.string()),
                "event_timestamp": _ts_column(np.zeros(m, np.int64)),
                "item_ids": empty,
                "actions": empty,
                "timestamps": empty_ts,
            },
            schema=table.schema,
        )
        table = pa.concat_tables([head, table])
    return table


def latest_windows(path: str | Path, end: datetime) -> pd.DataFrame:
    """Each user's last row before ``end`` of a sequence source written by :func:`sequence_table`.

    A user's rows are in time order, so the last one's window holds every event up to its time,
    those of the same second included."""
    table = pq.read_table(path)
    ts = table["event_timestamp"].cast(pa.int64()).to_numpy()
    end = pd.Timestamp(end)
    end = end.tz_localize("UTC") if end.tz is None else end.tz_convert("UTC")
    before = np.flatnonzero(ts < end.value // 1000)  # the column is in µs
    # the last occurrence: the epoch rows of all users come first, then each user's windows
    users = table["user_id"].to_numpy(zero_copy_only=False)[before][::-1]
    _, first_from_end = np.unique(users, return_index=True)
    return table.take(np.sort(before[len(users) - 1 - first_from_end])).to_pandas()


def popularity_table(events: pd.DataFrame) -> pa.Table:
    """Cumulative event count per item at each distinct second it was interacted with."""
    if events.empty:
        return pa.table({"item_id": pa.array([], pa.string()), "event_timestamp": _ts_column(np.zeros(0, np.int64)),
                         "popularity": pa.array([], pa.int64())})
    per_sec = events.groupby(["item_id", "ts"], sort=True).size().rename("n").reset_index()
    per_sec["popularity"] = per_sec.groupby("item_id", sort=False)["n"].cumsum().astype("int64")
    zeros = pd.DataFrame({"item_id": per_sec["item_id"].unique(), "ts": 0, "popularity": 0})
    per_sec = pd.concat([zeros, per_sec[["item_id", "ts", "popularity"]]], ignore_index=True)
    return pa.table(
        {
            "item_id": pa.array(per_sec["item_id"].astype(str).to_numpy(), type=pa.string()),
            "event_timestamp": _ts_column(per_sec["ts"].to_numpy(np.int64)),
            "popularity": pa.array(per_sec["popularity"].to_numpy(np.int64), type=pa.int64()),
        }
    )


def items_table(items: pd.DataFrame) -> pa.Table:
    n = len(items)
    return pa.table(
        {
            "item_id": pa.array(items["item_id"].astype(str).to_numpy(), type=pa.string()),
            "event_timestamp": _ts_column(np.zeros(n, np.int64)),
            "title": pa.array(items["title"].astype(str).to_numpy(), type=pa.string()),
            "body": pa.array(items["body"].fillna("").astype(str).to_numpy(), type=pa.string()),
            "tags": pa.array([list(map(str, t)) for t in items["tags"]], type=pa.list_(pa.string())),
            "scenarios": pa.array([list(map(str, s)) for s in items["scenarios"]], type=pa.list_(pa.string())),
        }
    )


def events_table(events: pd.DataFrame) -> pa.Table:
    ts = events["ts"].to_numpy(np.int64)
    return pa.table(
        {
            "user_id": pa.array(events["user_id"].astype(str).to_numpy(), type=pa.string()),
            "item_id": pa.array(events["item_id"].astype(str).to_numpy(), type=pa.string()),
            "scenario": pa.array(events["scenario"].astype(str).to_numpy(), type=pa.string()),
            "action": pa.array(events["action"].astype(str).to_numpy(), type=pa.string()),
            "ts": pa.array(ts, type=pa.int64()),
            "event_timestamp": _ts_column(ts),
        }
    )


@dataclass
class SourcesReport:
    root: Path
    scenarios: list[str]
    seq_len: int
    rows: dict[str, int]


def build_sources(data: RecData, root: str | Path, seq_len: int = DEFAULT_SEQ_LEN) -> SourcesReport:
    """Write every offline table the Feast definitions read into ``root``; returns row counts."""
    scenarios = check_scenarios(list(data.scenarios))
    paths = SourcePaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    ev = data.events
    unknown = sorted(set(ev["scenario"].unique()) - set(scenarios))
    if unknown:
        raise ValueError(f"events use scenario(s) {unknown} missing from the dataset's scenarios {scenarios}")
    # RecData keeps events sorted stably by (user_id, ts); re-sort defensively (stable, so ties
    # keep their file order, which is the only order MovieLens bursts have).
    ev = ev.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    rows: dict[str, int] = {}

    def write(table: pa.Table, path: Path, name: str) -> None:
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)  # readers never see a half-written file
        rows[name] = table.num_rows

    write(events_table(ev), paths.events, "events")
    write(items_table(data.items), paths.items, "items")
    write(popularity_table(ev), paths.item_popularity, "item_popularity")
    scen = ev["scenario"].to_numpy()
    for s in scenarios:
        write(sequence_table(ev.loc[scen == s], seq_len), paths.seq(s), seq_table_name(s))
    paths.manifest.write_text(json.dumps({"scenarios": scenarios, "seq_len": int(seq_len), "dataset": data.name}, indent=1))
    return SourcesReport(paths.root, scenarios, int(seq_len), rows)
