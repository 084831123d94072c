"""Behaviour features per event, computed by one rule for the reference and the current window.

- ``pop_bucket``: the item's popularity rank in the reference window (top1% / top10% / mid /
  tail), ``new`` for items the reference never saw: a shift towards ``new`` or ``tail`` means
  the traffic moved away from what the model was trained on.
- ``item_age_rank``: the item's age among the items known at the event: the share of them first
  seen at or after it (1/N for the newest item, 1 for the oldest; first seen in the reference,
  else in the current window). Days since first seen grow with the calendar wherever items do not
  flow in steadily (a live window always looks older than its reference: MovieLens, the synthetic
  world); the rank moves only when traffic moves between newer and older items.
- ``seq_len``: the user's events (all scenarios: the model reads mixed histories) in the trailing
  ``seq_lookback_hours`` before the event, so a 24 h current window and a 30 day reference
  measure the same thing.
- ``hour`` (UTC hour of day), ``action``, ``category`` (the item's first tag; the reference's
  most frequent categories, the rest ``other``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

POP_BUCKETS = ("top1", "top10", "mid", "tail", "new")


def item_stats(events: pd.DataFrame, items: pd.DataFrame, top_categories: int) -> pd.DataFrame:
    """Per catalogue item: first tag (category), first-seen time and popularity bucket in ``events``."""
    cat = items["tags"].map(lambda t: str(t[0]) if t is not None and len(t) else "none")
    stats = pd.DataFrame({"item_id": items["item_id"].astype(str).to_numpy(), "category": cat.to_numpy()})
    g = events.groupby("item_id")["ts"]
    first, count = g.min(), g.size()
    stats["first_seen"] = stats["item_id"].map(first).astype("float64")
    stats["count"] = stats["item_id"].map(count).fillna(0).astype("int64")
    seen = stats["count"] > 0
    # rank by reference frequency; ties broken by id so the buckets are deterministic
    order = stats[seen].sort_values(["count", "item_id"], ascending=[False, True]).index
    rank = pd.Series(np.arange(len(order)) / max(len(order), 1), index=order)
    bucket = pd.Series("new", index=stats.index, dtype=object)
    bucket[order] = np.select([rank < 0.01, rank < 0.10, rank < 0.50], ["top1", "top10", "mid"], "tail")
    stats["pop_bucket"] = bucket
    top = stats.loc[seen].groupby("category")["count"].sum().sort_values(ascending=False).head(top_categories)
    stats["category"] = stats["category"].where(stats["category"].isin(top.index), "other")
    return stats


def _trailing_counts(user: pd.Series, ts: np.ndarray, lookback_s: int) -> np.ndarray:
    """For each event, how many events of the same user happened in (ts - lookback, ts]."""
    codes = pd.factorize(user)[0].astype(np.int64)
    rel = (ts - ts.min()).astype(np.int64)
    span = int(rel.max()) + lookback_s + 1
    key = codes * span + rel
    order = np.argsort(key, kind="stable")
    sk = key[order]
    lo = np.searchsorted(sk, codes[order] * span + np.maximum(rel[order] - lookback_s + 1, 0), side="left")
    out = np.empty(len(ts), dtype=np.int64)
    out[order] = np.arange(len(ts)) - lo  # events strictly before this one in the lookback span
    return out


def behaviour_features(events: pd.DataFrame, stats: pd.DataFrame, lookback_hours: float,
                       first_seen_here: pd.Series | None = None) -> pd.DataFrame:
    """One row per event: scenario, ts and the behaviour features. ``first_seen_here``: item_id ->
    first ts over more events than ``events`` holds (a sampled window's full log), so items new to
    the reference age from their true first appearance."""
    if events.empty:
        return pd.DataFrame(columns=["scenario", "ts", "pop_bucket", "item_age_rank", "seq_len", "hour", "action", "category"])
    ts = events["ts"].to_numpy(dtype=np.int64)
    s = stats.set_index("item_id")
    item = events["item_id"].astype(str)
    first = item.map(s["first_seen"]).to_numpy(dtype="float64")
    # items unknown to the reference age from their first appearance here
    here = events.groupby(item)["ts"].min().astype("float64")
    if first_seen_here is not None and len(first_seen_here):
        here = pd.concat([here, first_seen_here.astype("float64")]).groupby(level=0).min()
    first_here = item.map(here).to_numpy(dtype="float64")
    new = np.isnan(first)
    first = np.where(new, first_here, first)
    # every item's first-seen time, sorted: how many were known at ts, how many of those since first
    ref_known = s["first_seen"].dropna()
    first_new = here[~here.index.isin(ref_known.index)]  # one per item new to the reference
    known = np.sort(np.concatenate([ref_known.to_numpy(dtype="float64"), first_new.to_numpy()]))
    n_known = np.searchsorted(known, ts, side="right")
    newer = n_known - np.searchsorted(known, np.minimum(first, ts), side="left")
    return pd.DataFrame({
        "scenario": events["scenario"].astype(str).to_numpy(),
        "ts": ts,
        "pop_bucket": item.map(s["pop_bucket"]).fillna("new").to_numpy(),
        "item_age_rank": newer / np.maximum(n_known, 1),
        "seq_len": _trailing_counts(events["user_id"], ts, int(lookback_hours * 3600)),
        "hour": ((ts // 3600) % 24).astype(str),
        "action": events["action"].astype(str).to_numpy(),
        "category": item.map(s["category"]).fillna("other").to_numpy(),
    })
