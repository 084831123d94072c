"""The Feast training set as shards: which part each training rank reads, read in bounded memory.

Layout. A training set is a parquet file (the pandas path's ``training_set.parquet``) or a
directory of part files (the Spark path's ``part-*.parquet``), one row per user. A directory of
several parts must carry ``_manifest.json`` (:func:`write_training_set_manifest`, run by the
writer once every part is written): without a listing, a part lost in a copy would silently train
on fewer users. The reader checks the listing against the directory (a listed part missing, a
part not listed, a part whose rows or bytes changed) and the parts' schemas against each other,
all from parquet footers.

Sharding. With at least ``world`` files each rank reads whole files, otherwise row groups; units
go to ranks largest first onto the least-loaded rank (row counts from the footers), so every rank
computes the same plan for every rank without reading data, and the number of batches per epoch
can be agreed on without a collective.

A user in two units would be trained on twice and, worse, on two ranks. How that is ruled out,
without holding a set of all users anywhere at training time:

- ``sorted`` layout (the pandas path, and a Spark write with ``repartitionByRange("user_id")``
  + ``sortWithinPartitions("user_id")``): the units' ``[min, max]`` user ranges, from the footer
  statistics, must not overlap (checked when planning, on every rank, naming both files), and each
  unit's rows must be strictly increasing in ``user_id`` (checked while streaming: O(1) memory,
  the previous id only). Disjoint ranges + strictly increasing within each unit = every user once.
- ``exact`` (any other layout, e.g. hash partitioned): the manifest writer reads every part's
  ``user_id`` column once and refuses a duplicate, naming both files; the reader then relies on
  the manifest, whose rows and byte sizes it checks against every part.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
SINGLE_FILE = "training_set.parquet"
FORMAT = "redrec-training-set/1"
USER = "user_id"


class TrainingSetError(ValueError):
    """A training set that cannot be trained on as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class FileMeta:
    path: Path
    rows: int
    bytes: int
    group_rows: tuple[int, ...]
    # per row group, the user_id range from the footer statistics (None: no statistics)
    group_users: tuple[tuple[str, str] | None, ...]
    schema: pa.Schema


def _file_meta(path: Path) -> FileMeta:
    md = pq.read_metadata(path)
    schema = md.schema.to_arrow_schema().remove_metadata()
    col = schema.get_field_index(USER)
    ranges = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics if col >= 0 else None
        ranges.append((str(st.min), str(st.max)) if st is not None and st.has_min_max else None)
    return FileMeta(path, md.num_rows, path.stat().st_size, tuple(md.row_group(g).num_rows for g in range(md.num_row_groups)),
                    tuple(ranges), schema)


@dataclass(frozen=True)
class Unit:
    """What one rank reads in one go: a whole file, or one row group of a file."""

    file: Path
    row_groups: tuple[int, ...]
    rows: int
    users: tuple[str, str] | None  # [min, max] user_id, None when the footer has no statistics
    whole_file: bool

    def __str__(self) -> str:
        return self.file.name if self.whole_file else f"{self.file.name} (row group {self.row_groups[0]})"


def _part_files(directory: Path) -> list[Path]:
    # Spark also leaves _SUCCESS, .crc and other hidden files beside the parts
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith(("_", ".")))


def _read_manifest(directory: Path) -> dict | None:
    p = directory / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TrainingSetError(f"{p}: not valid JSON ({e}); rewrite it with write_training_set_manifest") from e
    if m.get("format") != FORMAT:
        raise TrainingSetError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}; rewrite it with write_training_set_manifest")
    return m


def training_set_files(path: str | Path) -> tuple[list[FileMeta], dict | None]:
    """The parts of a training set (a file or a directory) with their footers, checked against
    the directory's manifest and against each other's schemas."""
    path = Path(path)
    if path.is_file():
        return [_file_meta(path)], None
    if not path.is_dir():
        raise TrainingSetError(f"{path}: no training set there (neither a parquet file nor a directory)")
    manifest = _read_manifest(path)
    files = _part_files(path)
    if manifest is None:
        if len(files) > 1:
            raise TrainingSetError(f"{path}: {len(files)} part files but no {MANIFEST}, so a missing part cannot be detected; "
                                   "run write_training_set_manifest on the directory once the writer has finished")
        if not files:
            raise TrainingSetError(f"{path}: no parquet files in the training-set directory")
        metas = [_file_meta(files[0])]
    else:
        listed = {f["name"]: f for f in manifest["files"]}
        for name in listed:
            if not (path / name).is_file():
                raise TrainingSetError(f"{path / name}: listed in {MANIFEST} but missing; the training set is incomplete "
                                       "(copy the part again or rebuild the training set)")
        for f in files:
            if f.name not in listed:
                raise TrainingSetError(f"{f}: a part file not listed in {MANIFEST} (left over from another write?); "
                                       "remove it, or rewrite the manifest if it belongs to this training set")
        metas = [_file_meta(path / name) for name in listed]
        for m in metas:
            want = listed[m.path.name]
            if (m.rows, m.bytes) != (want["rows"], want["bytes"]):
                raise TrainingSetError(f"{m.path}: {m.rows} rows / {m.bytes} bytes, but {MANIFEST} lists {want['rows']} rows / "
                                       f"{want['bytes']} bytes: the part changed after the manifest was written; rebuild the training set")
    _check_schemas(metas)
    return metas, manifest


def _check_schemas(metas: list[FileMeta]) -> None:
    """Every part must have the schema most parts have (the first part's on a tie)."""
    groups: dict[str, list[FileMeta]] = {}
    for m in metas:
        groups.setdefault(str(m.schema), []).append(m)
    if len(groups) == 1:
        return
    ref = max(groups.values(), key=len)[0].schema
    ref_types = {f.name: f.type for f in ref}
    for m in metas:
        if m.schema.equals(ref):
            continue
        types = {f.name: f.type for f in m.schema}
        missing = [c for c in ref_types if c not in types]
        other = [f"{c} is {types[c]}, not {t}" for c, t in ref_types.items() if c in types and types[c] != t]
        extra = [c for c in types if c not in ref_types]
        what = "; ".join(filter(None, [missing and f"missing column(s) {missing}", other and ", ".join(other),
                                       extra and f"extra column(s) {extra}"]))
        raise TrainingSetError(f"{m.path}: schema differs from the other part files ({what}); "
                               "the parts come from different writes: rebuild the training set")


def _units(metas: list[FileMeta], world: int) -> tuple[list[Unit], str]:
    def span(ranges):
        return None if any(r is None for r in ranges) or not ranges else (min(r[0] for r in ranges), max(r[1] for r in ranges))

    # empty parts (Spark can write some) hold no one: never a rank's whole shard
    full = [m for m in metas if m.rows]
    if len(full) >= world:
        return [Unit(m.path, tuple(g for g, n in enumerate(m.group_rows) if n), m.rows,
                     span([r for r, n in zip(m.group_users, m.group_rows) if n]), True) for m in full], "files"
    units = [Unit(m.path, (g,), n, m.group_users[g], False) for m in metas for g, n in enumerate(m.group_rows) if n]
    if len(units) < world:
        raise TrainingSetError(f"{metas[0].path.parent}: {len(metas)} file(s) with {len(units)} non-empty row group(s) cannot "
                               f"give each of {world} ranks a shard; write it with smaller row groups (write_training_set's "
                               "row_group_rows) or as more part files")
    return units, "row_groups"


def _check_ranges(units: list[Unit]) -> None:
    """Sorted layout: no two units' user ranges may overlap (else a user may be in both)."""
    for u in units:
        if u.users is None:
            raise TrainingSetError(f"{u.file}: no user_id statistics in the footer, so a user split across parts cannot be "
                                   "ruled out; run write_training_set_manifest on the directory (it checks users exactly)")
    by_min = sorted(units, key=lambda u: u.users)
    for a, b in zip(by_min, by_min[1:]):
        if b.users[0] <= a.users[1]:
            raise TrainingSetError(f"{a} and {b}: user ranges [{a.users[0]}, {a.users[1]}] and [{b.users[0]}, {b.users[1]}] "
                                   f"overlap, so a user may be split across them; write the training set range-partitioned "
                                   "and sorted by user_id, or run write_training_set_manifest (it checks users exactly)")


def balance(rows: Sequence[int], world: int) -> list[list[int]]:
    """Unit indices per rank: largest first onto the least-loaded rank (ties: lower index/rank).
    Deterministic, disjoint, covering."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += rows[i]
    return [sorted(o) for o in out]


class TrainingSetShards:
    """Rank ``rank``'s shard of the training set at ``path``, planned from the footers alone."""

    def __init__(self, path: str | Path, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.path, self.rank, self.world = Path(path), rank, world
        self.files, self.manifest = training_set_files(self.path)
        self.schema = self.files[0].schema
        self.require([USER])
        self.all_units, self.by = _units(self.files, world)
        # an exact check by the manifest writer covers any layout; otherwise the layout must be sorted
        self.users_check = (self.manifest or {}).get("users_check", "sorted")
        if self.users_check != "exact":
            _check_ranges(self.all_units)
        self.plan = balance([u.rows for u in self.all_units], world)
        self.units = [self.all_units[i] for i in self.plan[rank]]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.all_units)

    def rows_per_rank(self) -> list[int]:
        return [sum(self.all_units[i].rows for i in p) for p in self.plan]

    def require(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if self.schema.get_field_index(c) < 0]
        if missing:
            raise TrainingSetError(f"{self.files[0].path}: the training set has no column(s) {missing} (it has "
                                   f"{self.schema.names}); rebuild it with the build-features step for these scenarios")

    def iter_chunks(self, batch_rows: int, columns: Sequence[str] | None = None,
                    order: Sequence[int] | None = None) -> Iterator[tuple[Unit, pa.RecordBatch]]:
        """(unit, record batch of at most ``batch_rows`` users) of this shard, units in ``order``
        (positions in ``self.units``). One record batch is decoded at a time (and at most one row
        group's column chunks buffered), so memory follows ``batch_rows``, not the shard."""
        cols = None if columns is None else list(dict.fromkeys([USER, *columns]))
        if cols is not None:
            self.require(cols)
        for i in range(len(self.units)) if order is None else order:
            unit = self.units[i]
            last = None
            with pq.ParquetFile(unit.file) as pf:
                for rb in pf.iter_batches(batch_size=batch_rows, row_groups=list(unit.row_groups), columns=cols, use_threads=False):
                    if self.users_check != "exact":
                        last = _check_increasing(unit, rb.column(USER), last)
                    yield unit, rb

    def iter_users(self, batch_rows: int, columns: Sequence[str] | None = None,
                   order: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
        for _, rb in self.iter_chunks(batch_rows, columns, order):
            yield rb


def _check_increasing(unit: Unit, users: pa.Array, last: str | None) -> str | None:
    if users.null_count:
        raise TrainingSetError(f"{unit}: {users.null_count} rows without a user_id; rebuild the training set")
    if len(users) == 0:
        return last
    seq = users if last is None else pa.concat_arrays([pa.array([last], users.type), users])
    if len(seq) > 1 and not pc.all(pc.less(seq[:-1], seq[1:])).as_py():
        bad = int(np.flatnonzero(~pc.less(seq[:-1], seq[1:]).to_numpy(zero_copy_only=False))[0])
        a, b = seq[bad].as_py(), seq[bad + 1].as_py()
        why = f"user {a!r} appears twice" if a == b else f"user {b!r} follows {a!r}: the rows are not sorted by user_id"
        raise TrainingSetError(f"{unit}: {why}; the training set must hold each user once, sorted by user_id within a part "
                               "(or run write_training_set_manifest, which checks users exactly for other layouts)")
    return users[-1].as_py()


# ---- writing ------------------------------------------------------------------------------------


def _user_span(path: Path) -> tuple[str, str] | None | bool:
    """(first, last) user of a part whose rows are strictly increasing in user_id, None for an
    empty part, False when they are not increasing. Streams the user_id column: O(1) memory."""
    first = last = None
    with pq.ParquetFile(path) as pf:
        for rb in pf.iter_batches(batch_size=65536, columns=[USER], use_threads=False):
            col = rb.column(USER)
            if col.null_count:
                raise TrainingSetError(f"{path}: {col.null_count} rows without a user_id; rebuild the training set")
            if not len(col):
                continue
            seq = col if last is None else pa.concat_arrays([pa.array([last], col.type), col])
            if len(seq) > 1 and not pc.all(pc.less(seq[:-1], seq[1:])).as_py():
                return False
            first = col[0].as_py() if first is None else first
            last = col[-1].as_py()
    return None if first is None else (first, last)


def _exact_duplicate(metas: list[FileMeta]) -> tuple[str, list[Path]] | None:
    """The first user held by more than one row, and the files holding it (None: all distinct).
    Holds every user id once, in the writer's process, which only layouts other than sorted need."""
    ids = [pq.read_table(m.path, columns=[USER]).column(USER).combine_chunks() for m in metas]
    owner = np.repeat(np.arange(len(metas)), [len(a) for a in ids])
    allids = pa.chunked_array(ids).combine_chunks() if ids else pa.array([], pa.string())
    enc = pc.dictionary_encode(allids)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(codes, minlength=len(enc.dictionary))
    if not (counts > 1).any():
        return None
    dup = int(np.flatnonzero(counts > 1)[0])
    files = sorted({metas[int(o)].path for o in owner[codes == dup]})
    return enc.dictionary[dup].as_py(), files


def write_training_set_manifest(directory: str | Path) -> dict:
    """List the part files of a training-set directory with their rows and bytes in
    ``_manifest.json`` (written last, atomically: its presence means the write finished), after
    checking their schemas agree and that no user is in two rows. Raises, naming the files, when
    they do not."""
    d = Path(directory)
    files = _part_files(d)
    if not files:
        raise TrainingSetError(f"{d}: no parquet part files to list")
    metas = [_file_meta(f) for f in files]
    _check_schemas(metas)
    if metas[0].schema.get_field_index(USER) < 0:
        raise TrainingSetError(f"{metas[0].path}: no 'user_id' column; rebuild the training set with the build-features step")
    spans = [_user_span(m.path) for m in metas]
    check = "sorted"
    if any(sp is False for sp in spans):
        check = "exact"
    else:
        try:
            _check_ranges([Unit(m.path, (), m.rows, sp, True) for m, sp in zip(metas, spans) if sp is not None])
        except TrainingSetError:
            check = "exact"
    if check == "exact":
        dup = _exact_duplicate(metas)
        if dup is not None:
            user, where = dup
            names = " and ".join(str(p) for p in where)
            raise TrainingSetError(f"{names}: user {user!r} is in more than one row" + (" (split across part files)" if len(where) > 1 else "")
                                   + "; the training set must hold each user once: rebuild it")
    manifest = {"format": FORMAT, "rows": sum(m.rows for m in metas), "users_check": check,
                "files": [{"name": m.path.name, "rows": m.rows, "bytes": m.bytes, "row_groups": len(m.group_rows)} for m in metas]}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, d / MANIFEST)
    return manifest


def write_training_set(table: pa.Table, directory: str | Path, row_group_rows: int = 2048) -> Path:
    """The pandas path's writer: one ``training_set.parquet`` sorted by user_id, in row groups
    small enough to shard across ranks, plus its manifest. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    table = table.sort_by(USER)
    pq.write_table(table, d / SINGLE_FILE, row_group_size=row_group_rows)
    write_training_set_manifest(d)
    return d


def read_training_set(path: str | Path, users: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole training set, or only the rows of ``users`` (read with row-group pruning), as
    one table; the layout and manifest checks are :func:`training_set_files`'."""
    metas, _ = training_set_files(path)
    filters = None if users is None else [(USER, "in", list(users))]
    cols = None if columns is None else list(columns)
    tables = [pq.read_table(m.path, columns=cols, filters=filters) for m in metas]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
