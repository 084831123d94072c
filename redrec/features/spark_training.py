"""The training set on the Spark path: Feast's Spark offline store joins, Spark writes the shards.

Where :meth:`FeatureRepo.training_set` brings the joined rows back as one pandas frame, this keeps
them in Spark from the entity rows to the files: ``get_historical_features(...).to_spark_df()`` is
written as ``parts`` parquet files, each holding whole users sorted by user id, with a manifest of
file names and row counts (``redrec.train.shards``), so every training rank can read its own share
without anybody holding the whole set. Same semantics as the pandas path: features strictly before
the label time (the entity rows ask Feast for one microsecond earlier, as ``training_set`` does),
one row per user, the label time given back as ``event_timestamp``.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from redrec.features.definitions import SERVICE_TRAINING_USER, TIMESTAMP, seq_view_name
from redrec.features.sources import SEQ_FEATURES


@dataclass
class SparkTrainingSet:
    path: Path
    rows: int
    files: int
    seconds: float
    leaks: int  # windows holding an event at or after their label time (must be 0)
    windows_filled: int


def repo_spark_session(repo):
    """The session Feast's Spark offline store of ``repo`` uses (its ``spark_conf``), so the source
    job and the join share one driver."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark import (
        get_spark_session_or_start_new_with_repoconfig,
    )

    return get_spark_session_or_start_new_with_repoconfig(store_config=repo.store.config.offline_store)


def build_repo_sources_spark(repo, data):
    """``repo``'s sources from ``data`` by the Spark job, and its views re-declared over them: the
    log is written as the job's input first, with its stable order made explicit (``seq``)."""
    from redrec.features.spark_sources import build_sources_spark, write_event_log, write_items

    log = write_event_log(data, Path(repo.data_dir) / "event_log")
    items = write_items(data.items, Path(repo.data_dir) / "items_input.parquet")
    rep = build_sources_spark(repo_spark_session(repo), log, items, repo.source_dir, repo.seq_len,
                              list(data.scenarios), name=data.name)
    repo.scenarios, repo.seq_len = rep.scenarios, rep.seq_len
    repo.refresh_definitions()
    return rep


def _entity_frame(spark, entity):
    """A Spark frame of ``user_id`` (string) and ``event_timestamp`` (UTC) from pandas rows with
    ``ts`` (unix s) or ``event_timestamp``, or from a Spark frame with the same columns."""
    from pyspark.sql import DataFrame, functions as F

    if isinstance(entity, DataFrame):
        sdf = entity
    else:
        if "user_id" not in entity.columns:
            raise KeyError(f"entity rows need a 'user_id' column; they have {list(entity.columns)}")
        pdf = pd.DataFrame({"user_id": entity["user_id"].astype(str)})
        if TIMESTAMP in entity.columns:
            pdf[TIMESTAMP] = pd.to_datetime(entity[TIMESTAMP], utc=True).astype("datetime64[us, UTC]")
        elif "ts" in entity.columns:
            pdf[TIMESTAMP] = pd.to_datetime(entity["ts"].astype("int64"), unit="s", utc=True).astype("datetime64[us, UTC]")
        else:
            raise KeyError("entity rows need the label time as 'event_timestamp' or 'ts' (unix s)")
        sdf = spark.createDataFrame(pdf)
    if "ts" in sdf.columns and TIMESTAMP not in sdf.columns:
        sdf = sdf.withColumn(TIMESTAMP, F.timestamp_seconds(F.col("ts")))
    missing = [c for c in ("user_id", TIMESTAMP) if c not in sdf.columns]
    if missing:
        raise KeyError(f"entity rows lack {missing}; they have {sdf.columns}")
    return sdf.select(F.col("user_id").cast("string").alias("user_id"), F.col(TIMESTAMP).cast("timestamp").alias(TIMESTAMP))


def write_training_set_spark(repo, entity, out_dir: str | Path, parts: int = 8) -> SparkTrainingSet:
    """The point-in-time training set of ``repo`` (a :class:`FeatureRepo` on the Spark offline
    store) for ``entity`` rows, written to ``out_dir`` as ``parts`` user-sorted part files.

    Refuses duplicate users (the trainer reads one row per user) and a join that leaked: a window
    with an event at or after its label time. Nothing is left at ``out_dir`` on failure."""
    from pyspark.sql import functions as F

    from redrec.train.shards import write_training_set_manifest

    if repo.engine != "spark":
        raise ValueError(f"{repo.fs_yaml}: offline_store.type is not 'spark'; use FeatureRepo.training_set on this store")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    t0 = time.perf_counter()
    spark = repo_spark_session(repo)
    ent = _entity_frame(spark, entity)
    dup = ent.groupBy("user_id").count().where("count > 1")
    first_dup = dup.limit(3).collect()
    if first_dup:
        raise ValueError(f"entity rows hold users more than once (e.g. {[r['user_id'] for r in first_dup]}): "
                         "the training set must have one row per user at its training cut-off")
    one_us = F.expr("INTERVAL 1 MICROSECOND")
    query = ent.withColumn(TIMESTAMP, F.col(TIMESTAMP) - one_us)
    fs = repo.store.get_feature_service(SERVICE_TRAINING_USER)
    job = repo.store.get_historical_features(entity_df=query, features=fs, full_feature_names=True)
    got = job.to_spark_df().withColumn(TIMESTAMP, F.col(TIMESTAMP) + one_us)
    cols = ["user_id", TIMESTAMP] + [f"{seq_view_name(s)}__{f}" for s in repo.scenarios for f in SEQ_FEATURES]
    missing = [c for c in cols if c not in got.columns]
    if missing:
        raise KeyError(f"Feast's Spark join returned no columns {missing}")
    got = got.select(*cols)

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # ranges of user ids, each file sorted: the reader proves from the footers alone that no
        # user is in two files (redrec.train.shards), where hash parts need every id read once
        (got.repartitionByRange(parts, "user_id").sortWithinPartitions("user_id")
            .write.mode("error").option("parquet.block.size", 8 << 20).parquet(str(tmp)))
        written = spark.read.parquet(str(tmp))
        label_s = F.unix_timestamp(F.col(TIMESTAMP))
        ts_cols = [f"{seq_view_name(s)}__timestamps" for s in repo.scenarios]
        leak = F.lit(0)
        filled = F.lit(0)
        for c in ts_cols:
            has = F.col(c).isNotNull() & (F.size(F.col(c)) > 0)
            leak = leak + F.when(has & (F.array_max(F.col(c)) >= label_s), 1).otherwise(0)
            filled = filled + F.when(has, 1).otherwise(0)
        stats = written.agg(F.count(F.lit(1)).alias("rows"), F.sum(leak).alias("leaks"), F.sum(filled).alias("filled"),
                            F.countDistinct("user_id").alias("users")).collect()[0]
        n_in = ent.count()
        if stats["rows"] != n_in or stats["users"] != n_in:
            raise RuntimeError(f"Feast's Spark join returned {stats['rows']} rows for {stats['users']} users; "
                               f"{n_in} entity rows went in")
        if stats["leaks"]:
            raise RuntimeError(f"training set: {stats['leaks']} history window(s) hold events at or after their label "
                               "time; the point-in-time join leaked (check the sources' timestamps)")
        manifest = write_training_set_manifest(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SparkTrainingSet(out, int(stats["rows"]), len(manifest["files"]), time.perf_counter() - t0,
                            int(stats["leaks"]), int(stats["filled"]))
