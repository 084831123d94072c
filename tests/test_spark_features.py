"""The Spark offline path (issue 34): Feast's Spark offline store returns the same training set,
row for row, as the embedded DuckDB path, and the shards it writes hold every user once."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from redrec.data.dataset import RecData
from redrec.features.definitions import seq_view_name
from redrec.features.sources import SEQ_FEATURES
from redrec.features.spark import java_missing
from redrec.features.store import FeatureRepo

pytestmark = [pytest.mark.slow, pytest.mark.skipif(java_missing() is not None, reason=str(java_missing()))]
warnings.filterwarnings("ignore", message="The spark offline store is an experimental feature")
SEQ_LEN = 3
SCENARIOS = ["homefeed", "search", "ads"]


def edge_world() -> tuple[RecData, pd.DataFrame]:
    """Hand-made events for the cases a point-in-time join gets wrong, and the entity rows to ask.

    - u1: three homefeed events in the same second (file order c, a, b must survive), more events
      than the window holds, one search event;
    - u2: homefeed only (no row at all in the search and ads tables: nulls, not empty windows);
    - u3: an ads event exactly at its label time (strictly before excludes it: the empty window)
      and a homefeed event one second before;
    - u4: asked at a time before its first event (every window empty) and again later.
    """
    rows = [
        ("u1", "c", "homefeed", "click", 100), ("u1", "a", "homefeed", "click", 100), ("u1", "b", "homefeed", "like", 100),
        ("u1", "d", "homefeed", "click", 110), ("u1", "e", "search", "click", 120), ("u1", "f", "homefeed", "click", 130),
        ("u2", "a", "homefeed", "click", 50), ("u2", "b", "homefeed", "click", 60),
        ("u3", "c", "homefeed", "click", 299), ("u3", "d", "ads", "click", 300), ("u3", "e", "search", "like", 300),
        ("u4", "a", "search", "click", 500), ("u4", "b", "ads", "like", 510),
    ]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario", "action", "ts"])
    items = pd.DataFrame({"item_id": list("abcdef"), "title": list("abcdef"), "body": "", "tags": [[]] * 6,
                          "scenarios": [SCENARIOS] * 6, "image": None})
    data = RecData("edge", ev, items, SCENARIOS, ["click", "like"])
    entity = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4", "u4"], "ts": [200, 1000, 300, 400, 600]})
    return data, entity


def cells(df: pd.DataFrame, scenarios: list[str]) -> list[tuple]:
    """Rows as plain Python values (lists, None), ordered by user and label time."""
    df = df.assign(event_timestamp=pd.to_datetime(df["event_timestamp"], utc=True).astype("datetime64[us, UTC]"))
    df = df.sort_values(["user_id", "event_timestamp"], kind="stable")
    cols = [f"{seq_view_name(s)}__{f}" for s in scenarios for f in SEQ_FEATURES]

    def plain(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return [x.item() if hasattr(x, "item") else x for x in v]

    return [(r[0], r[1].value, *map(plain, r[2:])) for r in df[["user_id", "event_timestamp", *cols]].itertuples(index=False)]


@pytest.fixture(scope="module")
def edge():
    return edge_world()


@pytest.fixture(scope="module")
def repos(tmp_path_factory, edge):
    data, _ = edge
    root = tmp_path_factory.mktemp("spark-feast")
    duck = FeatureRepo(root / "duckdb", seq_len=SEQ_LEN)
    duck.build_sources(data)
    duck.apply()
    spark = FeatureRepo(root / "spark", offline_store="spark", source_dir=duck.source_dir, seq_len=SEQ_LEN)
    spark.apply()
    return duck, spark


def test_spark_offline_store_joins_the_same_rows_as_duckdb(repos, edge):
    data, entity = edge
    duck, spark = repos
    assert spark.engine == "spark" and duck.engine == "file"
    a = cells(duck.training_set(entity).df, data.scenarios)
    b = cells(spark.training_set(entity).df, data.scenarios)
    assert a == b
    got = {(r[0], r[1] // 10**9): r[2:] for r in a}  # Timestamp.value is in ns
    hf, se, ad = 0, 3, 6  # item_ids of each scenario in a row's cells
    assert got[("u1", 200)][hf] == ["b", "d", "f"] and got[("u1", 200)][se] == ["e"]  # the last SEQ_LEN only
    assert got[("u2", 1000)][se] is None and got[("u2", 1000)][ad] is None  # never seen in search or ads
    assert got[("u3", 300)][ad] == [] and got[("u3", 300)][hf] == ["c"]  # the event at the cut-off is not a feature
    assert got[("u4", 400)][se] == [] and got[("u4", 600)][ad] == ["b"]


def test_same_second_events_keep_their_file_order_in_both_stores(repos, edge):
    data, _ = edge
    duck, spark = repos
    ask = pd.DataFrame({"user_id": ["u1"], "ts": [101]})
    a = cells(duck.training_set(ask).df, data.scenarios)
    assert a == cells(spark.training_set(ask).df, data.scenarios)
    assert a[0][2] == ["c", "a", "b"] and a[0][4] == [100, 100, 100]


def spark_path_repo(root, data, seq_len: int) -> FeatureRepo:
    """The Spark path end to end: the event log as parquet, the sources by the Spark job, the
    views over its directories through Feast's Spark offline store."""
    from redrec.features.spark_training import build_repo_sources_spark

    repo = FeatureRepo(root / "repo", offline_store="spark", seq_len=seq_len)
    build_repo_sources_spark(repo, data)
    assert json.loads((repo.source_dir / "scenarios.json").read_text())["engine"] == "spark"
    assert (repo.source_dir / "seq_homefeed.parquet").is_dir()  # partitioned, not the pandas file
    repo.apply()
    return repo


def shard_users(path) -> list[list[str]]:
    from redrec.train.shards import TrainingSetShards

    return [[u for rb in TrainingSetShards(path, r, 2).iter_users(64, columns=["user_id"]) for u in rb.column("user_id").to_pylist()]
            for r in range(2)]


def test_spark_path_end_to_end_equals_the_pandas_path(tmp_path, repos, edge):
    """Spark-built sources, Feast's Spark join and Spark-written shards give the pandas path's
    training set row for row; the shards split the users between two ranks, each once."""
    from redrec.features.spark_training import write_training_set_spark

    data, entity = edge
    duck, _ = repos
    repo = spark_path_repo(tmp_path, data, SEQ_LEN)
    assert cells(repo.training_set(entity).df, data.scenarios) == cells(duck.training_set(entity).df, data.scenarios)
    once = entity.drop_duplicates("user_id", keep="last")
    ts = write_training_set_spark(repo, once, tmp_path / "shards", parts=2)
    assert ts.rows == 4 and ts.leaks == 0 and ts.files == 2
    assert cells(pd.read_parquet(tmp_path / "shards"), data.scenarios) == cells(duck.training_set(once).df, data.scenarios)
    a, b = shard_users(tmp_path / "shards")
    assert sorted(a + b) == sorted(once["user_id"]) and a and b and not set(a) & set(b)
    with pytest.raises(ValueError, match="more than once"):
        write_training_set_spark(repo, entity, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_pipeline_features_step_on_spark_trains_from_streamed_shards(tmp_path, synthetic_small):
    """`offline_engine: spark` through the pipeline's own steps: the features step writes the
    shards, equal row for row to the pandas step's set, and the train step streams them."""
    from redrec.data.parquet import save_parquet
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import build_features, train

    save_parquet(synthetic_small, tmp_path / "data")
    exp = {"model": {"user_tower": {"max_len": 8}}, "train": {"max_steps": 3, "batch_size": 16, "valid_max_users": 40}}
    reps = {}
    for engine in ("pandas", "spark"):
        params = PipelineParams(dataset="synthetic", experiment=exp, workspace=str(tmp_path / f"ws-{engine}"),
                                offline_engine=engine)
        reps[engine] = build_features(params, tmp_path / "data", tmp_path / f"ts-{engine}")
    assert reps["spark"]["offline_engine"] == "spark" and reps["spark"]["rows"] == reps["pandas"]["rows"] == 120
    assert reps["spark"]["windows_filled"] == reps["pandas"]["windows_filled"]
    scen = list(synthetic_small.scenarios)
    assert cells(pd.read_parquet(tmp_path / "ts-spark" / "shards"), scen) == \
        cells(pd.read_parquet(tmp_path / "ts-pandas" / "training_set.parquet"), scen)
    meta = train(params, tmp_path / "data", tmp_path / "ts-spark", tmp_path / "model", version="v1")
    assert meta["training_input"]["source"].endswith("streamed shards") and meta["training_input"]["users"] == 120
    assert (tmp_path / "model").is_dir() and meta["train"]["steps"] >= 1


def test_cli_builds_the_sources_on_spark_and_serves_the_same_histories(tmp_path, capsys):
    """`redrec features build --engine spark` materialises from the Spark job's directories: the
    online histories equal the pandas build's."""
    from redrec.cli import main

    got = {}
    for engine in ("pandas", "spark"):
        args = ["--data-dir", str(tmp_path / engine)]
        assert main(["features", "build", *args, "--engine", engine, "--dataset", "synthetic", "--dataset-arg", "n_users=30",
                     "--dataset-arg", "n_items=60", "--dataset-arg", "seed=4", "--seq-len", "5"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["materialized"] and out["rows"]["items"] == 60
        assert main(["features", "history", *args, "u0000001", "u0000017"]) == 0
        got[engine] = json.loads(capsys.readouterr().out)
    assert got["spark"] == got["pandas"] and got["spark"]["u0000001"]
    assert (tmp_path / "spark" / "feast_sources" / "seq_search.parquet").is_dir()
