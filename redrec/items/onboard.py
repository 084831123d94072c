"""Onboarding new items without a retrain: ``redrec items add`` and the pipeline/Job entry point.

For every model version serving names (its experiment arms):
1. the file is checked whole (``redrec.items.validate``): nothing is written when any row is bad;
2. the model must have a text path (item_source ``cache-residual``, or another cached-text
   source), and the encoder here must reproduce the text vectors the model trained on (its
   checkpoint's probe, re-encoded from the probe items' text in Feast): an item embedded by a
   different encoder would land in another space without any error;
3. the items' text is encoded once per encoder, mapped by each model's adapter and head
   (``ServingModel.text_reps``: exactly what training gives an item whose id residual is zero);
4. writes, in this order: Feast ``item_text`` rows (eligibility, text), each arm's own Milvus
   collection (upsert; ``redrec.index.add_items``), then one batch per model version in the model
   store (``redrec.items.added``), the commit point serving pods poll. A failure before the batch
   leaves the items unserved and the call can be retried (every write is an upsert).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from redrec.items import added
from redrec.items.validate import ItemLimits, load_new_items

log = logging.getLogger(__name__)
MIN_PROBE_COSINE = 0.999


class OnboardingRefused(ValueError):
    pass


@dataclass
class OnboardReport:
    items: list[str]
    versions: dict[str, dict] = field(default_factory=dict)  # version -> batch, collections
    seconds: dict[str, float] = field(default_factory=dict)
    finished_at: float = 0.0

    def as_dict(self) -> dict:
        return {"items": len(self.items), "item_ids": self.items[:20], "versions": self.versions,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "finished_at": self.finished_at}


def encode_texts(tower: dict, items: pd.DataFrame, seed: int = 0, cache_root: str | Path | None = None) -> np.ndarray:
    """The item encoder's vectors for ``items`` (title, body, tags), built exactly as the training
    cache's raw vectors are (``item_tower._raw_reps``: same config, same seed before the tower is
    built, so a decoder's [ITEM] slot is the same), without caching them."""
    from redrec.model.item_tower import ItemTower, ItemTowerConfig

    torch.manual_seed(seed)
    return ItemTower(ItemTowerConfig.model_validate(tower), cache_root=cache_root).encode_catalogue(items)


def _probe_texts(repo, item_ids: list[str]) -> pd.DataFrame:
    from redrec.features.definitions import ITEM_TEXT_VIEW

    cols = [f"{ITEM_TEXT_VIEW}:{c}" for c in ("title", "body", "tags")]
    res = repo.online_columns(cols, "item_id", item_ids)
    df = pd.DataFrame({c: res[f"{ITEM_TEXT_VIEW}__{c}"] for c in ("title", "body", "tags")})
    missing = [i for i, t in zip(item_ids, df["title"]) if t is None]
    if missing:
        raise OnboardingRefused(f"Feast has no item_text for the model's probe items {missing[:3]}: the encoder cannot be "
                                "checked against the model (materialise the item_text view)")
    df["tags"] = [list(t or []) for t in df["tags"]]
    df["body"] = [b or "" for b in df["body"]]
    return df


def check_encoder(model, info: dict, got: np.ndarray) -> float:
    """The lowest cosine between the model's probe and ``got``, this encoder's vectors of the
    probe items."""
    probe = getattr(model, "text_probe", None)
    ids = (info.get("item_text") or {}).get("probe_items")
    if probe is None or not ids:
        raise OnboardingRefused(f"model {info['model_version']} carries no text probe (exported before onboarding "
                                "existed): re-export or retrain it to onboard items")
    got = got / np.linalg.norm(got, axis=1, keepdims=True).clip(1e-12)
    cos = float((got * probe).sum(1).min())
    if cos < MIN_PROBE_COSINE:
        raise OnboardingRefused(
            f"the item encoder here does not reproduce model {info['model_version']}'s text vectors (cosine {cos:.4f} "
            f"on its probe items, need >= {MIN_PROBE_COSINE}): install the encoder it was trained with "
            f"({info['model']['item_tower']})")
    return cos


def onboard_items(cfg, items_file: str | Path, limits: ItemLimits | None = None, cache_root: str | Path | None = None) -> OnboardReport:
    """Onboard the items of ``items_file`` into every model version ``cfg`` (a ``ServingConfig``)
    serves. Raises ``ItemsRefused`` / ``OnboardingRefused`` (nothing written) on bad input."""
    from redrec.index.add_items import check_target, upsert_items
    from redrec.index.config import IndexConfig
    from redrec.model.checkpoint import load_for_serving
    from redrec.release.model_store import ModelStore
    from redrec.serving.features import open_repo

    t0 = time.perf_counter()
    if not cfg.model_store.uri:
        raise OnboardingRefused("model_store.uri is empty: items are added beside the served models in the model store "
                                "(a bento that bundles its model is read-only; serve from a model store)")
    store = ModelStore(cfg.model_store.uri, cfg.model_store.cache_dir)
    versions = list(dict.fromkeys(a.model_version for a in cfg.experiment.arms))
    models = {}
    known: set[str] = set()
    for v in versions:
        model, info = load_for_serving(store.path(v))
        info["model_version"] = v
        if model.item_adapter is None:
            raise OnboardingRefused(f"model {v} (item_source {info['model']['item_source']!r}) has no text path: a new item "
                                    "cannot be embedded without a retrain; train with item_source 'cache-residual'")
        if info["model"]["item_tower"].get("whiten"):
            raise OnboardingRefused(f"model {v} reads whitened text vectors, whose transform was fitted on its training "
                                    "catalogue and is not carried by the checkpoint: onboarding supports unwhitened encoders")
        models[v] = (model, info)
        known |= set(info["item_ids"]) | added.added_ids(store, v)
    lim = limits or ItemLimits(max_id_len=cfg.serving.max_item_id_len)
    df = load_new_items(items_file, list(cfg.scenarios), known, lim)
    scen = [list(s) for s in df["scenarios"]]
    targets = {}  # (alias, version) -> IndexConfig: every arm's own collection, checked before any write
    for arm in cfg.experiment.arms:
        model, info = models[arm.model_version]
        icfg = IndexConfig(uri=cfg.milvus.uri, token=cfg.milvus.token, name=cfg.alias_for(arm.name), dim=model.cfg.dim,
                           timeout_s=max(cfg.milvus.timeout_s, 30.0))
        check_target(icfg, arm.model_version, scen)
        targets[(icfg.name, arm.model_version)] = icfg
    report = OnboardReport(list(df["item_id"]))
    report.seconds["check"] = time.perf_counter() - t0

    repo = open_repo(cfg)
    t = time.perf_counter()
    vecs: dict[str, np.ndarray] = {}
    for v, (model, info) in models.items():
        tower = info["model"]["item_tower"]
        key = json.dumps(tower, sort_keys=True)
        seed = int((info.get("item_text") or {}).get("encoder_seed", 0))
        ids = (info.get("item_text") or {}).get("probe_items") or []
        probe = _probe_texts(repo, ids) if ids else df.iloc[:0]
        if key not in vecs:  # the items and the probe in one pass: the encoder loads once
            cols = ["title", "body", "tags"]
            both = encode_texts(tower, pd.concat([df[cols], probe[cols]], ignore_index=True), seed, cache_root)
            vecs[key], got = both[: len(df)], both[len(df):]
        else:
            got = encode_texts(tower, probe, seed, cache_root)
        cos = check_encoder(model, info, got)
        report.versions[v] = {"probe_cosine": round(cos, 6)}
    report.seconds["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    repo.write_items(df)
    report.seconds["feast"] = time.perf_counter() - t
    t = time.perf_counter()
    out = {}
    for v, (model, info) in models.items():
        text = vecs[json.dumps(info["model"]["item_tower"], sort_keys=True)]
        with torch.no_grad():
            reps = model.text_reps(text)
            out[v] = (text, reps.numpy(), model.head(reps).numpy())
    for (alias, v), icfg in targets.items():
        name = upsert_items(icfg, v, list(df["item_id"]), out[v][2], scen)
        report.versions[v].setdefault("collections", []).append(name)
    report.seconds["milvus"] = time.perf_counter() - t
    t = time.perf_counter()
    for v, (text, reps, emb) in out.items():
        report.versions[v]["batch"] = added.write_batch(store, v, list(df["item_id"]), scen, text, reps, emb)
    report.seconds["model_store"] = time.perf_counter() - t
    report.seconds["total"] = time.perf_counter() - t0
    report.finished_at = time.time()
    log.info("onboarded %d items into %s in %.1fs", len(df), versions, report.seconds["total"])
    return report


def onboard_from_config_path(config_path: str | Path, items_path: str | Path) -> dict:
    """``onboard_items`` for callers holding only paths (the KFP component): the serving config
    file and the items file; the report as a dict. Refusals raise as in ``onboard_items``."""
    from redrec.serving.config import ServingConfig

    return onboard_items(ServingConfig.from_yaml(config_path), items_path).as_dict()
