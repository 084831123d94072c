"""The trainer's input, rebuilt from the Feast training set.

The model is trained on what ``get_historical_features`` returned, not on the raw event log: each
user's history is the merged per-scenario windows Feast joined point-in-time at the end of that
user's training window, so training sees exactly the features serving will later read from the
online store (the same views, the same window length). The held-out validation and test events
are labels, never features; they come from the event log unchanged, so the chronological split of
the rebuilt data holds out the same events as the original one.

A run that streams its training batches from the training set's shards (redrec.train.stream)
rebuilds only the validation users here (``users=validation_users(...)``): the same users the
in-memory run validates on, with the same histories and labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from redrec.data import RecData
from redrec.data.dataset import EncodedData
from redrec.data.split import Split
from redrec.features.store import DuplicateReport, TrainingSet

COLUMNS = ["user_id", "item_id", "scenario", "action", "ts"]


@dataclass
class FeastTrainingData:
    data: RecData
    history_events: int  # events that came from the Feast windows
    log_training_events: int  # events of the log's training windows (>= history_events: windows are capped)
    users: int

    def summary(self) -> str:
        share = self.history_events / max(self.log_training_events, 1)
        return (f"training input from the Feast training set: {self.history_events} history events for {self.users} users "
                f"({share:.1%} of the event log's training events; windows are capped per scenario)")


def validation_users(enc: EncodedData, max_users: int | None) -> list[str]:
    """The users the trainer validates on (TrainConfig.valid_max_users): the rebuilt data numbers
    users like ``enc`` (both sorted by user id, every user has a training-set row), so the sample
    of ``enc`` is the in-memory run's sample."""
    from redrec.evaluate import eval_users

    return [enc.user_ids[u] for u in eval_users(enc, max_users)]


def from_training_set(data: RecData, enc: EncodedData, split: Split, training_set: str | Path,
                      users: Sequence[str] | None = None) -> FeastTrainingData:
    """The event log rebuilt from the training set (a file, or a directory: ``training_set.parquet``
    or part files with their manifest), for every user or only ``users``."""
    from redrec.train.shards import SINGLE_FILE, read_training_set

    requested = users
    path = Path(training_set)
    if path.is_dir() and (path / SINGLE_FILE).is_file():
        path = path / SINGLE_FILE
    if users is None and path.is_file():
        df = pd.read_parquet(path)
    else:
        df = read_training_set(path, users=users).to_pandas()
    if "user_id" not in df.columns:
        raise KeyError(f"{path}: the training set has no 'user_id' column; rebuild it with the build-features step")
    # the build-features step already refused duplicate entity rows; one row per user is what it wrote
    dup = df["user_id"].duplicated()
    if dup.any():
        raise ValueError(f"{path}: {int(dup.sum())} users appear more than once (e.g. {df['user_id'][dup].iloc[0]!r}); "
                         "the training set must hold one entity row per user at its training cut-off")
    histories = TrainingSet(df, DuplicateReport(["user_id"], len(df))).histories(list(data.scenarios))
    only = None if requested is None else {str(u) for u in requested}
    users = df["user_id"].astype(str).tolist()
    lens = [len(h) for h in histories]
    feats = pd.DataFrame(
        [(u, e.item_id, e.scenario, e.action, e.ts) for u, h in zip(users, histories) for e in h], columns=COLUMNS
    )
    ts_dtype = data.events["ts"].dtype
    feats["ts"] = feats["ts"].astype(ts_dtype)

    # held-out events (validation + test) straight from the log, aligned with the encoding
    wanted = range(enc.n_users) if only is None else [u for u, uid in enumerate(enc.user_ids) if uid in only]
    held = np.zeros(len(enc.item), dtype=bool)
    for u in wanted:
        held[split.train_end[u] : enc.offsets[u + 1]] = True
    labels = data.events.loc[held, COLUMNS]
    missing = sorted((set(enc.user_ids) if only is None else only) - set(users))
    if missing:
        raise ValueError(f"{path}: no training-set row for {len(missing)} users (e.g. {missing[:3]}); "
                         "the training set and the prepared data come from different runs")
    events = pd.concat([feats, labels], ignore_index=True)
    out = RecData(f"{data.name}+feast", events, data.items, list(data.scenarios), list(data.actions), list(data.reports))
    log_train = int(sum(split.train_end[u] - enc.offsets[u] for u in wanted))
    return FeastTrainingData(out, int(sum(lens)), log_train, len(users))
