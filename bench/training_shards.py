"""Peak memory of a training rank streaming its shard of the training set, vs reading it whole.

    python bench/training_shards.py [--users 10000 100000] [--world 2] [--out bench/results/training_shards.json]

Writes a synthetic Feast-shaped training set per size with pyarrow (3 scenarios, windows of 0-50
events each, sorted part files with their manifest), then, each in a fresh subprocess so the
numbers are that process's own peak (``ru_maxrss``):

- ``streamed``: :func:`reader_peak_rss`, one epoch of rank r's training batches from its shard
  (record batches -> encoded chunks -> BatchBuilder rows -> collated tensors), as the Trainer
  consumes them; ``baseline`` is the same process after imports and planning, before streaming.
- ``whole``: today's reader's first steps on the same set: ``pd.read_parquet`` of all of it and
  the merged per-user histories (``TrainingSet.histories``) that ``from_training_set`` builds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = ["homefeed", "search", "ads"]
ACTIONS = ["click", "like", "skip"]


def write_synthetic_training_set(d: Path, n_users: int, n_items: int = 20000, window: int = 50, n_files: int = 8,
                                 row_group_rows: int = 1024, seed: int = 0) -> dict:
    """A training set shaped like the build-features step's, written straight with pyarrow;
    returns its catalogue (item ids, scenarios, actions)."""
    from redrec.features.sources import seq_table_name
    from redrec.train.shards import write_training_set_manifest

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    item_ids = pa.array([f"it{i:07d}" for i in range(n_items)])
    bounds = np.linspace(0, n_users, n_files + 1).astype(int)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        n = b - a
        cols = {"user_id": pa.array([f"u{u:09d}" for u in range(a, b)]),
                "event_timestamp": pa.array(np.full(n, 1_700_000_000_000_000 + 10**12), pa.timestamp("us", tz="UTC"))}
        for s in SCENARIOS:
            lens = rng.integers(0, window + 1, size=n)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
            total = int(lens.sum())
            items = item_ids.take(pa.array(np.minimum(rng.zipf(1.3, size=total) - 1, n_items - 1)))
            acts = pa.array(ACTIONS).take(pa.array(rng.integers(0, len(ACTIONS), size=total)))
            ts = 1_700_000_000 + np.cumsum(rng.integers(1, 3600, size=total))  # increasing within each window
            null = pa.array(lens == 0)  # an empty window is a null list, as Feast returns it
            for f, values in (("item_ids", items), ("actions", acts), ("timestamps", pa.array(ts))):
                cols[f"{seq_table_name(s)}__{f}"] = pa.ListArray.from_arrays(offsets, values, mask=null)
        pq.write_table(pa.table(cols), d / f"part-{k:05d}.parquet", row_group_size=row_group_rows)
    write_training_set_manifest(d)
    return {"item_ids": item_ids.to_pylist(), "scenarios": SCENARIOS, "actions": ACTIONS}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def reader_peak_rss(path: str | Path, catalogue: str | Path, rank: int, world: int, batch_rows: int = 1024,
                    batch_size: int = 128, buffer_chunks: int = 4, max_len: int = 50, window: int = 10) -> dict:
    """Peak RSS (MiB) of a fresh process streaming one epoch of rank ``rank``'s training batches.
    ``catalogue``: a JSON file with item_ids, scenarios and actions."""
    return _run_child(["streamed", str(path), str(catalogue), str(rank), str(world), str(batch_rows), str(batch_size),
                       str(buffer_chunks), str(max_len), str(window)])


def whole_peak_rss(path: str | Path, catalogue: str | Path) -> dict:
    return _run_child(["whole", str(path), str(catalogue)])


def _maxrss_mib() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, which exec replaces; ru_maxrss
    would start at the parent's peak (Linux keeps it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(argv: list[str]) -> dict:
    import torch  # noqa: F401  (in the baseline: the trainer's process has it)

    from redrec.train.stream import Catalogue, ShardedTrainSource, StreamConfig

    mode, path, cat_path = argv[:3]
    cat = json.loads(Path(cat_path).read_text())
    catalogue = Catalogue(cat["item_ids"], cat["scenarios"], cat["actions"])
    if mode == "whole":
        import pandas as pd

        from redrec.features.store import DuplicateReport, TrainingSet
        from redrec.train.shards import training_set_files

        base = _maxrss_mib()
        t0 = time.time()
        df = pd.concat([pd.read_parquet(m.path) for m in training_set_files(path)[0]], ignore_index=True)
        hist = TrainingSet(df, DuplicateReport(["user_id"], len(df))).histories(catalogue.scenarios)
        return {"mode": mode, "users": len(df), "events": sum(map(len, hist)), "baseline_mib": round(base, 1),
                "peak_mib": round(_maxrss_mib(), 1), "seconds": round(time.time() - t0, 1)}
    rank, world, batch_rows, batch_size, buffer_chunks, max_len, window = map(int, argv[3:10])
    src = ShardedTrainSource(path, catalogue, StreamConfig(batch_rows=batch_rows, buffer_chunks=buffer_chunks))
    shard = src.shards(rank, world)
    base = _maxrss_mib()
    t0 = time.time()
    batches = tokens = 0
    for b in src.train_batches(batch_size, 0, seed=0, epoch=0, rank=rank, world=world, max_len=max_len, window=window):
        batches += 1
        tokens += int(b["length"].sum())
    return {"mode": mode, "rank": rank, "world": world, "users_in_set": src.n_users, "users_in_shard": shard.rows,
            "batches": batches, "tokens": tokens, "batch_rows": batch_rows, "batch_size": batch_size,
            "buffer_chunks": buffer_chunks, "baseline_mib": round(base, 1), "peak_mib": round(_maxrss_mib(), 1),
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-set reader (slow and large at 100k+ users)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="redrec-shards-bench-") as tmp:
        for n in a.users:
            d = Path(tmp) / f"ts-{n}"
            cat = write_synthetic_training_set(d, n)
            cat_path = Path(tmp) / f"catalogue-{n}.json"
            cat_path.write_text(json.dumps(cat))
            size = sum(p.stat().st_size for p in d.glob("*.parquet"))
            for r in range(a.world):
                res = reader_peak_rss(d, cat_path, r, a.world, a.batch_rows)
                results.append({"users": n, "parquet_mib": round(size / 2**20, 1), **res})
                print(json.dumps(results[-1]), flush=True)
            if not a.no_whole:
                results.append({"users": n, "parquet_mib": round(size / 2**20, 1), **whole_peak_rss(d, cat_path)})
                print(json.dumps(results[-1]), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("streamed", "whole"):
        print(json.dumps(_child(sys.argv[1:])))
    else:
        main()
