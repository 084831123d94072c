"""Train and evaluate RED-Rec, its baselines and its ablations under two protocols.

This is what ``redrec quality`` and ``bench/quality.py`` call. Every model shares the data, split,
loss, trainer, stopping rule and full-ranking evaluation; they differ only where the model must
(``MODELS`` and ``ModelConfig.for_variant``). Three protocols (DESIGN.md, "Evaluation"):

- ``multi-scenario``: chronological last-``test_events`` split; every model ranks the eligible pool
  of the target's scenario, history masked;
- ``loo``: the standard single-scenario leave-one-out protocol that published numbers use:
  scenarios collapsed into one, train to n-2, validate on n-1, test on n, whole catalogue;
- ``new-items``: item cold start. Items first seen in the last ``new_items_frac`` of the log
  are never trained on (nor are they softmax negatives or validation candidates); each user's
  test is their first event on one, ranked against the whole catalogue. Scenarios are collapsed
  as in ``loo``: the test is one event per user, so a per-scenario pool would tell the model
  the target's scenario, and ``loo`` is then the same models' warm-item reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from redrec.data import RecData, chronological_split, encode, leave_one_out_split, load_dataset
from redrec.data.split import new_items_split
from redrec.evaluate import (EvalResult, evaluate_content_knn, evaluate_model, evaluate_new_item_popularity, evaluate_popularity,
                             format_table)
from redrec.model.item_tower import ItemTowerConfig, cached_item_reps
from redrec.model.recommender import ModelConfig
from redrec.train.trainer import TrainConfig, Trainer

# name -> (variant, ModelConfig overrides). The ablations remove one part of RED-Rec each.
MODELS: dict[str, tuple[str, dict]] = {
    "sasrec": ("sasrec", {}),
    # SASRec whose item table starts from RED-Rec's cached text vectors (see POST_VARIANT)
    "sasrec-text": ("sasrec", {}),
    "single-scenario": ("single-scenario", {}),
    "redrec": ("redrec", {}),
    "redrec-no-mixing": ("redrec", {"mixing": False}),
    "redrec-no-side-info": ("redrec", {"user_tower": {"side_info": False}}),
    # no scenario queries: the mixed sequence's last state, the same vector for every scenario
    "redrec-no-queries": ("redrec", {"user_tower": {"querying": "last"}}),
    "redrec-k2": ("redrec", {"user_tower": {"queries_per_scenario": 2}}),  # two interests per scenario
    "redrec-query-tokens": ("redrec", {"user_tower": {"querying": "scenario"}}),  # queries inside the decoder
    # the objective's window, whichever way the dataset's config sets it: the next item only (as
    # SASRec) or the next five (the paper's next-window); one of the two is the config's own
    "redrec-next-item": ("redrec", {"window": 1}),
    "redrec-next-window": ("redrec", {"window": 5}),
    "redrec-id-items": ("redrec", {"item_source": "id"}),
    "redrec-frozen-items": ("redrec", {"item_source": "cache-frozen"}),
}
ABLATIONS = [m for m in MODELS if m.startswith("redrec-")]


def _text_items(template: ModelConfig) -> dict:
    # RED-Rec's own item source where it reads the text, else the fine-tuned text table
    return {"item_source": template.item_source if template.item_source != "id" else "cache-finetune"}


# name -> overrides applied after ``for_variant``, for what a variant would otherwise force: here
# sasrec's "id" items, kept out of recommender.py so SASRec's textbook definition stays the one
# place that says what SASRec is. Read from the template, so sasrec-text follows RED-Rec's config.
POST_VARIANT = {"sasrec-text": _text_items}
Protocol = Literal["multi-scenario", "loo", "new-items"]
COLLAPSED = "all"
CONTENT_KNN = "content-knn"
CONTENT_KNN_WHITENED = "content-knn-whitened"
NEW_ITEM_POPULARITY = "new-item-popularity"


class ExperimentConfig(BaseModel):
    dataset: str = "movielens-1m"
    dataset_args: dict = Field(default_factory=dict)
    variants: list[str] = Field(default_factory=lambda: ["sasrec", "single-scenario", "redrec"],
                                description="models to train: " + ", ".join(MODELS))
    protocols: list[Protocol] = Field(default_factory=lambda: ["multi-scenario", "loo"])
    model: ModelConfig = Field(default_factory=ModelConfig)
    # per-model overrides of the model template (e.g. SASRec's dropout), applied after MODELS'
    model_overrides: dict[str, dict] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    test_events: int = Field(5, ge=1)
    valid_events: int = Field(5, ge=1)
    new_items_frac: float = Field(0.1, gt=0, lt=1, description="new-items protocol: items first seen in this last share of events (by count) are new")
    new_items_hours: float = Field(24.0, gt=0, description="new-item popularity: events counted in this many hours after the cut-off")
    content_knn: bool = Field(True, description="report the content-kNN baseline over cached MiniLM vectors (no training)")
    out_dir: Path = Path("build/experiment")

    @field_validator("variants")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODELS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {list(MODELS)}")
        return v


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model_config(template: ModelConfig, name: str, data: RecData, n_items: int, overrides: dict | None = None) -> ModelConfig:
    variant, over = MODELS.get(name, (name, {}))
    raw = _merge(_merge(template.model_dump(), over), overrides or {})
    raw.update(variant=variant, scenarios=list(data.scenarios), actions=list(data.actions), n_items=n_items)
    mcfg = ModelConfig.model_validate(raw).for_variant()
    if name in POST_VARIANT:
        mcfg = ModelConfig.model_validate(_merge(mcfg.model_dump(), POST_VARIANT[name](template)))
    return mcfg


def is_redrec_itself(template: ModelConfig, name: str) -> bool:
    """Whether ablation ``name`` changes nothing in this config (e.g. ``redrec-next-item`` where the
    config already trains on the next item): training it would repeat ``redrec``."""
    variant, over = MODELS[name]
    base = template.model_dump()
    return variant == "redrec" and name != "redrec" and _merge(base, over) == base


def collapse_scenarios(data: RecData) -> RecData:
    """One scenario for the leave-one-out protocol: no model is told where the next event happens."""
    events = data.events.assign(scenario=COLLAPSED)
    items = data.items.assign(scenarios=[[COLLAPSED]] * len(data.items))
    return RecData(data.name, events, items, [COLLAPSED], list(data.actions), list(data.reports))


def train_variant(cfg: ExperimentConfig, variant: str, data: RecData, enc, split, out_dir: Path, log=print, resume: bool = True,
                  train_source=None):
    """``train_source``: training batches streamed from the training set's shards
    (``redrec.train.stream.ShardedTrainSource``); ``data``/``enc`` then only need the validation users."""
    mcfg = build_model_config(cfg.model, variant, data, enc.n_items, cfg.model_overrides.get(variant))
    cache = cached_item_reps(data.items, mcfg.item_tower, Path(os.environ.get("REDREC_CACHE", "build/cache"))) if mcfg.item_source.startswith("cache") else None
    tokens = None
    if mcfg.item_source == "end-to-end":
        from redrec.model.item_tower import ItemTower, item_text

        tok = ItemTower(mcfg.item_tower).tokenize([""] + [item_text(t, b, g) for t, b, g in zip(data.items["title"], data.items["body"], data.items["tags"])])
        tokens = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    trainer = Trainer(mcfg, cfg.train, enc, split, out_dir, item_cache=cache, item_tokens=tokens, log=log,
                      train_source=train_source)
    fit = trainer.fit(resume=resume)
    return trainer, fit


def training_record(trainer, fit: dict, enc, split) -> dict:
    """What a serving checkpoint records of its training (the same keys whichever launcher ran it):
    the fit summary, the validation curve and the best weights' validation metrics."""
    valid = trainer.best_valid_result or evaluate_model(trainer.module, trainer.builder, enc, split, on="valid")
    return {"train": {k: v for k, v in fit.items() if k != "history"}, "history": fit.get("history", []),
            "valid": valid.as_dict()}


def content_vectors(data: RecData, whiten: bool = False) -> np.ndarray:
    """[n_items + 1, D] cached MiniLM vectors in encoded order (``encode`` numbers ``data.items``
    rows 1..n in order, as the trainer's item table does), row 0 the padding. ``whiten``: centred
    and PCA-whitened over the catalogue, which lifted MiniLM's content kNN 5x on ML-1M
    (bench/results/encoders.json): the stronger text-only baseline."""
    reps = cached_item_reps(data.items, ItemTowerConfig(backbone="minilm", whiten=whiten),
                            Path(os.environ.get("REDREC_CACHE", "build/cache")))
    return np.concatenate([np.zeros((1, reps.shape[1]), reps.dtype), reps])


def run_protocol(cfg: ExperimentConfig, protocol: Protocol, data: RecData, log=print) -> dict:
    t0 = time.time()
    if protocol in ("loo", "new-items"):
        data = collapse_scenarios(data)
    enc = encode(data)
    train_enc, info = enc, {}
    if protocol == "new-items":
        split, cutoff, is_new = new_items_split(enc, cfg.new_items_frac)
        # new items are no one's softmax negative nor validation candidate: no gradient reaches
        # them; the test below ranks the whole catalogue (all_items), new items included
        train_enc = dataclasses.replace(enc, eligible=enc.eligible & ~is_new[None, :])
        info = {"cutoff_ts": cutoff, "new_items": int(is_new.sum()), "test_users": int(len(split.users_with_test(enc))),
                "new_items_hours": cfg.new_items_hours}
        log(f"[new-items] cut-off ts {cutoff}: {info['new_items']} new items, {info['test_users']} test users")
    elif protocol == "loo":
        split = leave_one_out_split(enc)
    else:
        split = chronological_split(enc, cfg.test_events, cfg.valid_events)
    whole = protocol != "multi-scenario"
    results: dict[str, EvalResult] = {"popularity": evaluate_popularity(enc, split, all_items=whole)}
    if protocol == "new-items":
        results[NEW_ITEM_POPULARITY] = evaluate_new_item_popularity(enc, split, cutoff, cfg.new_items_hours)
    if cfg.content_knn:
        results[CONTENT_KNN] = evaluate_content_knn(enc, split, content_vectors(data), all_items=whole)
        results[CONTENT_KNN_WHITENED] = evaluate_content_knn(enc, split, content_vectors(data, whiten=True), all_items=whole)
    models: dict[str, dict] = {}
    for name in cfg.variants:
        tv = time.time()
        log(f"[{protocol}] training {name}")
        trainer, fit = train_variant(cfg, name, data, train_enc, split, cfg.out_dir / protocol / name, log, resume=False)
        results[name] = evaluate_model(trainer.module, trainer.builder, enc, split, all_items=whole)
        models[name] = {"train_s": fit["seconds"], "total_s": time.time() - tv, "steps": fit["steps"], "stopped": fit["stopped"],
                        "best_step": fit["best_step"], "best_valid": fit["best_valid"], "curve": fit["history"],
                        "config": json.loads(trainer.mcfg.model_dump_json())}
        log(f"[{protocol}] {name}: {fit['steps']} steps in {fit['seconds']:.0f}s ({fit['stopped']}); "
            f"test ndcg@10 {results[name].overall['ndcg@10']:.4f}")
    ref = "sasrec" if "sasrec" in results else "popularity"
    described = {"multi-scenario": split.protocol, "loo": "leave-one-out (scenarios collapsed, whole catalogue)",
                 "new-items": f"{split.protocol}: first new-item event per user, scenarios collapsed, whole catalogue"}
    return {
        "protocol": described[protocol],
        **info,
        "scenarios": list(data.scenarios) if protocol == "multi-scenario" else [],
        "results": {k: v.as_dict() for k, v in results.items()},
        "models": models,
        "table": format_table(results, data.scenarios if protocol == "multi-scenario" else [], ref=ref),
        "seconds": time.time() - t0,
    }


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    t0 = time.time()
    data = load_dataset(cfg.dataset, **cfg.dataset_args)
    log(f"data: {data.describe()}  ({time.time() - t0:.1f}s)")
    out = {"dataset": data.describe(), "config": json.loads(cfg.model_dump_json()), "protocols": {}}
    for protocol in cfg.protocols:
        out["protocols"][protocol] = run_protocol(cfg, protocol, data, log)
    out["seconds"] = time.time() - t0
    return out
