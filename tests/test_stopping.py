"""Early stopping counts optimizer steps since the best validation, with a minimum budget."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from redrec.data import chronological_split, encode
from redrec.experiment import ExperimentConfig, train_variant
from redrec.train.trainer import TrainConfig


def _fit(tmp_path, data, **train):
    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": ["sasrec"],
        "model": {"item_source": "id", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
        "train": {"batch_size": 16, "progress": False, "warmup_steps": 2, "max_steps": 300, **train}, "out_dir": str(tmp_path)})
    enc = encode(data)
    _, fit = train_variant(cfg, "sasrec", data, enc, chronological_split(enc), tmp_path / "sasrec", log=lambda *_: None, resume=False)
    return cfg.train, fit


def _stop_points(cfg: TrainConfig, history: list[dict]) -> list[int]:
    """The validation steps at which the rule says stop, replayed from the curve."""
    best, best_step, stops = None, 0, []
    for p in history:
        v = p["valid"]["ndcg@10"]
        if best is None or v > best:
            best, best_step = v, p["step"]
        if cfg.should_stop(p["step"], best_step):
            stops.append(p["step"])
    return stops


def test_a_training_stops_at_the_first_validation_the_rule_allows(tmp_path, synthetic_small):
    cfg, fit = _fit(tmp_path, synthetic_small, eval_every=3, patience_steps=9, lr=0.003)
    assert fit["stopped"] == "early stopping"
    stops = _stop_points(cfg, fit["history"])
    assert stops and stops[0] == fit["history"][-1]["step"] == fit["steps"]
    assert fit["steps"] - fit["best_step"] >= 9


def test_step_patience_outlasts_validation_patience_and_honours_the_minimum(tmp_path, synthetic_small):
    """Validation every step and a learning rate too small to move anything: the metric never
    improves on its first value, so "5 validations without a new best" would have stopped at
    step 6. 20 steps of patience run to step 21; min_steps 30 to step 30."""
    cfg, fit = _fit(tmp_path / "a", synthetic_small, eval_every=1, patience_steps=20, lr=1e-9)
    values = [p["valid"]["ndcg@10"] for p in fit["history"]]
    assert len(set(values)) == 1 and fit["best_step"] == 1
    assert fit["stopped"] == "early stopping" and fit["steps"] == 21
    cfg, fit = _fit(tmp_path / "b", synthetic_small, eval_every=1, patience_steps=5, min_steps=30, lr=1e-9)
    assert fit["stopped"] == "early stopping" and fit["steps"] == 30


def test_the_old_validation_patience_is_refused_not_ignored():
    with pytest.raises(ValidationError, match="patience_steps"):
        TrainConfig.model_validate({"patience": 5})
    assert TrainConfig(patience_steps=10, min_steps=50).should_stop(50, 40)
    assert not TrainConfig(patience_steps=10, min_steps=50).should_stop(49, 30)
    assert not TrainConfig(patience_steps=10).should_stop(49, 40)
