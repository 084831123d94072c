"""The Spark build of the offline sources equals the pandas build row for row, on the synthetic
world and on hand-built edge cases; bad input and damaged tables fail naming the file and column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from redrec.data.dataset import RecData
from redrec.data.scale_log import read_scale_log, write_scale_log
from redrec.features import spark_sources as S
from redrec.features.sources import EPOCH, build_sources, latest_windows, read_manifest, seq_table_name
from redrec.features.spark import SparkSettings, spark_session

SEQ_LEN = 3
TABLES = ("events", "items", "item_popularity")


@pytest.fixture(scope="module")
def spark():
    s = spark_session(SparkSettings(conf={"spark.sql.shuffle.partitions": "2"}))
    yield s
    s.stop()


def table_names(scenarios) -> list[str]:
    return [*TABLES, *(seq_table_name(s) for s in scenarios)]


def ordered_rows(table: pa.Table, name: str) -> list[dict]:
    """Rows sorted by (entity, event_timestamp, position within that second in the file order)."""
    key = "item_id" if name in ("items", "item_popularity") else "user_id"
    df = pd.DataFrame({"k": table[key].to_pylist(), "t": table["event_timestamp"].cast(pa.int64()).to_pylist()})
    df["pos"] = df.groupby(["k", "t"]).cumcount()
    order = df.sort_values(["k", "t", "pos"], kind="stable").index.to_numpy()
    return table.take(pa.array(order)).to_pylist()


def assert_same_sources(pandas_root: Path, spark_root: Path, scenarios) -> None:
    for name in table_names(scenarios):
        want = pq.read_table(pandas_root / f"{name}.parquet")
        got = S.read_source_table(spark_root, name)
        assert got.schema.equals(want.schema), f"{name}: {got.schema} != {want.schema}"
        # the files as written, before the reader's cast: only list nullability/naming may differ
        for f in S.check_source_table(spark_root, name):
            raw = pq.read_schema(f)
            assert raw.names == want.schema.names
            assert [S._plain(t) for t in raw.types] == list(want.schema.types), f
        assert got.num_rows == want.num_rows, name
        assert ordered_rows(got, name) == ordered_rows(want, name), name


def build_both(spark, data: RecData, tmp: Path, *, reverse: bool = False, buckets: int = 3, edit_items=None):
    """Pandas sources from ``data``, and Spark sources from its event log written as parquet (rows
    in reverse order when ``reverse``: same-second events then reach Spark in the opposite of their
    true order, which only ``seq`` holds)."""
    frame = S.event_log_frame(data)
    if reverse:
        frame = frame.iloc[::-1].reset_index(drop=True)
    events = S.write_event_log(frame, tmp / "in" / "events", files=3)
    items = S.write_items(data.items, tmp / "in" / "items.parquet")
    if edit_items is not None:
        pq.write_table(edit_items(pq.read_table(items)), items)
    build_sources(data, tmp / "pandas", SEQ_LEN)
    rep = S.build_sources_spark(spark, events, items, tmp / "spark", SEQ_LEN, data.scenarios, name=data.name, buckets=buckets)
    return events, items, rep


# ---- the synthetic world ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_built(spark, synthetic_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    return tmp, build_both(spark, synthetic_small, tmp)


def test_synthetic_world_equals_pandas(synthetic_built, synthetic_small):
    tmp, (_, _, rep) = synthetic_built
    assert_same_sources(tmp / "pandas", tmp / "spark", synthetic_small.scenarios)
    assert rep.rows == build_sources(synthetic_small, tmp / "pandas2", SEQ_LEN).rows
    pm, sm = read_manifest(tmp / "pandas"), read_manifest(tmp / "spark")
    assert {k: sm[k] for k in pm} == pm
    assert sm["engine"] == "spark"
    tables = sm["layout"]["tables"]
    assert set(tables) == set(table_names(synthetic_small.scenarios))
    assert all(t["buckets"] == 3 and len(t["files"]) <= 3 for t in tables.values())


def test_each_user_in_one_file_in_time_order(synthetic_built, synthetic_small):
    """What ``latest_windows`` (materialisation) relies on: a user's rows are in one bucket file, epoch
    row first, then in time order; read as a directory they give the pandas file's answer."""
    tmp, _ = synthetic_built
    files = S.check_source_table(tmp / "spark", "seq_homefeed")
    seen: dict[str, Path] = {}
    for f in files:
        t = pq.read_table(f)
        users = t["user_id"].to_pylist()
        ts = t["event_timestamp"].cast(pa.int64()).to_numpy()
        for u in set(users):
            assert u not in seen, f"user {u} in {seen.get(u)} and {f}"
            seen[u] = f
        change = np.flatnonzero(np.array(users[1:]) != np.array(users[:-1])) + 1
        starts = np.concatenate([[0], change])
        assert (ts[starts] == 0).all()  # each user's epoch row leads
        same_user = np.array(users[1:]) == np.array(users[:-1])
        assert (np.diff(ts)[same_user] >= 0).all()
    end = pd.Timestamp(synthetic_small.events["ts"].median(), unit="s", tz="UTC")
    want = latest_windows(tmp / "pandas" / "seq_homefeed.parquet", end)
    got = latest_windows(tmp / "spark" / "seq_homefeed.parquet", end)
    key = ["user_id"]
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True).map(lambda v: list(v) if isinstance(v, np.ndarray) else v),
        want.sort_values(key).reset_index(drop=True).map(lambda v: list(v) if isinstance(v, np.ndarray) else v),
        check_dtype=False)


def test_plans_shuffle_once_and_sort_once(spark, synthetic_built):
    """The window's sort gives the files their order; a second sort of the wide window rows (or a
    second shuffle of the events) would double the cost at 50M events."""
    _, (events, _, _) = synthetic_built
    ev = spark.read.parquet(str(events))
    # sequences: the events' bucket shuffle and the users' (epoch markers); popularity: the bucket
    # shuffles of the events' (item, ts) and of the items (markers)
    for df, shuffles in ((S.sequence_frame(ev, SEQ_LEN, 3), 2), (S.events_frame(ev, 3), 1), (S.popularity_frame(ev, 3), 2)):
        plan = df._jdf.queryExecution().executedPlan().toString()
        assert plan.count("Sort [") == 1, plan
        assert plan.count("Exchange ") == shuffles, plan
        assert plan.count("REPARTITION_BY_NUM") >= 1, plan


# ---- hand-built edge cases -------------------------------------------------------------------------


def edge_data() -> RecData:
    rows = [
        # ua: three events in one second (file order a1, a2, a3), then more than SEQ_LEN in total
        ("ua", "a1", "homefeed", "click", 100), ("ua", "a2", "homefeed", "like", 100),
        ("ua", "a3", "homefeed", "skip", 100), ("ua", "a4", "homefeed", "click", 200),
        ("ua", "a1", "ads", "click", 250), ("ua", "a5", "homefeed", "share", 300),
        # ub: only search, so no rows in seq_homefeed or seq_ads; three events in one second, two
        # of them of one item (its popularity counts both at that second)
        ("ub", "a2", "search", "click", 150), ("ub", "a1", "search", "like", 150), ("ub", "a2", "search", "share", 150),
        # uc: events exactly at the cut-off second 600, listed before an earlier one in the file
        ("uc", "a3", "homefeed", "click", 600), ("uc", "a4", "homefeed", "click", 500),
        ("uc", "a5", "homefeed", "like", 600),
    ]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario", "action", "ts"]).astype({"ts": "int64"})
    items = pd.DataFrame({"item_id": [f"a{i}" for i in range(1, 6)], "title": [f"t{i}" for i in range(1, 6)],
                          "body": ["b1", None, "b3", "b4", "b5"], "tags": [["x"], [], ["x", "y"], ["y"], []],
                          "scenarios": [["homefeed", "ads"], ["homefeed", "search"], ["search"], ["homefeed"], ["homefeed"]]})
    # "email" has no events at all: an empty sequence table
    return RecData("edge", events, items, ["homefeed", "search", "ads", "email"], ["click", "like", "share", "skip"])


@pytest.fixture(scope="module")
def edge_built(spark, tmp_path_factory):
    data = edge_data()
    tmp = tmp_path_factory.mktemp("edge")
    # the catalogue with a null body, as a landed one can have (the pandas build writes "")
    events, items, _ = build_both(spark, data, tmp, reverse=True, buckets=2, edit_items=lambda t: t.set_column(
        2, "body", pa.array(data.items["body"].tolist(), pa.string())))
    return tmp, data, events, items


def test_edge_cases_equal_pandas(edge_built):
    tmp, data, _, _ = edge_built
    assert_same_sources(tmp / "pandas", tmp / "spark", data.scenarios)


def test_edge_windows(edge_built):
    """The expected windows, written out (not only "same as pandas")."""
    tmp, _, _, _ = edge_built
    home = S.read_source_table(tmp / "spark", "seq_homefeed")
    rows = {}
    for r in home.to_pylist():  # file order within a user
        rows.setdefault(r["user_id"], []).append((int(r["event_timestamp"].timestamp()), r["item_ids"], r["timestamps"]))
    assert rows["ua"] == [
        (0, [], []),
        (100, ["a1", "a2", "a3"], [100, 100, 100]),  # one row per second: the state after all of it
        (200, ["a2", "a3", "a4"], [100, 100, 200]), (300, ["a3", "a4", "a5"], [100, 200, 300]),
    ]
    assert "ub" not in rows
    # the last window stamped at the cut-off second holds both of that second's events
    assert rows["uc"][-1] == (600, ["a4", "a3", "a5"], [500, 600, 600])
    assert [r[1] for r in rows["uc"]] == [[], ["a4"], ["a4", "a3", "a5"]]
    ads = S.read_source_table(tmp / "spark", "seq_ads").to_pylist()
    assert [(r["user_id"], r["item_ids"], r["actions"]) for r in ads] == [("ua", [], []), ("ua", ["a1"], ["click"])]
    email = S.read_source_table(tmp / "spark", "seq_email")
    assert email.num_rows == 0 and email.schema.equals(S.canonical_schema("seq_email"))
    pop = {(r["item_id"], int(r["event_timestamp"].timestamp())): r["popularity"]
           for r in S.read_source_table(tmp / "spark", "item_popularity").to_pylist()}
    assert [pop[("a1", t)] for t in (0, 100, 150, 250)] == [0, 1, 2, 3]
    assert [pop[("a2", t)] for t in (0, 100, 150)] == [0, 1, 3]
    assert len(pop) == 5 + 11  # a zero per item, then one row per (item, distinct second)
    items = {r["item_id"]: r for r in S.read_source_table(tmp / "spark", "items").to_pylist()}
    assert items["a2"]["body"] == "" and items["a3"]["tags"] == ["x", "y"]
    assert items["a2"]["event_timestamp"] == EPOCH.to_pydatetime()


# ---- the chunked scale log and the entry point -----------------------------------------------------


def test_scale_log_through_the_cli(spark, tmp_path):
    log = write_scale_log(tmp_path / "log", n_events=2_500, n_users=40, n_items=60, seed=5, chunk=1_000)
    files = sorted(log.events_dir.glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [1_000, 1_000, 500]
    ev = pq.read_table(log.events_dir)
    assert ev.schema.equals(pa.schema([(c, pa.int64() if c in ("ts", "seq") else pa.string()) for c in S.EVENT_INPUT]))
    assert ev["seq"].to_pylist() == list(range(2_500))
    df = ev.to_pandas()
    assert df.duplicated(["user_id", "ts"]).any()  # same-second bursts
    assert df.groupby(["user_id", "scenario"]).size().max() > SEQ_LEN  # windows that slide
    out = tmp_path / "spark"
    assert S.main(["--events", str(log.events_dir), "--items", str(log.items_path), "--out", str(out),
                   "--seq-len", str(SEQ_LEN), "--master", "local[2]"]) == 0
    data = read_scale_log(log)
    build_sources(data, tmp_path / "pandas", SEQ_LEN)
    manifest = read_manifest(out)
    assert manifest["scenarios"] == data.scenarios  # as the catalogue declares them
    # by default a small table still gets one bucket per core (local[2]), so both cores work
    assert {t["buckets"] for t in manifest["layout"]["tables"].values()} == {2}
    assert_same_sources(tmp_path / "pandas", out, data.scenarios)


def test_cli_reports_bad_input(spark, tmp_path, capsys):
    log = write_scale_log(tmp_path / "log", n_events=100, n_users=5, n_items=10, seed=1, chunk=100)
    code = S.main(["--events", str(log.events_dir), "--items", str(log.items_path), "--out", str(tmp_path / "o"),
                   "--scenarios", "homefeed", "--master", "local[2]"])
    assert code == 2
    assert "missing from the dataset's scenarios ['homefeed']" in capsys.readouterr().err


# ---- input errors ----------------------------------------------------------------------------------


def test_unknown_scenario_is_named(spark, edge_built, tmp_path):
    _, _, events, items = edge_built
    with pytest.raises(ValueError, match=r"events use scenario\(s\) \['ads'\] missing from the dataset's scenarios \['homefeed', 'search'\]"):
        S.build_sources_spark(spark, events, items, tmp_path / "out", SEQ_LEN, ["homefeed", "search"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _rewrite(f: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(f)), f)


@pytest.mark.parametrize("column, damage, message", [
    ("seq", lambda t: t.drop_columns(["seq"]), r"column 'seq' is missing \(the stable order position"),
    ("ts", lambda t: t.set_column(t.schema.get_field_index("ts"), "ts", pc.cast(t["ts"], pa.string())),
     r"column 'ts' is string, expected int64"),
    ("user_id", lambda t: t.drop_columns(["user_id"]), r"column 'user_id' is missing"),
])
def test_event_file_schema_errors_name_file_and_column(spark, edge_built, tmp_path, column, damage, message):
    _, _, events, items = edge_built
    bad = shutil.copytree(events, tmp_path / "events")
    _rewrite(bad / "part-00001.parquet", damage)
    with pytest.raises(ValueError, match=message) as e:
        S.build_sources_spark(spark, bad, items, tmp_path / "out", SEQ_LEN, edge_data().scenarios)
    assert str(bad / "part-00001.parquet") in str(e.value)


def test_items_schema_error_names_file_and_column(spark, edge_built, tmp_path):
    _, _, events, items = edge_built
    bad = tmp_path / "items.parquet"
    t = pq.read_table(items)
    pq.write_table(t.set_column(3, "tags", pc.binary_join(t["tags"], ",")), bad)
    with pytest.raises(ValueError, match=r"items\.parquet: items column 'tags' is string, expected list<string>"):
        S.build_sources_spark(spark, events, bad, tmp_path / "out", SEQ_LEN, edge_data().scenarios)


def test_null_is_named_with_its_file(spark, edge_built, tmp_path):
    _, _, events, items = edge_built
    bad = shutil.copytree(events, tmp_path / "events")
    _rewrite(bad / "part-00002.parquet",
             lambda t: t.set_column(1, "item_id", pa.array([None] + t["item_id"].to_pylist()[1:], pa.string())))
    with pytest.raises(ValueError, match=r"events column 'item_id' is null in 1 row") as e:
        S.build_sources_spark(spark, bad, items, tmp_path / "out", SEQ_LEN, edge_data().scenarios)
    assert str(e.value).startswith(f"{bad / 'part-00002.parquet'}: ")


def test_ambiguous_order_fails_and_keeps_the_previous_build(spark, edge_built, tmp_path):
    """Two events of a user at the same second with the same seq have no order: the build fails
    naming them, and, being atomic, leaves the sources it would have replaced untouched."""
    tmp, data, events, items = edge_built
    root = shutil.copytree(tmp / "spark", tmp_path / "root")
    before = {n: S.read_source_table(root, n) for n in table_names(data.scenarios)}
    frame = pq.read_table(events).to_pandas()
    frame.loc[(frame["user_id"] == "ua") & (frame["item_id"] == "a2"), "seq"] = \
        frame.loc[(frame["user_id"] == "ua") & (frame["item_id"] == "a1") & (frame["scenario"] == "homefeed"), "seq"].iloc[0]
    bad = S.write_event_log(frame, tmp_path / "events", files=2)
    with pytest.raises(ValueError, match=r"user ua has two events at ts 100 with the same seq"):
        S.build_sources_spark(spark, bad, items, root, SEQ_LEN, data.scenarios, buckets=2)
    assert not list(root.glob(".staging-*"))
    for n, t in before.items():
        assert S.read_source_table(root, n).equals(t), n


def test_failed_build_keeps_the_previous_sources(spark, edge_built, tmp_path, monkeypatch):
    """A fault in a table written after others were, leaves the old sources whole."""
    tmp, data, events, items = edge_built
    root = shutil.copytree(tmp / "spark", tmp_path / "root")
    before = {n: S.read_source_table(root, n) for n in table_names(data.scenarios)}
    manifest = (root / "scenarios.json").read_text()
    write = S._write_table

    def failing(df, staging, name, key, buckets):
        if name == "seq_homefeed":  # after events, items and popularity were staged
            raise OSError("disk full (simulated)")
        return write(df, staging, name, key, buckets)

    monkeypatch.setattr(S, "_write_table", failing)
    with pytest.raises(OSError, match="simulated"):
        S.build_sources_spark(spark, events, items, root, SEQ_LEN + 1, data.scenarios, buckets=1)
    assert not list(root.glob(".*"))
    assert (root / "scenarios.json").read_text() == manifest
    for n, t in before.items():
        assert S.read_source_table(root, n).equals(t), n


# ---- reading a damaged table ---------------------------------------------------------------------------


def _drop_part(d: Path) -> Path:
    f = d / "part-00001.parquet"
    f.unlink()
    return f


def _drift(d: Path) -> Path:
    f = d / "part-00001.parquet"
    _rewrite(f, lambda t: t.set_column(4, "timestamps", pc.cast(t["timestamps"], pa.list_(pa.int32()))))
    return f


def _stray(d: Path) -> Path:
    f = d / "part-00009.parquet"
    shutil.copy(d / "part-00000.parquet", f)
    return f


def _truncate(d: Path) -> Path:
    f = d / "part-00000.parquet"
    _rewrite(f, lambda t: t.slice(0, 1))
    return f


@pytest.mark.parametrize("damage, message", [
    (_drop_part, r"missing; the manifest lists 3 partition file\(s\) of 'seq_homefeed'"),
    (_drift, r"column 'timestamps' is list<int32>, the table's other partitions have list<int64>"),
    (_stray, r"not in the manifest's 3 partition file\(s\)"),
    (_truncate, r"1 rows, the manifest says"),
])
def test_reader_names_the_damaged_file(synthetic_built, tmp_path, damage, message):
    tmp, _ = synthetic_built
    root = shutil.copytree(tmp / "spark", tmp_path / "root")
    assert len(S.check_source_table(root, "seq_homefeed")) == 3
    bad = damage(root / "seq_homefeed.parquet")
    with pytest.raises(S.SourceTableError, match=message) as e:
        S.read_source_table(root, "seq_homefeed")
    assert str(bad) in str(e.value)


def test_reader_needs_the_manifest_of_a_directory(edge_built, tmp_path):
    tmp, _, _, _ = edge_built
    root = shutil.copytree(tmp / "spark", tmp_path / "root")
    m = json.loads((root / "scenarios.json").read_text())
    del m["layout"]["tables"]["seq_ads"]
    (root / "scenarios.json").write_text(json.dumps(m))
    with pytest.raises(S.SourceTableError, match=r"seq_ads\.parquet: a directory table that .* does not list"):
        S.read_source_table(root, "seq_ads")
    with pytest.raises(S.SourceTableError, match=r"source table 'seq_nope' is missing"):
        S.read_source_table(root, "seq_nope")
