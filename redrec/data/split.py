"""Chronological per-user splits. Events are already stably sorted by time within each user."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from redrec.data.dataset import EncodedData


@dataclass
class Split:
    """For each user: events [start, train_end) train, [train_end, valid_end) valid, [valid_end, test_end) test.

    ``test_end`` None means each user's last event: every split but new-items, whose test is one
    event in the middle of the log (the events after it may hold new items and are left out)."""

    train_end: np.ndarray  # [n_users] absolute event index
    valid_end: np.ndarray  # [n_users]
    protocol: str
    test_end: np.ndarray | None = None  # [n_users]

    def test_ends(self, enc: EncodedData) -> np.ndarray:
        return enc.offsets[1:] if self.test_end is None else self.test_end

    def users_with_test(self, enc: EncodedData) -> np.ndarray:
        return np.flatnonzero(self.test_ends(enc) > self.valid_end)


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


def new_items_cutoff(enc: EncodedData, frac: float) -> int:
    """The time T where the last ``frac`` of all events (by count) begins; ties at T fall after it."""
    if not 0 < frac < 1:
        raise ValueError(f"new_items_frac must be in (0, 1), got {frac}")
    ts = np.sort(enc.ts, kind="stable")
    return int(ts[min(int(np.floor((1 - frac) * len(ts))), len(ts) - 1)])


def new_items(enc: EncodedData, cutoff: int) -> np.ndarray:
    """[n_items + 1] bool: items whose first event is at or after ``cutoff`` (padding and items
    without any event are not new: nothing says when they arrived)."""
    first = np.full(enc.n_items + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, enc.item, enc.ts)
    return (first >= cutoff) & (first < np.iinfo(np.int64).max)


def new_items_split(enc: EncodedData, frac: float = 0.1, min_train: int = 3) -> tuple[Split, int, np.ndarray]:
    """Item cold start: (split, cut-off T, new-item mask).

    Each user's test is their first event on a new item (necessarily at/after T); everything
    before it is on warm items by construction and is the user's history: the last of those
    events is validation, the rest training. Everything after the test event is left out, since
    it may hold new items. A user with no new-item event trains on all but their last event and
    validates on that one, as in leave-one-out. So no new item is ever a training or validation
    event, and the training window runs up to each user's test like leave-one-out's, which keeps
    the two protocols' numbers comparable (only the kind of target differs)."""
    cutoff = new_items_cutoff(enc, frac)
    is_new = new_items(enc, cutoff)
    start, end = enc.offsets[:-1], enc.offsets[1:]
    q = end.copy()
    hit = np.flatnonzero(is_new[enc.item])
    if len(hit):
        user = np.searchsorted(enc.offsets, hit, side="right") - 1
        first = np.unique(user, return_index=True)
        q[first[0]] = hit[first[1]]
    has_test = q < end
    long_enough = q - start >= min_train + 1
    valid_end = q
    train_end = np.where(long_enough, q - 1, q)
    test_end = np.where(has_test & long_enough, q + 1, q)
    split = Split(train_end=train_end.astype(np.int64), valid_end=valid_end.astype(np.int64),
                  protocol=f"new-items (last {frac:.0%} of events)", test_end=test_end.astype(np.int64))
    return split, cutoff, is_new
