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


def collate(rows: list[dict], window: int) -> dict[str, torch.Tensor]:
    """Pad rows of train_row / history_row into one batch of tensors."""
    B = len(rows)
    L = max(len(r["items"]) for r in rows)
    C = max(len(r["cut"]) for r in rows)
    out = {k: np.zeros((B, L), dtype=np.int64) for k in ("items", "scen", "act", "hour", "spos")}
    length = np.zeros(B, dtype=np.int64)
    cut = np.ones((B, C), dtype=np.int64)  # unused cut slots point at item 1 and are invalid
    cut_scen = np.zeros((B, C), dtype=np.int64)
    cut_valid = np.zeros((B, C), dtype=bool)
    targets = np.zeros((B, C, window), dtype=np.int64)
    for b, r in enumerate(rows):
        n, c = len(r["items"]), len(r["cut"])
        length[b] = n
        for k in out:
            out[k][b, :n] = r[k]
        cut[b, :c], cut_scen[b, :c] = r["cut"], r["cut_scen"]
        targets[b, :c] = r["targets"]
        cut_valid[b, :c] = True if r.get("eval", False) else (r["targets"] > 0).any(1)
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    batch.update(
        length=torch.from_numpy(length), cut=torch.from_numpy(cut), cut_scen=torch.from_numpy(cut_scen),
        cut_valid=torch.from_numpy(cut_valid), targets=torch.from_numpy(targets),
    )
    return batch


class BatchBuilder:
    def __init__(self, enc: EncodedData, max_len: int, window: int, history_mode: str = "mixed"):
        self.enc = enc
        self.max_len = max_len
        self.window = window
        self.mode = history_mode
        self.next_same = next_same_scenario(enc)
        # chain[j, w]: the w-th event of j's scenario from j on (chain[j, 0] = j), -1 past the end
        chain = np.full((len(enc.item), window), -1, dtype=np.int64)
        if len(enc.item):
            chain[:, 0] = np.arange(len(enc.item))
            for w in range(1, window):
                prev = chain[:, w - 1]
                chain[:, w] = np.where(prev >= 0, self.next_same[np.maximum(prev, 0)], -1)
        self.chain = chain
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

    def _targets(self, first: np.ndarray, limit: int) -> np.ndarray:
        """[C, W] the next W items of each first event's scenario before ``limit`` (0 = none)."""
        ch = self.chain[first]
        return np.where((ch >= 0) & (ch < limit), self.enc.item[np.maximum(ch, 0)], 0)

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate(rows, self.window)

    # ---- training ------------------------------------------------------------------------
    def train_row(self, u: int, end: int, rng: np.random.Generator, n_cuts: int) -> dict | None:
        """One training sequence of user ``u`` (events before ``end``) with its cuts.

        ``n_cuts`` 0 means every position (SASRec-style: the next event after each prefix is a
        target); otherwise that many positions are sampled."""
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
        # the most recent window, or (half the time, for users longer than a window) a window ending
        # earlier, so the older part of long histories is trained on too
        b = len(idx)
        if len(idx) > self.max_len + 1 and rng.random() < 0.5:
            b = int(rng.integers(self.max_len + 1, len(idx) + 1))
        a = max(0, b - self.max_len)
        win = idx[a:b]
        n = len(win)
        # cut c: history = win[:c], next event = idx[a + c] (must exist inside the train range)
        cand = np.arange(1, min(n, len(idx) - a - 1) + 1)
        if len(cand) == 0:
            return None
        picks = cand if n_cuts == 0 or n_cuts >= len(cand) else np.sort(rng.choice(cand, size=n_cuts, replace=False))
        nxt = idx[a + picks]
        row = self._features(win)
        row["cut"], row["cut_scen"] = picks, self.enc.scenario[nxt]
        if self.mode == "per-scenario":  # idx is one scenario: the targets are simply the next events
            pos = a + picks[:, None] + np.arange(self.window)[None, :]
            row["targets"] = np.where(pos < len(idx), self.enc.item[idx[np.minimum(pos, len(idx) - 1)]], 0)
        else:
            row["targets"] = self._targets(nxt, end)
        return row

    def train_batches(self, ends: np.ndarray, batch_size: int, n_cuts: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        """Deterministic per (seed, epoch, rank): a resumed run replays the same batches.

        Users are shuffled, then sorted by length inside groups of 16 batches (and the batches
        shuffled again), so a batch pads to similar lengths: on ML-1M that halves the tokens."""
        rng = np.random.default_rng([seed, epoch, rank])
        users = np.flatnonzero(ends - self.enc.offsets[:-1] >= 2)
        users = rng.permutation(users)
        per_rank = len(users) // world  # equal batch counts on every rank keep collectives in step
        users = users[rank * per_rank : (rank + 1) * per_rank]
        lengths = np.minimum(ends[users] - self.enc.offsets[:-1][users], self.max_len)
        group = 16 * batch_size
        batches = []
        for g in range(0, len(users), group):
            chunk = users[g : g + group]
            chunk = chunk[np.argsort(lengths[g : g + group], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        if len(users) >= batch_size:
            batches = [b for b in batches if len(b) == batch_size] or batches[:1]
        for j in rng.permutation(len(batches)):
            rows = [r for u in batches[j] if (r := self.train_row(int(u), int(ends[u]), rng, n_cuts))]
            if rows:
                yield self._collate(rows)

    def n_train_batches(self, ends: np.ndarray, batch_size: int, world: int = 1) -> int:
        n = int((ends - self.enc.offsets[:-1] >= 2).sum()) // world
        if n < batch_size:
            return 1
        group = 16 * batch_size
        return sum((min(group, n - g)) // batch_size for g in range(0, n, group)) or 1

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
        row["cut"] = np.full(len(scens), n, dtype=np.int64)
        row["cut_scen"] = np.asarray(scens, dtype=np.int64)
        row["targets"] = np.zeros((len(scens), self.window), dtype=np.int64)
        row["eval"] = True
        return row

    def eval_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self._collate(rows)
