"""The plain-Python logic of each pipeline step; the KFP components are thin shells over these.

Every step reads its inputs from paths, writes its outputs through ``atomic_output`` (all or
nothing) and prints a progress line with its wall time. Steps that touch what serves traffic
(publish, deploy) either finish or leave the index alias and the deployed model as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from redrec.pipeline.config import PipelineParams
from redrec.pipeline.gate import GateDecision, decide, format_gate
from redrec.pipeline.outputs import atomic_output, fault_point, kill_point, progress

# ---- data ------------------------------------------------------------------------------------


def prepare_data(params: PipelineParams, out_dir: str | Path) -> dict:
    """Load the dataset, keep the requested scenarios, write events/items parquet + meta.json."""
    from redrec.data import RecData, load_dataset

    with progress("prepare-data"):
        data = load_dataset(params.dataset, **params.dataset_args)
        if params.scenarios:
            unknown = sorted(set(params.scenarios) - set(data.scenarios))
            if unknown:
                raise ValueError(f"parameter 'scenarios' names {unknown}, which dataset {params.dataset!r} does not have; "
                                 f"it has {data.scenarios}")
            keep = list(params.scenarios)
            items = data.items.copy()
            items["scenarios"] = [[s for s in ss if s in keep] for ss in items["scenarios"]]
            items = items[items["scenarios"].map(len) > 0].reset_index(drop=True)
            events = data.events[data.events["scenario"].isin(keep) & data.events["item_id"].isin(set(items["item_id"]))]
            data = RecData(data.name, events, items, [s for s in data.scenarios if s in keep], data.actions, data.reports)
        desc = data.describe()
        with atomic_output(out_dir) as tmp:
            tmp.mkdir(parents=True)
            data.events.to_parquet(tmp / "events.parquet", index=False)
            data.items.to_parquet(tmp / "items.parquet", index=False)
            (tmp / "meta.json").write_text(json.dumps({"name": data.name, "scenarios": data.scenarios,
                                                       "actions": data.actions, "describe": desc}, indent=2))
        print(f"[redrec-pipeline] data: {desc}", flush=True)
    return desc


def load_prepared(data_dir: str | Path):
    """The ``RecData`` written by ``prepare_data``, read with the parquet adapter: every step,
    and ``redrec train`` on a TrainJob's nodes, then encodes items, scenarios and actions in the
    same order."""
    from redrec.data.parquet import load_parquet

    d = Path(data_dir)
    return load_parquet(d / "events.parquet", d / "items.parquet")


def _split(params: PipelineParams, data):
    from redrec.data import chronological_split, encode

    cfg = params.experiment_config("unused")
    enc = encode(data)
    return enc, chronological_split(enc, cfg.test_events, cfg.valid_events)


# ---- features --------------------------------------------------------------------------------


def label_rows(enc, split) -> pd.DataFrame:
    """One entity row per user at the end of its training window (the time of its first held-out
    event, or just after its last event when it has none): the features the model may see."""
    has_heldout = split.train_end < enc.offsets[1:]
    first_heldout = enc.ts[np.minimum(split.train_end, len(enc.ts) - 1)]
    label_ts = np.where(has_heldout, first_heldout, enc.ts[enc.offsets[1:] - 1] + 1)
    return pd.DataFrame({"user_id": enc.user_ids, "ts": label_ts.astype(np.int64)})


def _feature_repo(params: PipelineParams, seq_len: int):
    """The Feast repo the step fills, on the offline engine the parameters select."""
    from redrec.features.store import FeatureRepo

    # the online store the config names: serving reads what this step materialises
    fs_yaml = params.feature_store_yaml or None
    if fs_yaml is not None and not Path(fs_yaml).is_file():
        raise ValueError(f"parameter 'feature_store_yaml': {fs_yaml} does not exist (mount the chart's Feast "
                         "ConfigMap there, or leave it empty for the embedded SQLite store)")
    offline = "spark" if params.offline_engine == "spark" else "duckdb"
    repo = FeatureRepo(Path(params.workspace) / "feast", seq_len=seq_len, fs_yaml=fs_yaml, offline_store=offline)
    if params.offline_engine == "spark" and repo.engine != "spark":
        raise ValueError(f"parameter 'offline_engine' is spark but feature_store_yaml {fs_yaml} names offline_store "
                         f"{repo.store.config.offline_store.type!r}: set its offline_store to type: spark (chart value "
                         "feast.offlineStore.type=spark renders it as feature_store.offline.yaml) or offline_engine to auto")
    if params.offline_engine == "pandas" and repo.engine == "spark":
        raise ValueError(f"parameter 'offline_engine' is pandas but feature_store_yaml {fs_yaml} names the Spark "
                         "offline store: set offline_engine to auto or spark")
    return repo


def _training_set_pandas(repo, data, enc, split, out_dir) -> dict:
    from redrec.features.definitions import seq_view_name
    from redrec.features.sources import SEQ_FEATURES

    rep = repo.build_sources(data)
    repo.apply()
    repo.materialize()
    ts = repo.training_set(label_rows(enc, split))
    df = ts.df
    label = (df["event_timestamp"].astype("datetime64[us, UTC]").astype("int64") // 10**6).to_numpy()
    leaks, filled = 0, 0
    for s in repo.scenarios:
        col = f"{seq_view_name(s)}__{SEQ_FEATURES[2]}"
        for t, lab in zip(df[col], label):
            if t is not None and not (isinstance(t, float) and np.isnan(t)) and len(t):
                filled += 1
                leaks += int(max(t) >= lab)
    if leaks:
        raise RuntimeError(f"training set: {leaks} history window(s) hold events at or after their label time; "
                           "the point-in-time join leaked (check the sources' timestamps)")
    import pyarrow as pa

    from redrec.train.shards import write_training_set

    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        # sorted by user, in row groups the training ranks can share out (redrec.train.shards)
        write_training_set(pa.Table.from_pandas(df, preserve_index=False), tmp)
        _write_report(tmp, len(df), filled, repo, ts.seconds, rep.rows, str(ts.duplicates))
    return _read_report(out_dir)


def _training_set_spark(repo, data, enc, split, out_dir) -> dict:
    """Sources by the Spark job, the join by Feast's Spark offline store, the set as user shards."""
    from redrec.features.spark_training import build_repo_sources_spark, write_training_set_spark

    rep = build_repo_sources_spark(repo, data)
    repo.apply()
    repo.materialize()
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ts = write_training_set_spark(repo, label_rows(enc, split), tmp / "shards")
        _write_report(tmp, ts.rows, ts.windows_filled, repo, ts.seconds, rep.rows, "none (one entity row per user)")
    return _read_report(out_dir)


def _write_report(tmp: Path, rows: int, filled: int, repo, seconds: float, source_rows: dict, duplicates: str) -> None:
    report = {"rows": rows, "windows_filled": filled, "scenarios": repo.scenarios, "seq_len": repo.seq_len,
              "offline_engine": "spark" if repo.engine == "spark" else "pandas",
              "online_store": type(repo.store.config.online_store).__name__,
              "seconds": round(seconds, 2), "source_rows": source_rows, "duplicates": duplicates}
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))


def _read_report(out_dir) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())


def build_features(params: PipelineParams, data_dir: str | Path, out_dir: str | Path) -> dict:
    """Feast: write the sources, ``apply`` the definitions, materialise the online store (what
    serving reads), and build the training set with ``get_historical_features`` at each user's
    training cut-off. The set is checked point-in-time: no history event at or after its label.

    On the Spark engine the sources come from the Spark job and the training set is written by
    Spark as user-sorted shards (``<out>/shards``) that training ranks read their share of."""
    with progress("features"):
        data = load_prepared(data_dir)
        enc, split = _split(params, data)
        seq_len = params.experiment_config("unused").model.user_tower.max_len
        repo = _feature_repo(params, seq_len)
        if repo.engine == "spark":
            report = _training_set_spark(repo, data, enc, split, out_dir)
        else:
            report = _training_set_pandas(repo, data, enc, split, out_dir)
        print(f"[redrec-pipeline] training set ({report['offline_engine']}): {report['rows']} rows, "
              f"{report['windows_filled']} scenario windows, point-in-time ok", flush=True)
    return report


# ---- train -----------------------------------------------------------------------------------


def new_version() -> str:
    """A sortable, collection-name-safe model version: UTC time + 4 hex of entropy."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "_" + os.urandom(2).hex()


def resolve_launcher(params: PipelineParams) -> str:
    if params.launcher != "auto":
        return params.launcher
    return "trainjob" if params.nodes * max(params.gpus_per_node, 1) > 1 else "in-process"


def _training_set_digest(training_set_dir: str | Path) -> dict:
    """SHA-256 over the training set's parquet bytes (the pandas file, or the Spark path's shards
    in name order, streamed) and its row count from the footers."""
    import pyarrow.parquet as pq

    d = Path(training_set_dir)
    files = [d / "training_set.parquet"] if (d / "training_set.parquet").exists() else sorted((d / "shards").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{d}: no training_set.parquet and no shards/*.parquet; rebuild it with the build-features step")
    h = hashlib.sha256()
    rows = 0
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        rows += pq.ParquetFile(f).metadata.num_rows
    return {"training_set_sha256": h.hexdigest()[:16], "training_set_rows": int(rows)}


def _streamed_input(params: PipelineParams, cfg, data, enc, split, shards: Path, meta: dict):
    """Training batches streamed from the Spark path's shards (flat memory in the number of
    users); only the validation users' histories are rebuilt in memory, the same users the
    in-memory run validates on. Returns that rebuilt data and the batch source."""
    from redrec.pipeline.training_data import from_training_set, validation_users
    from redrec.train.stream import ShardedTrainSource

    val = from_training_set(data, enc, split, shards, users=validation_users(enc, cfg.train.valid_max_users))
    # the full encoding's vocabularies and eligibility are the rebuilt data's (same catalogue)
    source = ShardedTrainSource(shards, enc)
    print(f"[redrec-pipeline] training input streamed from {shards} ({source.n_users} users); "
          f"{val.users} validation users rebuilt in memory", flush=True)
    meta["training_input"] = {"source": "feast get_historical_features (spark), streamed shards",
                              "users": source.n_users, "validation_users": val.users}
    return val.data, source


def train(params: PipelineParams, data_dir: str | Path, training_set_dir: str | Path, out_dir: str | Path,
          version: str | None = None) -> dict:
    """Train RED-Rec and export the serving checkpoint to ``out_dir``; returns its version.

    In-process (one machine, DeepSpeed in a single rank) or, on a cluster with more than one
    device, as a Kubeflow Trainer ``TrainJob`` on the ``deepspeed-distributed`` runtime that
    runs ``redrec train`` on every node and exports to the shared workspace.
    """
    from redrec.experiment import train_variant, training_record
    from redrec.model.checkpoint import export_checkpoint

    with progress("train"):
        version = version or new_version()
        scratch = Path(params.workspace) / "scratch" / f"train-{version}"
        cfg = params.experiment_config(scratch)
        lineage = _training_set_digest(training_set_dir)
        launcher = resolve_launcher(params)
        meta = {"version": version, "dataset": params.dataset, "launcher": launcher, **lineage}
        try:
            from redrec.data.parquet import save_parquet
            from redrec.pipeline.training_data import from_training_set

            # the model learns from what Feast's point-in-time join returned, not from the raw log
            data = load_prepared(data_dir)
            enc, split = _split(params, data)
            shards = Path(training_set_dir) / "shards"
            source = None
            if shards.is_dir() and launcher == "in-process":
                data, source = _streamed_input(params, cfg, data, enc, split, shards, meta)
            else:
                feast_data = from_training_set(data, enc, split, training_set_dir)
                print(f"[redrec-pipeline] {feast_data.summary()}", flush=True)
                meta["training_input"] = {"source": "feast get_historical_features", "history_events": feast_data.history_events,
                                          "log_training_events": feast_data.log_training_events, "users": feast_data.users}
                data = feast_data.data
            if launcher == "trainjob":
                from redrec.pipeline.trainjob import TrainJobSpec, run_trainjob

                train_dir = scratch / "data"
                train_dir.mkdir(parents=True, exist_ok=True)
                save_parquet(data, train_dir)  # the TrainJob's nodes read it from the shared workspace
                exported = run_trainjob(TrainJobSpec.from_params(params, cfg, train_dir, scratch, version, meta))
                with atomic_output(out_dir) as tmp:
                    shutil.copytree(exported, tmp)
                    fault_point("train", params.inject_fault, "after the TrainJob, while writing the model")
            else:
                enc, split = _split(params, data)
                trainer, fit = train_variant(cfg, "redrec", data, enc, split, scratch / "redrec", resume=False,
                                             train_source=source)
                meta.update(variant="redrec", **training_record(trainer, fit, enc, split))
                with atomic_output(out_dir) as tmp:
                    export_checkpoint(trainer.module, tmp, enc.item_ids, meta)
                    fault_point("train", params.inject_fault, "after writing part of the model")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"[redrec-pipeline] model version {version} ({launcher})", flush=True)
    return meta


# ---- evaluate --------------------------------------------------------------------------------


def _index_cfg(params: PipelineParams, dim: int = 64):
    from redrec.index.config import IndexConfig

    if not params.milvus_uri:
        raise ValueError("parameter 'milvus_uri' is empty: `redrec pipeline run` starts the workspace's Milvus Lite "
                         "server and passes its URI; on a cluster pass the Milvus service URI")
    return IndexConfig(uri=params.milvus_uri, name=params.index_alias, dim=dim,
                       token=os.environ.get("MILVUS_TOKEN", ""))


def production_version(params: PipelineParams) -> str | None:
    """The model version that serves traffic: the one whose index the alias points at (publish
    and deploy move together; a failed deploy moves the alias back)."""
    from redrec.index.milvus import current_version

    return current_version(_index_cfg(params))


def _load_production(params: PipelineParams, version: str):
    """The production model from the model store (where every pipeline deploy writes it), else
    from the BentoML store (a release made before the model store existed)."""
    from redrec.serving.registry import ModelSource

    store = ModelSource(params.model_store_uri())
    if version in store.versions():
        return (*store.load(version), store.store.manifest(version))
    legacy = ModelSource()
    if version in legacy.versions():
        return (*legacy.load(version), {})
    raise LookupError(f"production model {version} (what alias '{params.index_alias}' serves) is in neither the model "
                      f"store {params.model_store_uri()} nor the BentoML model store")


def _production(params: PipelineParams, version: str | None, enc, score):
    """(results or recorded metrics dict or None, how it was obtained, why it could not be)."""
    if version is None:
        return None, None, None
    try:
        pm, pmeta, manifest = _load_production(params, version)
    except Exception as e:  # noqa: BLE001 - reported to the gate, which then refuses
        return None, None, f"{type(e).__name__}: {e}"
    own = list(pmeta.get("item_ids", []))
    if own == enc.item_ids:
        return score(pm), "re-scored on this split", None
    if list(pm.cfg.scenarios) == list(enc.scenarios) and list(pm.cfg.actions) == list(enc.actions):
        new = len(set(enc.item_ids) - set(own))
        return score(pm.for_catalogue(own, enc.item_ids)), f"re-scored on this split ({new} items it never saw score 0)", None
    from redrec.release.releases import Release

    rel = Release.from_manifest(manifest)
    if rel is not None and rel.metrics:
        return rel.metrics, "metrics recorded at its release (scenarios or actions changed: it cannot be re-scored)", None
    return None, None, (f"production model {version} cannot be re-scored (its scenarios {pm.cfg.scenarios} / actions "
                        f"{pm.cfg.actions} differ from the data's) and its release records no metrics")


def evaluate(params: PipelineParams, data_dir: str | Path, model_dir: str | Path, metrics_out: str | Path,
             table_out: str | Path) -> dict:
    """Full-ranking metrics of the candidate, the production model (re-scored on the same split)
    and popularity; writes metrics JSON and a Markdown table."""
    from redrec.evaluate import evaluate_model, evaluate_popularity, format_table
    from redrec.model.checkpoint import load_for_serving
    from redrec.train.batches import BatchBuilder

    with progress("evaluate"):
        data = load_prepared(data_dir)
        enc, split = _split(params, data)
        model, info = load_for_serving(model_dir)
        if info["item_ids"] != enc.item_ids:
            raise ValueError(f"{model_dir}: the model's catalogue differs from the prepared data's; "
                             "evaluate the model on the data it was trained with")

        def score(m):
            b = BatchBuilder(enc, m.cfg.user_tower.max_len, m.cfg.window, m.cfg.history_mode)
            return evaluate_model(m, b, enc, split)

        results = {"candidate": score(model), "popularity": evaluate_popularity(enc, split)}
        prod_v = production_version(params)
        prod, prod_how, prod_error = _production(params, prod_v, enc, score)
        if prod is not None and not isinstance(prod, dict):
            results["production"] = prod
        fault_point("evaluate", params.inject_fault, "after scoring, before writing the metrics")
        out = {"candidate_version": info.get("version"), "production_version": prod_v, "production_source": prod_how,
               "results": {k: v.as_dict() for k, v in results.items()},
               # the candidate's validation curve, for the evaluation page (absent from TrainJob exports)
               "candidate_curve": info.get("history") or []}
        if isinstance(prod, dict):
            out["results"]["production"] = prod
        if prod_error:
            out["production_error"] = prod_error
        table = format_table(results, enc.scenarios, ref="popularity")
        with atomic_output(metrics_out) as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        with atomic_output(table_out) as tmp:
            tmp.write_text(f"# Evaluation of model {info.get('version')}\n\nFull ranking, protocol "
                           f"{split.protocol}; production: {prod_v or 'none'} ({prod_how or '-'})\n\n```\n{table}\n```\n")
        print(table, flush=True)
    return out


def gate(params: PipelineParams, metrics_path: str | Path, report_out: str | Path | None = None) -> GateDecision:
    with progress("gate"):
        m = json.loads(Path(metrics_path).read_text())
        if m.get("production_version") and m["results"].get("production") is None:
            # a production model that could not be scored is not "no production model": never auto-pass
            d = GateDecision(False, f"production model {m['production_version']} could not be compared: "
                                    f"{m.get('production_error') or 'no results'}; promote by hand with "
                                    "`redrec release promote` if the candidate is wanted")
        else:
            d = decide(m["results"]["candidate"], m["results"].get("production"), params.gate_metrics, params.gate_margin,
                       popularity=m["results"].get("popularity"))
        text = format_gate(d, m.get("candidate_version"), m.get("production_version"))
        if report_out is not None:
            with atomic_output(report_out) as tmp:
                tmp.write_text(text)
        print(text, flush=True)
    return d


# ---- publish ---------------------------------------------------------------------------------


class StaleGate(RuntimeError):
    """Production changed between this run's evaluation and its release."""


def _check_production_unchanged(params: PipelineParams, metrics_path: str | Path | None) -> None:
    """The gate compared the candidate with the production model of its evaluation: if another
    release landed since (this run waited for its lease), that decision is about a model that no
    longer serves, and releasing on it would replace a release nobody compared with."""
    if metrics_path is None:
        return
    m = json.loads(Path(metrics_path).read_text())
    compared, now = m.get("production_version"), production_version(params)
    if compared != now:
        raise StaleGate(f"production moved from {compared or 'nothing'} to {now or 'nothing'} since this run's "
                        f"evaluation; its gate compared candidate {m.get('candidate_version')} with {compared or 'nothing'}, "
                        "so nothing was released: rerun the pipeline, or promote it by hand "
                        f"(`redrec release promote {m.get('candidate_version')}`) after comparing")


def publish(params: PipelineParams, data_dir: str | Path, model_dir: str | Path,
            metrics_path: str | Path | None = None, run_id: str = "") -> dict:
    """Publish the model's item embeddings as a new Milvus collection, verify it against exact
    search, then move the alias (``redrec.index.milvus.publish``); a failure leaves the alias.

    Holds the release lease of run ``run_id`` (``redrec.release.lease``) and, when it succeeds,
    hands it to the run's deploy step: no other release moves the alias or the serving
    deployment in between. With ``metrics_path`` (the evaluation), refuses when production is no
    longer the model the gate compared with."""
    import redrec.index.milvus as milvus
    from redrec.release.lease import release_lease

    with progress("publish"), release_lease(params, run_id).hold(hand_over=True):
        _check_production_unchanged(params, metrics_path)
        model_dir = Path(model_dir)
        info = json.loads((model_dir / "config.json").read_text())
        version = info["version"]
        ids = json.loads((model_dir / "item_ids.json").read_text())
        vecs = np.load(model_dir / "item_embeddings.npy")
        items = load_prepared(data_dir).items.set_index("item_id")
        scen = [list(items.at[i, "scenarios"]) for i in ids]
        cfg = _index_cfg(params, dim=int(vecs.shape[1]))
        if params.inject_fault == "publish":
            real = milvus._build_index

            def failing_build(*a, **kw):  # the collection exists and holds rows when this fires
                real(*a, **kw)
                fault_point("publish", "publish", "after inserting and indexing, before verification")

            milvus._build_index = failing_build
        res = milvus.publish(cfg, version, ids, vecs, scen, set(items.index))
        out = {"version": version, "collection": res.collection, "alias": res.alias,
               "previous_collection": res.previous_collection, "recall": res.recall, "seconds": res.seconds,
               "n_items": res.n_items}
        print(f"[redrec-pipeline] index: alias {res.alias} -> {res.collection} (recall {res.recall:.3f}, "
              f"previous {res.previous_collection})", flush=True)
    return out


# ---- deploy ----------------------------------------------------------------------------------


def deploy(params: PipelineParams, model_dir: str | Path, previous_collection: str | None,
           metrics_path: str | Path | None = None, run_id: str = "") -> dict:
    """Write the model and its release record to the model store and roll the serving deployment
    to it, under the release lease run ``run_id``'s publish handed over (released at the end).

    If anything fails, the alias is moved back to ``previous_collection`` (publish moved it) and
    the previous deployment keeps serving; serving never pairs a model with another model's
    index meanwhile (``redrec.index.search.paired_collection``). If the alias does not name this
    model's collection any more (another release took the lease after this run's expired), it
    deploys nothing and leaves the alias to that release.
    """
    from redrec.index.milvus import _alias_target
    from redrec.pipeline.deploy import deploy_model
    from redrec.release.lease import release_lease
    from redrec.release.releases import Release

    with progress("deploy"), release_lease(params, run_id).hold():
        model_dir = Path(model_dir)
        info = json.loads((model_dir / "config.json").read_text())
        version = info["version"]
        metrics = json.loads(Path(metrics_path).read_text())["results"]["candidate"] if metrics_path else None
        digest = {k: info[k] for k in ("training_set_sha256", "training_set_rows", "dataset") if k in info}
        own = _index_cfg(params).collection(version)
        rel = Release(model_version=version, collection=own, index_alias=params.index_alias, metrics=metrics,
                      data_digest=digest, created=time.time())
        now = _alias_target(_index_cfg(params))
        if now != own:
            raise RuntimeError(f"alias '{params.index_alias}' names {now}, not {own} that this run published: another "
                               f"release moved it since; model {version} is not deployed (promote it with "
                               "`redrec release promote` if it is still wanted)")
        try:
            kill_point("deploy:start")
            out = deploy_model(params, model_dir, version, rel.as_meta())
        except BaseException:
            _restore_alias(params, previous_collection)
            raise
    return out


def _restore_alias(params: PipelineParams, previous_collection: str | None) -> None:
    from redrec.index.milvus import _alias_target, client

    cfg = _index_cfg(params)
    c = client(cfg)
    if previous_collection is None:
        if _alias_target(cfg) is not None:
            c.drop_alias(cfg.name)
    elif _alias_target(cfg) != previous_collection:
        c.alter_alias(previous_collection, cfg.name)
    print(f"[redrec-pipeline] deploy failed: alias {cfg.name} restored to {previous_collection}", flush=True)


# ---- drift reference -------------------------------------------------------------------------


def record_reference(params: PipelineParams, data_dir: str | Path, model_dir: str | Path,
                     metrics_path: str | Path | None = None) -> dict:
    """Every event the deployed model was built from becomes the drift monitor's reference
    (``redrec.drift.reference``): the held-out tail included, so the reference holds whole
    histories and out-of-sample model outputs, as live traffic does. A reference cut at each
    user's training end lacks every user's latest events, and a live window (which continues
    them) would always look like longer sequences."""
    from redrec.drift.reference import record_reference as record

    with progress("drift-reference"):
        data = load_prepared(data_dir)
        info = json.loads((Path(model_dir) / "config.json").read_text())
        meta = {"model_version": info.get("version"), "dataset": params.dataset}
        if metrics_path is not None:
            # the online hit rate is later compared with these offline numbers, per scenario
            cand = json.loads(Path(metrics_path).read_text())["results"]["candidate"]
            meta["offline_metrics"] = cand["per_scenario"]
        out = Path(params.workspace) / "drift" / "reference"
        path = record(data.events, data.items, out, model_dir=Path(model_dir), meta=meta, requests_at=params.drift_reference_at)
        # the drift CronJob mounts its report dir as a sub-path of this claim: one missing there
        # would be created by the kubelet owned by root, which the job's user cannot write
        (Path(params.workspace) / "drift" / "reports").mkdir(parents=True, exist_ok=True)
        print(f"[redrec-pipeline] drift reference: {path}", flush=True)
    return {"path": str(path), "events": int(len(data.events))}
