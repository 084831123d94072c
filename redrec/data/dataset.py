"""The in-memory dataset (canonical frames) and its integer encoding for the towers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from redrec.schema import LoadReport


@dataclass
class RecData:
    name: str
    events: pd.DataFrame  # canonical events, sorted stably by (user_id, ts)
    items: pd.DataFrame  # canonical catalogue
    scenarios: list[str]
    actions: list[str]
    reports: list[LoadReport] = field(default_factory=list)
    # a generated world's latent truth (redrec.data.synthetic): what an experiment simulator
    # draws clicks from; None for real data
    truth: dict | None = None

    def __post_init__(self) -> None:
        # Stable sort: MovieLens rates in bursts (many equal timestamps); file order breaks ties.
        self.events = self.events.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)

    def describe(self) -> dict:
        per_scen = self.events["scenario"].value_counts().to_dict()
        return {
            "name": self.name,
            "users": int(self.events["user_id"].nunique()),
            "items": int(len(self.items)),
            "events": int(len(self.events)),
            "events_per_scenario": {s: int(per_scen.get(s, 0)) for s in self.scenarios},
        }


@dataclass
class EncodedData:
    """Integer view: item index 0 is padding, items are 1..n_items; events grouped per user (CSR)."""

    item_ids: list[str]  # position i-1 holds the id of item index i
    user_ids: list[str]
    scenarios: list[str]
    actions: list[str]
    offsets: np.ndarray  # [n_users + 1]
    item: np.ndarray  # [n_events] int64
    scenario: np.ndarray  # [n_events] int64
    action: np.ndarray  # [n_events] int64
    ts: np.ndarray  # [n_events] int64
    eligible: np.ndarray  # [n_scenarios, n_items + 1] bool; column 0 (padding) is False

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def user_slice(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

    def item_index(self) -> dict[str, int]:
        return {iid: i + 1 for i, iid in enumerate(self.item_ids)}


def encode(data: RecData) -> EncodedData:
    items = data.items
    item_ids = items["item_id"].tolist()
    idx = pd.Index(item_ids)
    ev = data.events
    item = idx.get_indexer(ev["item_id"]) + 1
    if (item == 0).any():
        missing = ev.loc[item == 0, "item_id"].iloc[:5].tolist()
        raise ValueError(f"events reference items missing from the catalogue, e.g. {missing}")
    scen_idx = pd.Index(data.scenarios).get_indexer(ev["scenario"])
    if (scen_idx < 0).any():
        raise ValueError(f"events use scenarios outside {data.scenarios}: {sorted(set(ev['scenario']) - set(data.scenarios))}")
    act_idx = pd.Index(data.actions).get_indexer(ev["action"])
    if (act_idx < 0).any():
        raise ValueError(f"events use actions outside {data.actions}")
    codes, uniques = pd.factorize(ev["user_id"], sort=False)
    # events are sorted by user already, so users are contiguous
    counts = np.bincount(codes, minlength=len(uniques))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    eligible = np.zeros((len(data.scenarios), len(item_ids) + 1), dtype=bool)
    s_pos = {s: j for j, s in enumerate(data.scenarios)}
    for i, scen in enumerate(items["scenarios"]):
        for s in scen:
            eligible[s_pos[s], i + 1] = True
    return EncodedData(
        item_ids=item_ids,
        user_ids=[str(u) for u in uniques],
        scenarios=list(data.scenarios),
        actions=list(data.actions),
        offsets=offsets,
        item=item.astype(np.int64),
        scenario=scen_idx.astype(np.int64),
        action=act_idx.astype(np.int64),
        ts=ev["ts"].to_numpy(np.int64),
        eligible=eligible,
    )
