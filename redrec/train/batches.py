"""Turn the encoded event log into tensor batches for training (multi-cut) and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from redrec.data.dataset import EncodedData


def next_same_scenario(enc: EncodedData) -> np.ndarray:
    """For each event, the index of the same user's next event in the same scenario, or -1."""
    n = len(enc.item)
    user = np.repeat(np.arange(enc.n_users), np.diff(enc.offsets))
    order = np.lexsort((np.arange(n), enc.scenario, user))
    nxt = np.full(n, -1, dtype=np.int64)
    same = (user[order][1:] == user[order][:-1]) & (enc.scenario[order][1:] == enc.scenario[order][:-1])
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class BatchBuilder:
    def __init__(self, enc: EncodedData, max_len: int, window: int, history_mode: str = "mixed"):
        self.enc = enc
        self.max_len = max_len
        self.window = window
        self.mode = history_mode
        self.next_same = next_same_scenario(enc)
        self.hour = ((enc.ts // 3600) % 24).astype(np.int64)

    # ---- one sequence --------------------------------------------------------------------
    def _features(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        enc = self.enc
        scen = enc.scenario[idx]
        spos = np.zeros(len(idx), dtype=np.int64)
        for s in np.unique(scen):  # position of each event within its own scenario in the window
            m = scen == s
            spos[m] = np.arange(int(m.sum()))
        return {"items": enc.item[idx], "scen": scen, "act": enc.action[idx], "hour": self.hour[idx], "spos": spos}

    def _targets(self, first: int, limit: int) -> list[int]:
        out, j = [], first
        while j != -1 and j < limit and len(out) < self.window:
            out.append(int(self.enc.item[j]))
            j = int(self.next_same[j])
        return out

    def _collate(self, rows: list[dict], n_cuts: int) -> dict[str, torch.Tensor]:
        B = len(rows)
        L = max(len(r["items"]) for r in rows)
        out = {k: np.zeros((B, L), dtype=np.int64) for k in ("items", "scen", "act", "hour", "spos")}
        length = np.zeros(B, dtype=np.int64)
        cut = np.ones((B, n_cuts), dtype=np.int64)
        cut_scen = np.zeros((B, n_cuts), dtype=np.int64)
        cut_valid = np.zeros((B, n_cuts), dtype=bool)
        targets = np.zeros((B, n_cuts, self.window), dtype=np.int64)
        for b, r in enumerate(rows):
            n = len(r["items"])
            length[b] = n
            for k in out:
                out[k][b, :n] = r[k]
            for c, (cp, sc, tg) in enumerate(r["cuts"]):
                cut[b, c], cut_scen[b, c], cut_valid[b, c] = cp, sc, bool(tg) or r.get("eval", False)
                targets[b, c, : len(tg)] = tg
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch.update(
            length=torch.from_numpy(length), cut=torch.from_numpy(cut), cut_scen=torch.from_numpy(cut_scen),
            cut_valid=torch.from_numpy(cut_valid), targets=torch.from_numpy(targets),
        )
        return batch

    # ---- training ------------------------------------------------------------------------
    def train_row(self, u: int, end: int, rng: np.random.Generator, n_cuts: int) -> dict | None:
        start = int(self.enc.offsets[u])
        idx = np.arange(start, end)
        if self.mode == "per-scenario":
            scen = self.enc.scenario[idx]
            counts = np.bincount(scen, minlength=len(self.enc.scenarios))
            ok = np.flatnonzero(counts >= 2)
            if len(ok) == 0:
                return None
            idx = idx[scen == rng.choice(ok)]
        if len(idx) < 2:
            return None
        # a window of up to max_len events ending anywhere; cuts inside it predict what follows
        b = int(rng.integers(2, len(idx) + 1)) if rng.random() < 0.5 else len(idx)
        a = max(0, b - self.max_len)
        win = idx[a:b]
        n = len(win)
        # cut c: history = win[:c], next event = idx[a + c] (must exist inside the train range)
        cand = np.arange(1, min(n, len(idx) - a - 1) + 1)
        if len(cand) == 0:
            return None
        picks = np.sort(rng.choice(cand, size=min(n_cuts, len(cand)), replace=False))
        cuts = []
        for c in picks:
            nxt = int(idx[a + c])
            sc = int(self.enc.scenario[nxt])
            if self.mode == "per-scenario":  # idx is one scenario: targets are simply the next ones
                tg = [int(self.enc.item[j]) for j in idx[a + c : a + c + self.window]]
            else:
                tg = self._targets(nxt, end)
            cuts.append((int(c), sc, tg))
        row = self._features(win)
        row["cuts"] = cuts
        return row

    def train_batches(self, ends: np.ndarray, batch_size: int, n_cuts: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        """Deterministic per (seed, epoch, rank): a resumed run replays the same batches."""
        rng = np.random.default_rng([seed, epoch, rank])
        users = np.flatnonzero(ends - self.enc.offsets[:-1] >= 2)
        users = rng.permutation(users)
        per_rank = len(users) // world  # equal batch counts on every rank keep collectives in step
        users = users[rank * per_rank : (rank + 1) * per_rank]
        for i in range(0, len(users) - batch_size + 1 if len(users) >= batch_size else 1, batch_size):
            rows = [r for u in users[i : i + batch_size] if (r := self.train_row(int(u), int(ends[u]), rng, n_cuts))]
            if rows:
                yield self._collate(rows, n_cuts)

    def n_train_batches(self, ends: np.ndarray, batch_size: int, world: int = 1) -> int:
        n = int((ends - self.enc.offsets[:-1] >= 2).sum()) // world
        return max(1, n // batch_size) if n >= batch_size else 1

    # ---- evaluation / serving -------------------------------------------------------------
    def history_row(self, u: int, end: int, scenario: int | None = None) -> dict:
        """The last max_len events before ``end`` (one scenario's only, in per-scenario mode),
        with one cut per scenario at the end of the history."""
        start = int(self.enc.offsets[u])
        idx = np.arange(start, end)
        if scenario is not None and self.mode == "per-scenario":
            idx = idx[self.enc.scenario[idx] == scenario]
        idx = idx[-self.max_len :]
        row = self._features(idx)
        if len(idx) == 0:  # cold user: one padding item, nothing to attend to but itself
            row = {k: np.zeros(1, dtype=np.int64) for k in row}
        n = max(len(idx), 1)
        scens = [scenario] if scenario is not None else list(range(len(self.enc.scenarios)))
        row["cuts"] = [(n, s, []) for s in scens]
        row["eval"] = True
        return row

    def eval_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self._collate(rows, len(rows[0]["cuts"]))
