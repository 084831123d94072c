"""The drift reference: the training window, recorded once by the pipeline's last step.

Layout of ``out_dir`` (written to a sibling temp dir and renamed, so a reader never sees half):
  reference.json            window, counts per scenario, feature rules, model info, offline metrics
  items.parquet             item_id, category, first_seen, count, pop_bucket (the bucket rule)
  features.parquet          one row per training-window event: scenario, ts and behaviour features
  tail_events.parquet       each user's events in the last ``seq_lookback_hours`` before their last
                            reference event: the history a live window starts from (``seq_len``
                            right after a deploy counts the events the serving log has not seen)
  user_embeddings.parquet   (with a model) scenario, history_len, e0..e{d-1}: user embeddings of
                            sampled users (``requests_at``: at the window's end, or at their events)
  scores.parquet            (with a model) scenario, history_len, rank, score: what the model served them

The online hit rate is compared with ``model.replay_hits`` (the same measure on the replayed
requests); ``meta["offline_metrics"]`` = ``{scenario: {"hr@10": ..., ...}}`` (the pipeline's
evaluation) is the fallback for references recorded without a model.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from redrec.drift.features import behaviour_features, item_stats
from redrec.schema import EVENT_COLUMNS, validate_events, validate_items

FORMAT = "redrec-drift-reference/1"
RECORD_HINT = "re-record it with `redrec drift record-reference` (the training pipeline's last step)"


class ReferenceError(ValueError):
    """The reference cannot be used; the message names the file, the field and the fix."""


def record_reference(
    events: pd.DataFrame,
    items: pd.DataFrame,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    meta: dict | None = None,
    *,
    top_categories: int = 30,
    seq_lookback_hours: float = 24.0,
    top_k: int = 10,
    max_requests: int = 2000,
    seed: int = 0,
    requests_at: str = "window-end",
) -> Path:
    events, _ = validate_events(events, "reference events")
    items, _ = validate_items(items, "reference items")
    if events.empty:
        raise ReferenceError("reference events are empty: a reference needs the training window's events")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = item_stats(events, items, top_categories)
    feats = behaviour_features(events, stats, seq_lookback_hours)
    stats.to_parquet(tmp / "items.parquet", index=False)
    last = events.groupby("user_id")["ts"].transform("max")
    tail = events[events["ts"] > last - int(seq_lookback_hours * 3600)]
    tail[list(EVENT_COLUMNS)].reset_index(drop=True).to_parquet(tmp / "tail_events.parquet", index=False)
    feats.to_parquet(tmp / "features.parquet", index=False)
    meta = dict(meta or {})
    scenarios = sorted(events["scenario"].unique().tolist())
    model_info = None
    if model_dir is not None:
        from redrec.drift.model_side import reference_model_outputs

        emb, scores, model_info = reference_model_outputs(events, items, model_dir, scenarios, top_k=top_k, max_requests=max_requests, seed=seed,
                                                           at=requests_at)
        emb.to_parquet(tmp / "user_embeddings.parquet", index=False)
        scores.to_parquet(tmp / "scores.parquet", index=False)
        model_info["dir"] = str(model_dir)
    info = {
        "format": FORMAT,
        "created": time.time(),
        "window": {"start": int(events["ts"].min()), "end": int(events["ts"].max())},
        "n_events": int(len(events)),
        "events_per_scenario": {k: int(v) for k, v in events["scenario"].value_counts().sort_index().items()},
        "scenarios": scenarios,
        "seq_lookback_hours": seq_lookback_hours,
        "top_categories": top_categories,
        "model": model_info,
        "offline_metrics": meta.pop("offline_metrics", {}) or {},
        "meta": meta,
    }
    (tmp / "reference.json").write_text(json.dumps(info, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class Reference:
    path: Path
    info: dict
    items: pd.DataFrame
    features: pd.DataFrame
    embeddings: pd.DataFrame | None
    scores: pd.DataFrame | None
    tail: pd.DataFrame | None = None

    @property
    def dim(self) -> int | None:
        return (self.info.get("model") or {}).get("dim")


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise ReferenceError(f"{path} is missing; {RECORD_HINT}")
    df = pd.read_parquet(path)
    miss = [c for c in columns if c not in df.columns]
    if miss:
        raise ReferenceError(f"{path}: column(s) {miss} missing; {RECORD_HINT}")
    return df


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    meta = path / "reference.json"
    if not meta.exists():
        raise ReferenceError(f"no drift reference at {path} (reference.json missing); {RECORD_HINT}")
    info = json.loads(meta.read_text())
    if info.get("format") != FORMAT:
        raise ReferenceError(f"{meta}: field 'format' is {info.get('format')!r}, expected {FORMAT!r}; {RECORD_HINT}")
    items = _read(path / "items.parquet", ["item_id", "category", "first_seen", "pop_bucket"])
    feats = _read(path / "features.parquet", ["scenario", "ts", "pop_bucket", "item_age_rank", "seq_len", "hour", "action", "category"])
    emb = scores = None
    if info.get("model"):
        emb = _read(path / "user_embeddings.parquet", ["scenario", "e0"])
        scores = _read(path / "scores.parquet", ["scenario", "rank", "score"])
    # references recorded before the tail existed: sequence lengths start from the log alone
    tail = _read(path / "tail_events.parquet", list(EVENT_COLUMNS)) if (path / "tail_events.parquet").exists() else None
    return Reference(path, info, items, feats, emb, scores, tail)
