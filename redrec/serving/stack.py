"""Assemble a local serving stack from a dataset and exported checkpoints: models into the model
store (or the BentoML store), the Feast repo built and materialised, each arm's item index
published to Milvus, and the serving config written. Used by the tests and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from redrec.data.dataset import RecData
from redrec.features.store import FeatureRepo
from redrec.index.config import IndexConfig
from redrec.index.milvus import list_versions as index_versions
from redrec.index.milvus import publish
from redrec.serving import registry


def publish_checkpoint(ckpt_dir: str | Path, data: RecData, milvus_uri: str, alias: str, version: str) -> None:
    ckpt_dir = Path(ckpt_dir)
    item_ids = json.loads((ckpt_dir / "item_ids.json").read_text())
    emb = np.load(ckpt_dir / "item_embeddings.npy")
    scen = dict(zip(data.items["item_id"].astype(str), data.items["scenarios"]))
    cfg = IndexConfig(uri=milvus_uri, name=alias, dim=int(emb.shape[1]))
    if any(v.version == version and v.status == "ready" for v in index_versions(cfg)):
        return
    publish(cfg, version, item_ids, emb, [list(scen[i]) for i in item_ids])


def prepare(
    data: RecData,
    models: dict[str, str | Path],
    work_dir: str | Path,
    milvus_uri: str,
    arms: list[dict],
    *,
    experiment: str = "exp",
    holdout_share: float = 0.0,
    seq_len: int = 20,
    serving: dict | None = None,
    build_features: bool = True,
    model_store: str | None = None,
) -> Path:
    """``arms``: ``[{name, model_version, index_alias, share}]``; each alias gets its arm's model
    published. ``model_store``: a model store URI to put the models in (default: the BentoML
    store). Returns the config path (``feature_server_url`` is left for the caller to set)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if model_store:
        from redrec.release.model_store import ModelStore

        store = ModelStore(model_store)
        for version, ckpt in models.items():
            if not store.has(version):
                store.put(ckpt, version)
    else:
        known = set(registry.list_versions())
        for version, ckpt in models.items():
            if version not in known:
                registry.save_model(ckpt, version)
    repo_dir = work / "feast"
    if build_features:
        repo = FeatureRepo(repo_dir, seq_len=seq_len)
        repo.build_sources(data)
        repo.apply()
        repo.materialize()
    for a in arms:
        publish_checkpoint(models[a["model_version"]], data, milvus_uri, a.get("index_alias") or "redrec_items",
                           a["model_version"])
    cfg = {
        "scenarios": list(data.scenarios),
        "log_level": "INFO",
        "experiment": {"name": experiment, "holdout_share": holdout_share, "arms": arms},
        "serving": {"max_k": 50, "port": 3000, "feature_server_url": "",
                    "serving_log": {"dir": str(work / "serving-log"), "per_pod_file": True}, **(serving or {})},
        "milvus": {"uri": milvus_uri, "collection_alias": "redrec_items"},
        "feast": {"repo_path": str(repo_dir.resolve())},
    }
    if model_store:
        cfg["model_store"] = {"uri": model_store, "config_poll_s": 0.5}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
