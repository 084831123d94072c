"""Train and evaluate RED-Rec and its baselines on one dataset with one split and one loss.

This is what ``make run`` (until the pipeline lands), ``redrec quality`` and ``bench/quality.py``
call. Every variant shares the data, split, negatives count, trainer and evaluation; they differ
only where the variant must (see ``ModelConfig.for_variant``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, Field

from redrec.data import RecData, chronological_split, encode, leave_one_out_split, load_dataset
from redrec.evaluate import EvalResult, evaluate_model, evaluate_popularity, format_table
from redrec.model.item_tower import cached_item_reps
from redrec.model.recommender import ModelConfig, Variant
from redrec.train.trainer import TrainConfig, Trainer


class ExperimentConfig(BaseModel):
    dataset: str = "movielens-1m"
    dataset_args: dict = Field(default_factory=dict)
    variants: list[Variant] = Field(default_factory=lambda: ["sasrec", "single-scenario", "redrec"])
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    test_events: int = Field(5, ge=1)
    valid_events: int = Field(5, ge=1)
    leave_one_out: bool = Field(True, description="also report the standard single-scenario leave-one-out protocol")
    out_dir: Path = Path("build/experiment")


def build_model_config(template: ModelConfig, variant: str, data: RecData, n_items: int) -> ModelConfig:
    return template.model_copy(update={"variant": variant, "scenarios": list(data.scenarios), "actions": list(data.actions), "n_items": n_items}).for_variant()


def train_variant(cfg: ExperimentConfig, variant: str, data: RecData, enc, split, out_dir: Path, log=print, resume: bool = True):
    mcfg = build_model_config(cfg.model, variant, data, enc.n_items)
    cache = cached_item_reps(data.items, mcfg.item_tower, Path(os.environ.get("REDREC_CACHE", "build/cache"))) if mcfg.item_source.startswith("cache") else None
    tokens = None
    if mcfg.item_source == "end-to-end":
        from redrec.model.item_tower import ItemTower, item_text

        tok = ItemTower(mcfg.item_tower).tokenize([""] + [item_text(t, b, g) for t, b, g in zip(data.items["title"], data.items["body"], data.items["tags"])])
        tokens = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    trainer = Trainer(mcfg, cfg.train, enc, split, out_dir, item_cache=cache, item_tokens=tokens, log=log)
    fit = trainer.fit(resume=resume)
    return trainer, fit


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    t0 = time.time()
    data = load_dataset(cfg.dataset, **cfg.dataset_args)
    enc = encode(data)
    split = chronological_split(enc, cfg.test_events, cfg.valid_events)
    log(f"data: {data.describe()}  ({time.time() - t0:.1f}s)")
    results: dict[str, EvalResult] = {"popularity": evaluate_popularity(enc, split)}
    loo_split = leave_one_out_split(enc) if cfg.leave_one_out else None
    loo: dict[str, EvalResult] = {"popularity": evaluate_popularity(enc, loo_split, all_items=True)} if loo_split is not None else {}
    timings = {}
    for variant in cfg.variants:
        tv = time.time()
        trainer, fit = train_variant(cfg, variant, data, enc, split, cfg.out_dir / variant, log, resume=False)
        results[variant] = evaluate_model(trainer.module, trainer.builder, enc, split)
        if loo_split is not None:
            # the same trained model, scored under the leave-one-out protocol (last event of each user)
            loo[variant] = evaluate_model(trainer.module, trainer.builder, enc, loo_split, all_items=True)
        timings[variant] = {"train_s": fit["seconds"], "total_s": time.time() - tv, "steps": fit["steps"]}
        log(f"{variant}: trained {fit['steps']} steps in {fit['seconds']:.0f}s; ndcg@10 {results[variant].overall['ndcg@10']:.4f}")
    ref = "sasrec" if "sasrec" in results else None
    table = format_table(results, data.scenarios, ref=ref)
    out = {
        "dataset": data.describe(),
        "protocol": split.protocol,
        "config": json.loads(cfg.model_dump_json()),
        "results": {k: v.as_dict() for k, v in results.items()},
        "leave_one_out": {k: v.as_dict() for k, v in loo.items()},
        "timings": timings,
        "seconds": time.time() - t0,
        "table": table,
    }
    if loo:
        out["table_loo"] = format_table(loo, [], ref=ref)
    return out
