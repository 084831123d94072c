"""Publish an exported serving checkpoint's item embeddings, with eligibility from the catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from redrec.index.config import IndexConfig
from redrec.index.milvus import PublishRefused, PublishResult, publish


def read_checkpoint_items(ckpt_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """``(item_ids, embeddings [n, dim])`` of a checkpoint written by ``export_checkpoint``."""
    ckpt_dir = Path(ckpt_dir)
    for name in ("item_ids.json", "item_embeddings.npy"):
        if not (ckpt_dir / name).exists():
            raise PublishRefused(f"checkpoint {ckpt_dir}: {name} is missing; export it with "
                                 "redrec.model.checkpoint.export_checkpoint (or `redrec train`)")
    return json.loads((ckpt_dir / "item_ids.json").read_text()), np.load(ckpt_dir / "item_embeddings.npy")


def publish_checkpoint(cfg: IndexConfig, ckpt_dir: str | Path, version: str, items: pd.DataFrame, **kw) -> PublishResult:
    """Publish ``ckpt_dir`` as ``version``. ``items`` is the catalogue (``item_id``, ``scenarios``):
    every checkpoint item must be in it (refused otherwise) and takes its eligibility from it.
    ``cfg.dim`` follows the checkpoint; the served collection's dim is still checked by ``publish``."""
    missing = [c for c in ("item_id", "scenarios") if c not in items.columns]
    if missing:
        raise PublishRefused(f"catalogue lacks column(s) {missing}; it needs item_id and scenarios (a list per item)")
    item_ids, emb = read_checkpoint_items(ckpt_dir)
    scen = dict(zip(items["item_id"].astype(str), items["scenarios"]))
    if emb.ndim == 2 and emb.shape[1] != cfg.dim:
        cfg = cfg.model_copy(update={"dim": int(emb.shape[1])})
    # an item absent from the catalogue gets None: publish refuses it by name
    return publish(cfg, version, item_ids, emb, [scen.get(str(i)) for i in item_ids], set(scen), **kw)
