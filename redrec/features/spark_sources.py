"""The offline sources of :mod:`redrec.features.sources`, computed by Spark (``offline.engine: spark``).

The same tables as the pandas build (read its docstring for what each holds), with the same column
names, types and rows, written as parquet *directories* at the same paths (``<root>/events.parquet``,
``<root>/seq_<slug>.parquet``, ...), so :class:`~redrec.features.sources.SourcePaths` names both.

Input: the event log as a parquet directory with the canonical columns plus ``seq`` (int64), the
event's position in the stable (user_id, ts) order of the log (:func:`write_event_log`). A shuffle
does not keep file order, so same-second events of a user (MovieLens writes bursts) are ordered by
this column; without it their windows would come out in an arbitrary order.

Layout: every table is hash-bucketed by its entity key (``user_id`` for events and the sequence
tables, ``item_id`` for items and popularity) into ``part-NNNNN.parquet`` files, bucket NNNNN =
``pmod(hash(key), buckets)``, Spark's own hash partitioning. Why by the entity key and not by date:
the last-N windows need all of a user's events together anyway, so the one shuffle that groups them
for the window also makes the buckets (no second shuffle); and every row of a user then sits in one
file, in time order, its epoch row first, which is what ``latest_windows`` and Feast's
point-in-time join assume of the pandas file. A consumer can also take the buckets one at a time
with bounded memory. Date partitions would split a user's history across files, and a directory per
user would make millions of them. ``buckets`` defaults to one file per ``rows_per_file`` rows,
and at least one per core.

Atomicity: all tables are written under ``<root>/.staging-<id>/`` first; only once every one has
succeeded is each moved into place and then the manifest replaced. A failed build leaves the
previous sources as they were. A directory cannot be renamed over another, so a table is swapped
with two renames: a reader sees the old table, the new one, or for that instant none (a clear
"missing" error), never half of one; a reader that checks against the manifest while the tables
are being swapped gets a mismatch error, not mixed data. The manifest (``scenarios.json``, the
pandas keys plus ``engine`` and ``layout``) lists each table's files, row counts and schema;
:func:`check_source_table` checks a directory against it.

Paths are local (a volume shared by driver and executors on Kubernetes, e.g. a ReadWriteMany PVC):
the moves are POSIX renames and the footers are read from the driver.

The driver never collects data: it reads parquet footers, a handful of aggregate rows (events per
scenario, null counts) and at most 20 offending values when reporting an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from redrec.data.dataset import RecData
from redrec.features.sources import (
    DEFAULT_SEQ_LEN,
    SourcePaths,
    SourcesReport,
    check_scenarios,
    events_table,
    items_table,
    popularity_table,
    read_manifest,
    seq_table_name,
    sequence_table,
)

ENGINE = "spark"
DEFAULT_ROWS_PER_FILE = 1_000_000
MAX_BUCKETS = 4096
# the columns the Spark path reads and their types (as _type_name spells them: large_string and
# list field names/nullability are read the same)
EVENT_INPUT = {"user_id": "string", "item_id": "string", "scenario": "string", "action": "string",
               "ts": "int64", "seq": "int64"}
ITEM_INPUT = {"item_id": "string", "title": "string", "body": "string", "tags": "list<string>",
              "scenarios": "list<string>"}
_MARK = "redrec-spark-sources:"  # prefixes the messages of errors raised inside Spark tasks


class SourceTableError(ValueError):
    """A source table on disk does not match its manifest (missing file, drifted schema, ...)."""


# ---- the pandas build's schemas: the Spark tables must have exactly these column types ---------


@lru_cache(maxsize=None)
def canonical_schemas() -> dict[str, pa.Schema]:
    """Schemas of the pandas tables, taken from the pandas builders themselves (on empty input), so
    the two engines cannot drift apart silently."""
    ev = pd.DataFrame({"user_id": pd.Series([], dtype=object), "item_id": pd.Series([], dtype=object),
                       "scenario": pd.Series([], dtype=object), "action": pd.Series([], dtype=object),
                       "ts": pd.Series([], dtype=np.int64)})
    it = pd.DataFrame({c: pd.Series([], dtype=object) for c in ("item_id", "title", "body", "tags", "scenarios")})
    return {"events": events_table(ev).schema, "items": items_table(it).schema,
            "item_popularity": popularity_table(ev).schema, "seq": sequence_table(ev, 1).schema}


def canonical_schema(name: str) -> pa.Schema:
    s = canonical_schemas()
    return s["seq"] if name.startswith("seq_") else s[name]


def _plain(t: pa.DataType) -> pa.DataType:
    """``t`` with nested fields made nullable and renamed: Spark writes ``list<element: string not
    null>`` where pyarrow writes ``list<item: string>``; the values are the same."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_plain(t.value_type))
    return t


def _type_name(t: pa.DataType) -> str:
    t = _plain(t)
    if pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


# ---- input: the event log as parquet with an explicit order column ------------------------------


def event_log_frame(data: RecData) -> pd.DataFrame:
    """``data``'s canonical events with ``seq``, their position in RecData's stable (user_id, ts)
    order, which is the order the pandas build uses."""
    ev = data.events.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    out = ev[["user_id", "item_id", "scenario", "action"]].astype(str)
    out["ts"] = ev["ts"].to_numpy(np.int64)
    out["seq"] = np.arange(len(ev), dtype=np.int64)
    return out


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, replacing whatever is there (file or directory)."""
    old = path.with_name(f".old-{uuid.uuid4().hex[:8]}-{path.name}")
    if path.exists() or path.is_symlink():
        path.rename(old)
    tmp.rename(path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def write_event_log(data: RecData | pd.DataFrame, path: str | Path, files: int = 4) -> Path:
    """Write the events as a parquet directory of ``files`` files (``part-NNNNN.parquet``), with the
    int64 ``seq`` column. A frame must already hold ``seq`` (:func:`event_log_frame`)."""
    frame = event_log_frame(data) if isinstance(data, RecData) else data
    missing = [c for c in EVENT_INPUT if c not in frame.columns]
    if missing:
        raise ValueError(f"event log frame lacks column(s) {missing}; build it with event_log_frame(data)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.mkdir()
    table = pa.Table.from_pandas(frame[list(EVENT_INPUT)], preserve_index=False)
    n = max(1, int(files))
    bounds = np.linspace(0, table.num_rows, n + 1).astype(int)
    for i in range(n):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), tmp / f"part-{i:05d}.parquet")
    _replace_dir(tmp, path)
    return path


def write_items(items: pd.DataFrame, path: str | Path) -> Path:
    """The catalogue columns the sources read, as one parquet file (``image`` is not a source
    column, and an all-None one would be written as a null-typed column)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "item_id": pa.array(items["item_id"].astype(str).to_numpy(), pa.string()),
        "title": pa.array(items["title"].astype(str).to_numpy(), pa.string()),
        "body": pa.array(items["body"].fillna("").astype(str).to_numpy(), pa.string()),
        "tags": pa.array([list(map(str, t)) for t in items["tags"]], pa.list_(pa.string())),
        "scenarios": pa.array([list(map(str, s)) for s in items["scenarios"]], pa.list_(pa.string())),
    })
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def _parquet_files(path: Path) -> list[Path]:
    """The data files of a parquet file or directory (recursively, as a platform's date-partitioned
    landing zone has them); names starting with ``_`` or ``.`` are Spark/Hadoop bookkeeping."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such parquet file or directory")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"{path}: no parquet files in the directory")
    return files


def check_input_files(path: str | Path, columns: dict[str, str], what: str) -> tuple[list[Path], int]:
    """Check every file's footer for the required columns and types; returns the files and rows."""
    files = _parquet_files(Path(path))
    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as e:  # noqa: BLE001 - any unreadable footer is reported with its file
            raise ValueError(f"{f}: not a readable parquet file ({e})") from None
        schema = meta.schema.to_arrow_schema()
        for col, want in columns.items():
            if col not in schema.names:
                hint = " (the stable order position; write the log with write_event_log)" if col == "seq" else ""
                raise ValueError(f"{f}: {what} column '{col}' is missing{hint}; "
                                 f"{what} files need {', '.join(f'{c} ({t})' for c, t in columns.items())}")
            got = _type_name(schema.field(col).type)
            if got != want:
                raise ValueError(f"{f}: {what} column '{col}' is {got}, expected {want}; cast it when writing the file")
        rows += meta.num_rows
    return files, rows


def _spark_type(kind: str) -> str:
    return {"string": "string", "int64": "bigint", "list<string>": "array<string>"}[kind]


def _read(spark, files: list[Path], columns: dict[str, str]):
    # an explicit schema: Spark then reads only these columns and infers nothing from other files
    ddl = ", ".join(f"`{c}` {_spark_type(t)}" for c, t in columns.items())
    return spark.read.schema(ddl).parquet(*[str(f) for f in files])


# ---- the Spark plans -----------------------------------------------------------------------------


def _f():
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    return F, Window


def events_frame(events, buckets: int):
    """The events table, one bucket per user hash, each user's events in (ts, seq) order. A user
    with two events at the same (ts, seq) fails the job: their order would be arbitrary."""
    F, Window = _f()
    order = Window.partitionBy("user_id").orderBy("ts", "seq")
    tie = (F.lag("ts").over(order) == F.col("ts")) & (F.lag("seq").over(order) == F.col("seq"))
    msg = F.concat(F.lit(f"{_MARK} user "), F.col("user_id"), F.lit(" has two events at ts "),
                   F.col("ts").cast("string"), F.lit(" with the same seq "), F.col("seq").cast("string"),
                   F.lit(": seq must be each event's unique position in the log's order (write_event_log writes it)"))
    stamp = F.when(tie, F.raise_error(msg)).otherwise(F.timestamp_seconds("ts"))
    return (events.repartition(buckets, "user_id")
            .select("user_id", "item_id", "scenario", "action", "ts", "seq", stamp.alias("event_timestamp"))
            # the files' order, stated: Spark folds it into the window's sort (one sort, see the
            # plan test), and it holds even if the window's order changes
            .sortWithinPartitions("user_id", "ts", "seq")
            .select("user_id", "item_id", "scenario", "action", "ts", "event_timestamp"))


def sequence_frame(events, seq_len: int, buckets: int):
    """One scenario's last-``seq_len`` windows (``events`` already filtered to it), one row per
    (user, second) with events, plus each user's empty epoch row, bucketed by user, each user's rows in the pandas order (epoch first).

    The epoch row enters the window as a marker row that sorts first (``_kind`` 0) and whose own
    element is null, which ``collect_list`` skips: its window is empty, and an event's frame reaches
    back to the marker only while the frame already covers all the user's earlier events."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    F, Window = _f()
    marks = (events.select("user_id").distinct()
             .select("user_id", F.lit(0).alias("_kind"), F.lit(None).cast("string").alias("item_id"),
                     F.lit(None).cast("string").alias("action"), F.lit(0).cast("long").alias("ts"),
                     F.lit(0).cast("long").alias("seq")))
    rows = (events.select("user_id", F.lit(1).alias("_kind"), "item_id", "action", "ts", "seq")
            .unionByName(marks).repartition(buckets, "user_id"))
    order = Window.partitionBy("user_id").orderBy("_kind", "ts", "seq")
    # one struct per event keeps the three lists aligned by construction; its fields are nullable,
    # so the lists' elements come out nullable, as pyarrow's are
    element = F.when(F.col("_kind") == 1, F.struct("item_id", "action", "ts"))
    window = F.collect_list(element).over(order.rowsBetween(-(seq_len - 1), 0))
    # one row per (user, second), the state after that second's last event, as the pandas table
    # keeps (rows of one second would tie in a point-in-time join); same window order, no new sort
    last_of_second = (F.col("_kind") == 0) | F.lead("ts").over(order).isNull() | (F.lead("ts").over(order) != F.col("ts"))
    return (rows.select("user_id", "_kind", "ts", "seq", window.alias("_w"), last_of_second.alias("_last"))
            .where("_last")
            .sortWithinPartitions("user_id", "_kind", "ts", "seq")  # the files' order (see events_frame)
            .select("user_id", F.timestamp_seconds("ts").alias("event_timestamp"),
                    F.col("_w.item_id").alias("item_ids"), F.col("_w.action").alias("actions"),
                    F.col("_w.ts").alias("timestamps")))


def popularity_frame(events, buckets: int):
    """Cumulative events per item at each distinct second, plus a zero at the epoch per item.

    A running count over the item's events in time order, kept at the last event of each second
    (which has counted all of that second's events): one sort and a streaming window, no
    aggregation over (item, second), which at 5M events was the slowest step of the build."""
    F, Window = _f()
    part = events.select("item_id", "ts").repartition(buckets, "item_id")
    # the markers are computed within the buckets, and the union keeps the partitioning
    marks = part.select("item_id").distinct().select("item_id", F.lit(0).alias("_kind"), F.lit(0).cast("long").alias("ts"))
    rows = part.select("item_id", F.lit(1).alias("_kind"), "ts").unionByName(marks)
    order = Window.partitionBy("item_id").orderBy("_kind", "ts")
    count = F.sum("_kind").over(order.rowsBetween(Window.unboundedPreceding, Window.currentRow))  # markers add 0
    after = F.lead("ts").over(order)
    last_of_second = (F.col("_kind") == 0) | after.isNull() | (after != F.col("ts"))
    return (rows.select("item_id", "_kind", "ts", count.cast("long").alias("popularity"), last_of_second.alias("_last"))
            .filter("_last")
            .sortWithinPartitions("item_id", "_kind", "ts")  # the files' order (see events_frame)
            .select("item_id", F.timestamp_seconds("ts").alias("event_timestamp"), "popularity"))


def items_frame(items, buckets: int):
    F, _ = _f()
    return (items.repartition(buckets, "item_id").sortWithinPartitions("item_id")
            .select("item_id", F.timestamp_seconds(F.lit(0).cast("long")).alias("event_timestamp"), "title",
                    F.coalesce(F.col("body"), F.lit("")).alias("body"), "tags", "scenarios"))


# ---- validation ----------------------------------------------------------------------------------


def _validate_events(events, scenarios: list[str], where: str) -> dict[str, int]:
    """One pass over the log: events per scenario, nulls per column. Returns the per-scenario counts."""
    F, _ = _f()
    key = F.when(F.col("scenario").isin(scenarios), F.col("scenario"))
    aggs = [F.count(F.lit(1)).alias("n")] + [F.sum(F.col(c).isNull().cast("long")).alias(c) for c in EVENT_INPUT]
    counts: dict[str, int] = {}
    nulls = dict.fromkeys(EVENT_INPUT, 0)
    other = 0
    for r in events.groupBy(key.alias("_s")).agg(*aggs).collect():  # at most len(scenarios) + 1 rows
        for c in EVENT_INPUT:
            nulls[c] += int(r[c] or 0)
        if r["_s"] is None:
            other = int(r["n"]) - int(r["scenario"] or 0)
        else:
            counts[r["_s"]] = int(r["n"])
    for c, n in nulls.items():
        if n:
            bad = [re.sub(r"^file:", "", x[0]) for x in
                   events.filter(F.col(c).isNull()).select(F.col("_metadata.file_path")).distinct().limit(5).collect()]
            raise ValueError(f"{', '.join(bad)}: events column '{c}' is null in {n} row(s); every event needs a {c}")
    if other:
        unknown = sorted(x[0] for x in events.filter(~F.col("scenario").isin(scenarios)).select("scenario").distinct().limit(20).collect())
        raise ValueError(f"events use scenario(s) {unknown} missing from the dataset's scenarios {scenarios} (event log {where})")
    return {s: counts.get(s, 0) for s in scenarios}


def _items_input(spark, items):
    """A DataFrame of the items columns, from a parquet path or a DataFrame, checked; and its row
    count when the footers tell it (None for a DataFrame)."""
    if isinstance(items, (str, Path)):
        files, rows = check_input_files(items, ITEM_INPUT, "items")
        return _read(spark, files, ITEM_INPUT), rows
    fields = {f.name: f.dataType.simpleString() for f in items.schema.fields}
    for col, kind in ITEM_INPUT.items():
        want = _spark_type(kind)
        if col not in fields:
            raise ValueError(f"items DataFrame: column '{col}' is missing; items need {', '.join(ITEM_INPUT)}")
        if fields[col] != want:
            raise ValueError(f"items DataFrame: column '{col}' is {fields[col]}, expected {want}")
    return items.select(*ITEM_INPUT), None


def scenarios_from_items(path: str | Path) -> list[str]:
    """Scenarios the catalogue declares, in first-seen order (as ``load_parquet`` takes them),
    streamed batch by batch so the driver holds only the names."""
    seen: dict[str, None] = {}
    for f in _parquet_files(Path(path)):
        for batch in pq.ParquetFile(f).iter_batches(columns=["scenarios"], batch_size=65_536):
            for s in pa.compute.list_flatten(batch.column(0)).unique().to_pylist():
                if s is not None:
                    seen.setdefault(str(s), None)
    return list(seen)


# ---- writing -------------------------------------------------------------------------------------


@dataclass
class TableLayout:
    name: str
    key: str
    buckets: int
    files: list[dict]  # {"file": name, "rows": n}, in bucket order
    schema: dict[str, str]

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.files)

    def to_json(self) -> dict:
        return {"path": f"{self.name}.parquet", "bucket_key": self.key, "buckets": self.buckets,
                "rows": self.rows, "schema": self.schema, "files": self.files}


_PART = re.compile(r"^part-(\d+)-.*\.parquet$")


def _write_table(df, staging: Path, name: str, key: str, buckets: int) -> TableLayout:
    out = staging / f"{name}.parquet"
    # one file per task, i.e. per bucket
    df.write.option("maxRecordsPerFile", 0).mode("errorifexists").parquet(str(out))
    files = []
    for p in sorted(out.iterdir()):
        m = _PART.match(p.name)
        if m is None:  # _SUCCESS, Hadoop's .crc checksums
            p.unlink()
            continue
        target = out / f"part-{int(m.group(1)):05d}.parquet"
        if target.exists():
            raise RuntimeError(f"{out}: two files for bucket {m.group(1)}; Spark wrote more than one file per task")
        p.rename(target)
        files.append(target)
    files.sort()
    schema = None
    entries = []
    for f in files:
        meta = pq.read_metadata(f)
        s = {fl.name: _type_name(fl.type) for fl in meta.schema.to_arrow_schema()}
        if schema is not None and s != schema:
            raise RuntimeError(f"{f}: Spark wrote a schema {s} unlike the table's other files {schema}")
        schema = s
        entries.append({"file": f.name, "rows": meta.num_rows})
    want = {f.name: _type_name(f.type) for f in canonical_schema(name)}
    if schema != want:
        raise RuntimeError(f"{out}: Spark wrote {schema}, the pandas build's schema is {want}")
    return TableLayout(name, key, buckets, entries, schema)


def _buckets(rows: int, rows_per_file: int, fixed: int | None, cores: int = 1) -> int:
    """Files of a table: ``fixed``, else one per ``rows_per_file`` rows but at least one per core
    (a bucket is one task of the window: fewer buckets than cores leave cores idle)."""
    if fixed is not None:
        if fixed < 1:
            raise ValueError(f"buckets must be >= 1, got {fixed}")
        return int(fixed)
    if rows <= 0:
        return 1
    return int(min(MAX_BUCKETS, max(cores, math.ceil(rows / max(1, rows_per_file)))))


def _spark_error(e: Exception) -> Exception:
    """A check that failed inside a Spark task, as the ValueError the caller can read."""
    text = str(e)
    i = text.find(_MARK)
    if i < 0:
        return e
    msg = text[i + len(_MARK):].strip()
    msg = re.split(r"\s+SQLSTATE:", msg)[0]
    return ValueError(msg)


def build_sources_spark(
    spark,
    events_dir: str | Path,
    items,
    root: str | Path,
    seq_len: int = DEFAULT_SEQ_LEN,
    scenarios: list[str] | None = None,
    *,
    name: str = "spark",
    buckets: int | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> SourcesReport:
    """Write every offline table into ``root`` with Spark; the tables equal ``build_sources``'s.

    ``items``: a parquet path or a Spark DataFrame with the catalogue columns. ``scenarios``: the
    dataset's scenarios (default: those the items parquet declares, first seen first). ``buckets``:
    files per table (default: one per ``rows_per_file`` rows of the table's input)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if scenarios is None:
        if not isinstance(items, (str, Path)):
            raise ValueError("pass scenarios when items is a DataFrame")
        scenarios = scenarios_from_items(items)
    scenarios = check_scenarios(list(scenarios))
    events_dir = Path(events_dir)
    files, n_events = check_input_files(events_dir, EVENT_INPUT, "events")
    for k, v in {"spark.sql.session.timeZone": "UTC", "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS"}.items():
        spark.conf.set(k, v)  # what the tables' µs UTC timestamps rely on, whoever made the session
    events = _read(spark, files, EVENT_INPUT)
    item_df, n_items = _items_input(spark, items)
    per_scenario = _validate_events(events, scenarios, str(events_dir))

    paths = SourcePaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    staging = paths.root / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    layouts: list[TableLayout] = []
    try:
        cores = max(1, int(spark.sparkContext.defaultParallelism))
        nb = _buckets(n_events, rows_per_file, buckets, cores)
        try:
            layouts.append(_write_table(events_frame(events, nb), staging, "events", "user_id", nb))
            nb_items = nb if n_items is None else _buckets(n_items, rows_per_file, buckets, cores)
            layouts.append(_write_table(items_frame(item_df, nb_items), staging, "items", "item_id", nb_items))
            layouts.append(_write_table(popularity_frame(events, nb), staging, "item_popularity", "item_id", nb))
            for s in scenarios:
                nbs = _buckets(per_scenario[s], rows_per_file, buckets, cores)
                scen = events.filter(events["scenario"] == s)
                layouts.append(_write_table(sequence_frame(scen, seq_len, nbs), staging, seq_table_name(s), "user_id", nbs))
        except Exception as e:  # noqa: BLE001 - re-raised, as a ValueError when a data check failed
            raise _spark_error(e) from None
        for lay in layouts:
            _replace_dir(staging / f"{lay.name}.parquet", paths.root / f"{lay.name}.parquet")
        manifest = {
            "scenarios": scenarios, "seq_len": int(seq_len), "dataset": name, "engine": ENGINE,
            "layout": {
                "format": "parquet directories, hash-bucketed by entity key",
                "bucketing": "bucket = pmod(hash(key), buckets): Spark's hash partitioning (Murmur3, seed 42); "
                             "each key's rows are in one file, in time order",
                "tables": {lay.name: lay.to_json() for lay in layouts},
            },
        }
        tmp = paths.manifest.with_name(f".{paths.manifest.name}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(paths.manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SourcesReport(paths.root, scenarios, int(seq_len), {lay.name: lay.rows for lay in layouts})


# ---- reading either engine's output --------------------------------------------------------------


def check_source_table(root: str | Path, name: str) -> list[Path]:
    """The files of source table ``name`` (``events``, ``items``, ``item_popularity``, ``seq_<slug>``)
    in read order, after checking a Spark directory against the manifest: every listed file is there
    with its row count, no unlisted parquet file is, and every file has the manifest's schema."""
    root = Path(root)
    path = root / f"{name}.parquet"
    if path.is_file():
        return [path]  # the pandas build: one file, nothing to reconcile
    if not path.is_dir():
        raise SourceTableError(f"{path}: source table '{name}' is missing; build the sources first")
    manifest = read_manifest(root)
    if manifest is None:
        raise SourceTableError(f"{path}: a directory table but {SourcePaths(root).manifest} is missing; rebuild the sources")
    table = ((manifest.get("layout") or {}).get("tables") or {}).get(name)
    if table is None:
        raise SourceTableError(f"{path}: a directory table that {SourcePaths(root).manifest} does not list "
                               f"(engine {manifest.get('engine', 'pandas')!r}); rebuild the sources")
    listed = [e["file"] for e in table["files"]]
    present = {p.name for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith(("_", "."))}
    missing = [f for f in listed if f not in present]
    if missing:
        raise SourceTableError(f"{path / missing[0]}: missing; the manifest lists {len(listed)} partition file(s) of "
                               f"'{name}' and {len(missing)} are gone ({', '.join(missing[:5])}); rebuild the sources")
    extra = sorted(present - set(listed))
    if extra:
        raise SourceTableError(f"{path / extra[0]}: not in the manifest's {len(listed)} partition file(s) of '{name}' "
                               f"(unlisted: {', '.join(extra[:5])}); remove it or rebuild the sources")
    want = table["schema"]
    files = []
    for e in table["files"]:
        f = path / e["file"]
        meta = pq.read_metadata(f)
        got = {fl.name: _type_name(fl.type) for fl in meta.schema.to_arrow_schema()}
        for col, t in want.items():
            if col not in got:
                raise SourceTableError(f"{f}: column '{col}' is missing; the table's other partitions have it ({t})")
            if got[col] != t:
                raise SourceTableError(f"{f}: column '{col}' is {got[col]}, the table's other partitions have {t}")
        for col in got:
            if col not in want:
                raise SourceTableError(f"{f}: column '{col}' is not in the table's schema ({', '.join(want)})")
        if meta.num_rows != e["rows"]:
            raise SourceTableError(f"{f}: {meta.num_rows} rows, the manifest says {e['rows']}; the file was replaced")
        files.append(f)
    return files


def read_source_table(root: str | Path, name: str) -> pa.Table:
    """A source table as pyarrow, whichever engine wrote it, in the pandas build's column types."""
    files = check_source_table(root, name)
    if len(files) == 1 and files[0].name == f"{name}.parquet":
        return pq.read_table(files[0])
    table = ds.dataset([str(f) for f in files], format="parquet").to_table()
    want = canonical_schema(name)
    # only nested nullability and list field names differ from the pandas schema (checked at write)
    return table.select(want.names).cast(want)


# ---- entry point: what a SparkApplication's driver runs ------------------------------------------


def _session(master: str | None, driver_memory: str, conf: dict[str, str]):
    from redrec.features.spark import BASE_CONF, SparkSettings, spark_session

    if master is None and os.environ.get("PYSPARK_GATEWAY_PORT"):
        # launched by spark-submit (the Spark operator): its conf, master and driver host stand;
        # BASE_CONF's 127.0.0.1 driver host would cut the executors off
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.getOrCreate()
        for k, v in {**BASE_CONF, **conf}.items():
            if k.startswith("spark.sql."):
                spark.conf.set(k, v)
        return spark
    return spark_session(SparkSettings(master=master or "local[2]", app_name="redrec-sources",
                                       conf={"spark.driver.memory": driver_memory, **conf}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redrec.features.spark_sources",
                                 description="Build the Feast offline sources with Spark from a parquet event log.")
    ap.add_argument("--events", required=True, help="event log parquet directory (user_id, item_id, scenario, action, ts, seq)")
    ap.add_argument("--items", required=True, help="items parquet (item_id, title, body, tags, scenarios)")
    ap.add_argument("--out", required=True, help="sources root (the Feast repo's feast_sources/)")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--scenarios", help="comma-separated; default: those the items declare, first seen first")
    ap.add_argument("--name", default=None, help="dataset name for the manifest (default: the events directory's name)")
    ap.add_argument("--buckets", type=int, default=None, help="files per table (default: one per --rows-per-file rows)")
    ap.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE)
    ap.add_argument("--master", default=None, help="e.g. local[2]; default: spark-submit's, else local[2]")
    ap.add_argument("--driver-memory", default="4g", help="JVM heap when this process starts Spark (local mode)")
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    conf = {}
    for kv in args.conf:
        if "=" not in kv:
            ap.error(f"--conf {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        conf[k] = v
    scenarios = [s for s in args.scenarios.split(",") if s] if args.scenarios else None
    spark = _session(args.master, args.driver_memory, conf)
    try:
        rep = build_sources_spark(spark, args.events, args.items, args.out, args.seq_len, scenarios,
                                  name=args.name or Path(args.events).name, buckets=args.buckets,
                                  rows_per_file=args.rows_per_file)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"sources": str(rep.root), "engine": ENGINE, "scenarios": rep.scenarios,
                      "seq_len": rep.seq_len, "rows": rep.rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
