"""Tiny trained checkpoints shared by the serving and release tests (real training, a few steps)."""

from __future__ import annotations

from pathlib import Path

SEQ_LEN = 20


def tiny_model(data, out_dir: Path, seed: int, meta: dict | None = None) -> Path:
    from redrec.data import encode
    from redrec.data.split import chronological_split
    from redrec.experiment import ExperimentConfig, train_variant
    from redrec.model.checkpoint import export_checkpoint

    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": ["redrec"],
        "model": {"item_source": "cache-residual", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": SEQ_LEN}},
        "train": {"epochs": 1, "batch_size": 16, "negatives": 64, "progress": False, "warmup_steps": 2, "max_steps": 8, "seed": seed},
        "out_dir": str(out_dir),
    })
    enc = encode(data)
    trainer, _ = train_variant(cfg, "redrec", data, enc, chronological_split(enc), out_dir / "redrec", resume=False)
    return export_checkpoint(trainer.module, out_dir / "model", enc.item_ids, {"variant": "redrec", **(meta or {})})


def warm_users(data, n=5) -> list[str]:
    """Users with history in all three scenarios."""
    counts = data.events.groupby("user_id")["scenario"].nunique()
    return [str(u) for u in counts[counts == 3].index[:n]]
