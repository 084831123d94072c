"""Large synthetic event logs for volume benchmarks of the offline build (1M to 50M+ events).

:func:`redrec.data.synthetic.generate` models users' interests event by event in Python (about
25k events/s); this writer only needs the *shape* of a real log at volume and draws it vectorised,
one chunk at a time, so memory is bounded by ``chunk`` whatever ``n_events`` is:

- sessions of a geometric number of events (mean ``session_mean``), each of one user; users are
  drawn with a heavy head (a few users have thousands of events: windows longer than any
  ``seq_len``), items with a Zipf-like popularity;
- gaps inside a session are 0 s with probability ``same_second`` (bursts at one second, as
  MovieLens logs them: their order is the file order, carried by ``seq``), else ~30 s;
- session starts are uniform over ``span_s``, so a user's events are spread over files and out of
  time order in the log, as a landed log is.

Output: ``<out>/events/part-NNNNN.parquet`` (user_id, item_id, scenario, action, ts, seq; ``seq``
the global row position, i.e. the file order) and ``<out>/items.parquet`` (item_id, title, body,
tags, scenarios), the inputs of ``redrec.features.spark_sources``. The content depends on
``seed`` and ``chunk`` (each chunk has its own stream).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCENARIOS = ("homefeed", "search", "ads")
SCENARIO_MIX = (0.55, 0.25, 0.20)
ACTIONS = ("click", "like", "share", "skip")
ACTION_MIX = (0.6, 0.2, 0.05, 0.15)
EVENT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("scenario", pa.string()),
                          ("action", pa.string()), ("ts", pa.int64()), ("seq", pa.int64())])


@dataclass(frozen=True)
class ScaleLog:
    events_dir: Path
    items_path: Path
    n_events: int
    n_users: int
    n_items: int
    files: int
    scenarios: tuple[str, ...] = SCENARIOS


def _ids(prefix: str, idx: np.ndarray, n: int) -> pa.Array:
    """``prefix`` + zero-padded index, built in Arrow (a Python f-string per row is the slow part)."""
    width = max(7, len(str(max(n - 1, 0))))
    digits = pc.utf8_lpad(pc.cast(pa.array(idx, pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _pick(rng: np.random.Generator, names: tuple[str, ...], p: tuple[float, ...], n: int) -> pa.Array:
    codes = rng.choice(len(names), size=n, p=np.asarray(p) / np.sum(p)).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(names))).cast(pa.string())


def scale_chunk(rng: np.random.Generator, rows: int, n_users: int, n_items: int, *, start_ts: int,
                span_s: int, session_mean: float, same_second: float) -> dict[str, np.ndarray | pa.Array]:
    """``rows`` events in whole sessions (the last one cut), without ``seq``."""
    # sessions until the rows are covered; geometric lengths >= 1 with the given mean
    n_sess = max(1, int(rows / session_mean * 1.1) + 8)
    lengths = rng.geometric(1.0 / session_mean, size=n_sess)
    while lengths.sum() < rows:
        lengths = np.concatenate([lengths, rng.geometric(1.0 / session_mean, size=n_sess)])
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, rows)) + 1
    lengths = lengths[:k]
    lengths[-1] -= int(ends[k - 1] - rows)
    # a heavy head of users and items: u**a with a > 1 puts mass near index 0
    user = np.minimum((n_users * rng.random(k) ** 2).astype(np.int64), n_users - 1)
    start = start_ts + rng.integers(0, span_s, size=k)
    user = np.repeat(user, lengths)
    gap = np.where(rng.random(rows) < same_second, 0, rng.exponential(30.0, size=rows).astype(np.int64) + 1)
    first = np.zeros(rows, dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    gap[first] = 0
    # offset within the session: cumulative gaps, restarted at each session
    cum = np.cumsum(gap)
    ts = np.repeat(start, lengths) + cum - np.repeat(cum[first], lengths)
    item = np.minimum((n_items * rng.random(rows) ** 2.5).astype(np.int64), n_items - 1)
    return {
        "user_id": _ids("u", user, n_users),
        "item_id": _ids("it", item, n_items),
        "scenario": _pick(rng, SCENARIOS, SCENARIO_MIX, rows),
        "action": _pick(rng, ACTIONS, ACTION_MIX, rows),
        "ts": ts.astype(np.int64),
    }


def write_scale_items(path: Path, n_items: int, seed: int, chunk: int) -> Path:
    """``n_items`` catalogue rows in chunks: every item in homefeed and search, a third also in ads."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    schema = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("body", pa.string()),
                        ("tags", pa.list_(pa.string())), ("scenarios", pa.list_(pa.string()))])
    both = pa.array([["homefeed", "search"], ["homefeed", "search", "ads"]], pa.list_(pa.string()))
    with pq.ParquetWriter(tmp, schema) as w:
        for lo in range(0, n_items, chunk):
            idx = np.arange(lo, min(lo + chunk, n_items), dtype=np.int64)
            rng = np.random.default_rng([seed, 2, lo])
            topic = rng.integers(0, 12, size=len(idx))
            tname = pc.binary_join_element_wise(pa.scalar("topic"), pc.cast(pa.array(topic), pa.string()), "")
            ids = _ids("it", idx, n_items)
            w.write_table(pa.table({
                "item_id": ids,
                "title": pc.binary_join_element_wise(pa.scalar("item "), ids, ""),
                "body": pc.binary_join_element_wise(pa.scalar("an item about "), tname, ""),
                "tags": pa.ListArray.from_arrays(pa.array(np.arange(len(idx) + 1, dtype=np.int32)), tname),
                "scenarios": both.take(pa.array((rng.random(len(idx)) < 1 / 3).astype(np.int64))),
            }, schema=schema))
    tmp.replace(path)
    return path


def write_scale_log(out_dir: str | Path, n_events: int, n_users: int, n_items: int, seed: int = 0, *,
                    chunk: int = 1_000_000, start_ts: int = 1_700_000_000, span_s: int = 86_400 * 30,
                    session_mean: float = 4.0, same_second: float = 0.15) -> ScaleLog:
    """Write ``n_events`` events (one parquet file per ``chunk`` rows) and ``n_items`` items."""
    if n_events < 1 or n_users < 1 or n_items < 1 or chunk < 1:
        raise ValueError(f"n_events, n_users, n_items and chunk must be >= 1, got {n_events}, {n_users}, {n_items}, {chunk}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events_dir = out / "events"
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}-events"
    tmp.mkdir()
    files = 0
    try:
        for i, lo in enumerate(range(0, n_events, chunk)):
            rows = min(chunk, n_events - lo)
            cols = scale_chunk(np.random.default_rng([seed, 1, i]), rows, n_users, n_items, start_ts=start_ts,
                               span_s=span_s, session_mean=session_mean, same_second=same_second)
            cols["seq"] = pa.array(np.arange(lo, lo + rows, dtype=np.int64))
            pq.write_table(pa.table(cols, schema=EVENT_SCHEMA), tmp / f"part-{i:05d}.parquet")
            files += 1
        if events_dir.exists():
            shutil.rmtree(events_dir)
        tmp.rename(events_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    items = write_scale_items(out / "items.parquet", n_items, seed, chunk)
    return ScaleLog(events_dir, items, n_events, n_users, n_items, files)


def read_scale_log(log: ScaleLog):
    """The log as a ``RecData`` for the pandas build (whole log in memory: for comparisons at
    volumes pandas handles). Rows are put in ``seq`` order, which RecData's stable sort keeps."""
    from redrec.data.dataset import RecData

    ev = pq.read_table(log.events_dir).to_pandas().sort_values("seq", kind="stable")
    items = pq.read_table(log.items_path).to_pandas()
    items["tags"] = items["tags"].map(list)
    items["scenarios"] = items["scenarios"].map(list)
    return RecData(f"scale-{log.n_events}", ev.drop(columns="seq").reset_index(drop=True), items,
                   list(log.scenarios), list(ACTIONS))
