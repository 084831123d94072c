"""Training batches streamed from a shard of the training set, for ``Trainer(train_source=...)``.

Each record batch of the rank's shard (a chunk of users) is encoded on its own: item ids become
the catalogue's indices and the per-scenario windows are merged in time order exactly as
:func:`redrec.features.store.merge_histories` and :class:`redrec.data.RecData` order them for the
in-memory path, so ``BatchBuilder.train_row`` on the chunk makes the same training rows the
in-memory path makes for those users. Rows are shuffled within a buffer of chunks and grouped by
length like ``BatchBuilder.train_batches``; memory is a few chunks whatever the number of users.

Every rank yields the same number of batches per epoch, from the footers' row counts: the
smallest shard's rows over the batch size. A shard with more rows leaves some unread (different
ones each epoch: units are read in a per-epoch order); one whose users make fewer rows (users
with fewer than two history events train nothing) reads its units again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, Field

from redrec.data.dataset import EncodedData
from redrec.features.sources import SEQ_FEATURES, seq_table_name
from redrec.train.batches import BatchBuilder, collate
from redrec.train.shards import TrainingSetError, TrainingSetShards, Unit


class StreamConfig(BaseModel):
    batch_rows: int = Field(1024, ge=1, description="users per record batch read from the shard (one chunk)")
    buffer_chunks: int = Field(4, ge=1, description="chunks whose training rows are shuffled together")


@dataclass(frozen=True)
class Catalogue:
    """What every rank holds of the encoding: the item, scenario and action vocabularies."""

    item_ids: list[str]
    scenarios: list[str]
    actions: list[str]
    eligible: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def of(cls, enc: EncodedData) -> "Catalogue":
        return cls(list(enc.item_ids), list(enc.scenarios), list(enc.actions), enc.eligible)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def columns(self, features: tuple[str, ...] = SEQ_FEATURES) -> list[str]:
        return [f"{seq_table_name(s)}__{f}" for s in self.scenarios for f in features]


class _Lookup:
    """Strings -> 1-based catalogue indices (0 never: an unknown value is an error)."""

    def __init__(self, values: list[str], what: str):
        self.values = pa.array([str(v) for v in values], pa.string())
        self.what = what

    def __call__(self, arr: pa.Array, unit: Unit) -> np.ndarray:
        if pa.types.is_large_string(arr.type):
            arr = arr.cast(pa.string())
        if arr.null_count:
            raise TrainingSetError(f"{unit}: {arr.null_count} null {self.what} inside the history windows; rebuild the training set")
        idx = pc.index_in(arr, value_set=self.values)
        if idx.null_count:
            bad = pc.filter(arr, pc.is_null(idx))
            raise TrainingSetError(f"{unit}: {idx.null_count} {self.what} not in the catalogue (e.g. {bad[:3].to_pylist()}); "
                                   "the training set and the prepared data come from different runs")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64) + 1


def encode_chunk(rb: pa.RecordBatch, cat: Catalogue, unit: Unit, items: _Lookup, actions: _Lookup) -> EncodedData:
    """A chunk of training-set rows as an EncodedData of their history windows (one user per row)."""
    n = rb.num_rows
    parts = []
    for j, s in enumerate(cat.scenarios):
        cols = [rb.column(f"{seq_table_name(s)}__{f}") for f in SEQ_FEATURES]
        lens = [pc.fill_null(pc.list_value_length(c), 0).to_numpy(zero_copy_only=False).astype(np.int64) for c in cols]
        bad = np.flatnonzero((lens[0] != lens[1]) | (lens[0] != lens[2]))
        if len(bad):
            u = rb.column("user_id")[int(bad[0])].as_py()
            raise TrainingSetError(f"{unit}: user {u!r}, scenario {s!r}: the window's item_ids, actions and timestamps have "
                                   f"different lengths ({lens[0][bad[0]]}, {lens[1][bad[0]]}, {lens[2][bad[0]]}); rebuild the training set")
        total = int(lens[0].sum())
        if not total:
            continue
        ts = pc.list_flatten(cols[2])
        if ts.null_count:
            raise TrainingSetError(f"{unit}: scenario {s!r}: null timestamps inside the history windows; rebuild the training set")
        row = np.repeat(np.arange(n), lens[0])
        starts = np.concatenate([[0], np.cumsum(lens[0])[:-1]])
        parts.append((row, np.full(total, j), np.arange(total) - np.repeat(starts, lens[0]),
                      ts.to_numpy(zero_copy_only=False).astype(np.int64),
                      items(pc.list_flatten(cols[0]), unit), actions(pc.list_flatten(cols[1]), unit) - 1))
    if parts:
        row, scen, pos, ts, item, act = (np.concatenate(x) for x in zip(*parts))
    else:
        row = scen = pos = ts = item = act = np.zeros(0, np.int64)
    # merge_histories' order (time, then scenario, then position in the window), per user
    order = np.lexsort((pos, scen, ts, row))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]).astype(np.int64)
    eligible = cat.eligible if cat.eligible is not None else np.zeros((len(cat.scenarios), 0), dtype=bool)
    return EncodedData(item_ids=cat.item_ids, user_ids=[str(u) for u in rb.column("user_id").to_pylist()],
                       scenarios=cat.scenarios, actions=cat.actions, offsets=offsets, item=item[order].astype(np.int64),
                       scenario=scen[order].astype(np.int64), action=act[order].astype(np.int64), ts=ts[order], eligible=eligible)


class ShardedTrainSource:
    """The Trainer's training batches, streamed from each rank's shard of the training set at ``path``."""

    def __init__(self, path: str | Path, catalogue: Catalogue | EncodedData, cfg: StreamConfig | None = None):
        self.path = Path(path)
        self.cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.of(catalogue)
        self.cfg = cfg or StreamConfig()
        self._items = _Lookup(self.cat.item_ids, "item ids")
        self._actions = _Lookup(self.cat.actions, "actions")
        self._plans: dict[tuple[int, int], TrainingSetShards] = {}
        plan = self.shards(0, 1)  # checks the layout and the columns up front, naming the file
        plan.require(["user_id", *self.cat.columns()])
        self.n_users = plan.total_rows

    def shards(self, rank: int, world: int) -> TrainingSetShards:
        if (rank, world) not in self._plans:
            self._plans[(rank, world)] = TrainingSetShards(self.path, rank, world)
        return self._plans[(rank, world)]

    def n_batches(self, batch_size: int, world: int = 1) -> int:
        """Batches per epoch, the same on every rank: the smallest shard's rows / batch size."""
        return max(1, min(self.shards(0, world).rows_per_rank()) // batch_size)

    def chunks(self, rank: int, world: int, order=None) -> Iterator[EncodedData]:
        sh = self.shards(rank, world)
        for unit, rb in sh.iter_chunks(self.cfg.batch_rows, self.cat.columns(), order):
            yield encode_chunk(rb, self.cat, unit, self._items, self._actions)

    def item_counts(self, rank: int = 0, world: int = 1) -> np.ndarray:
        """[n_items + 1] training events per item in this rank's shard (sum over ranks: all)."""
        counts = np.zeros(self.cat.n_items + 1, dtype=np.int64)
        sh = self.shards(rank, world)
        cols = self.cat.columns(("item_ids",))
        for unit, rb in sh.iter_chunks(self.cfg.batch_rows, cols):
            for c in cols:
                flat = pc.list_flatten(rb.column(c))
                if len(flat):
                    counts += np.bincount(self._items(flat, unit), minlength=len(counts))
        return counts

    def train_batches(self, batch_size: int, n_cuts: int, seed: int, epoch: int, rank: int = 0, world: int = 1, *,
                      max_len: int, window: int, history_mode: str = "mixed") -> Iterator[dict[str, torch.Tensor]]:
        """Exactly ``n_batches(batch_size, world)`` batches of ``batch_size`` rows; a pure function
        of (seed, epoch, rank, world), so a resumed run replays the same batches."""
        rng = np.random.default_rng([seed, epoch, rank])
        n = self.n_batches(batch_size, world)
        units = len(self.shards(rank, world).units)
        rows: list[dict] = []
        made = 0

        def flush() -> list[list[dict]]:
            """Group the buffered rows; the full batches still owed this epoch."""
            nonlocal rows, made
            batches, rows = _group(rows, batch_size, rng)
            owed = batches[: n - made]
            made += len(owed)
            return owed

        while True:  # one lap over the shard; more when its users make fewer rows than needed
            trained = 0
            for k, enc in enumerate(self.chunks(rank, world, rng.permutation(units))):
                builder = BatchBuilder(enc, max_len, window, history_mode)
                for u in rng.permutation(enc.n_users):
                    r = builder.train_row(int(u), int(enc.offsets[u + 1]), rng, n_cuts)
                    if r is not None:
                        rows.append(r)
                        trained += 1
                if (k + 1) % self.cfg.buffer_chunks == 0 and len(rows) >= batch_size:
                    for b in flush():
                        yield collate(b, window)
                    if made == n:
                        return
            if not trained:
                raise TrainingSetError(f"{', '.join(str(u) for u in self.shards(rank, world).units)}: rank {rank}'s shard has "
                                       "no user with two or more history events to train on")
            if len(rows) >= batch_size:
                for b in flush():
                    yield collate(b, window)
                if made == n:
                    return


def _group(rows: list[dict], batch_size: int, rng: np.random.Generator) -> tuple[list[list[dict]], list[dict]]:
    """Full batches of rows of similar length (shuffled, sorted by length in groups of 16 batches,
    the batches shuffled again, as BatchBuilder.train_batches pads), and the rows left over."""
    order = rng.permutation(len(rows))
    group = 16 * batch_size
    batches, left = [], []
    for g in range(0, len(order), group):
        chunk = order[g : g + group]
        chunk = chunk[np.argsort([len(rows[i]["items"]) for i in chunk], kind="stable")]
        full = len(chunk) // batch_size * batch_size
        batches += [[rows[i] for i in chunk[k : k + batch_size]] for k in range(0, full, batch_size)]
        left += [rows[i] for i in chunk[full:]]
    return [batches[j] for j in rng.permutation(len(batches))], left
