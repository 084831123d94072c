"""Chronological per-user splits. Events are already stably sorted by time within each user."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from redrec.data.dataset import EncodedData


@dataclass
class Split:
    """For each user: events [start, train_end) train, [train_end, valid_end) valid, [valid_end, end) test."""

    train_end: np.ndarray  # [n_users] absolute event index
    valid_end: np.ndarray  # [n_users]
    protocol: str

    def users_with_test(self, enc: EncodedData) -> np.ndarray:
        return np.flatnonzero(enc.offsets[1:] > self.valid_end)


def chronological_split(enc: EncodedData, test_events: int = 5, valid_events: int = 5, min_train: int = 3) -> Split:
    """The last ``test_events`` events of each user are test, the ``valid_events`` before them are
    validation. Users too short to keep ``min_train`` training events keep everything in train."""
    start, end = enc.offsets[:-1], enc.offsets[1:]
    n = end - start
    long_enough = n >= min_train + valid_events + test_events
    valid_end = np.where(long_enough, end - test_events, end)
    train_end = np.where(long_enough, valid_end - valid_events, end)
    return Split(train_end=train_end.astype(np.int64), valid_end=valid_end.astype(np.int64), protocol=f"chronological-last-{test_events}")


def leave_one_out_split(enc: EncodedData, min_train: int = 3) -> Split:
    """The standard single-scenario protocol (SASRec, gSASRec): last event test, previous one valid."""
    return chronological_split(enc, test_events=1, valid_events=1, min_train=min_train)
