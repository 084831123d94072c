"""Online histories (Feast windows merged across scenarios) -> user-tower input tensors.

The same features as training (``redrec.train.batches``): item index, scenario, action, hour of
day, position within its scenario in the window; the last ``max_len`` events; one cut at the end
of the history whose queries are those of the requested scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from redrec.features.store import HistoryEvent


@dataclass
class Vocab:
    item_index: dict[str, int]  # item id -> 1..n (0 is padding)
    scenario_index: dict[str, int]
    action_index: dict[str, int]
    max_len: int

    @classmethod
    def from_info(cls, info: dict) -> "Vocab":
        m = info["model"]
        return cls(
            item_index={iid: i + 1 for i, iid in enumerate(info["item_ids"])},
            scenario_index={s: j for j, s in enumerate(m["scenarios"])},
            action_index={a: j for j, a in enumerate(m["actions"])},
            max_len=int(m["user_tower"]["max_len"]),
        )


def encode_row(vocab: Vocab, history: list[HistoryEvent]) -> dict[str, np.ndarray]:
    """Events the model cannot represent (an item newer than the model, an unknown scenario or
    action) are dropped: the model has no embedding for them."""
    rows = [(vocab.item_index.get(e.item_id), vocab.scenario_index.get(e.scenario), vocab.action_index.get(e.action), e.ts)
            for e in history]
    rows = [r for r in rows if None not in r][-vocab.max_len:]
    if not rows:
        return {"items": np.zeros(0, np.int64)}
    items, scen, act, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    spos = np.zeros(len(items), np.int64)
    for s in np.unique(scen):
        m = scen == s
        spos[m] = np.arange(int(m.sum()))
    return {"items": items, "scen": scen, "act": act, "hour": (ts // 3600) % 24, "spos": spos}


def collate(rows: list[dict[str, np.ndarray]], scen_idx: list[int]) -> dict[str, torch.Tensor]:
    """Rows with at least one event; one cut per row (at its end) for its scenario."""
    B = len(rows)
    L = max(len(r["items"]) for r in rows)
    out = {k: np.zeros((B, L), np.int64) for k in ("items", "scen", "act", "hour", "spos")}
    length = np.zeros(B, np.int64)
    for b, r in enumerate(rows):
        n = len(r["items"])
        length[b] = n
        for k in out:
            out[k][b, :n] = r[k]
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    batch["length"] = torch.from_numpy(length)
    batch["cut"] = torch.from_numpy(length[:, None].copy())
    batch["cut_scen"] = torch.tensor(scen_idx, dtype=torch.int64)[:, None]
    return batch
