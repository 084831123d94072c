"""What checking a stored model's SHA-256 costs a load, against the load itself.

A model store version is written with ``ModelStore.put`` (a real export of a small trained model,
its item table and embeddings grown to ``--items`` rows so the files have a catalogue's size),
then loaded the way serving does (``ModelSource.load`` + ``item_embeddings.npy``) with the check
(``ModelStore.path`` verifies every file) and without (the same files read unchecked). Serving
pays this once per model load or config reload, never per request.

    python bench/model_store_verify.py [--items 100000 1000000] [--repeats 3]

Writes bench/results/model-store-verify.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.quality import machine  # noqa: E402


def grow(ckpt: Path, n_items: int) -> None:
    """The checkpoint's item table and embeddings at ``n_items`` rows (random values: only the
    byte counts matter here)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(ckpt / "serving.safetensors")
    reps = t["item_reps"]
    t["item_reps"] = torch.randn(n_items + 1, reps.shape[1], dtype=reps.dtype)
    save_file(t, ckpt / "serving.safetensors")
    emb = np.load(ckpt / "item_embeddings.npy")
    np.save(ckpt / "item_embeddings.npy", np.random.default_rng(0).standard_normal((n_items, emb.shape[1]), dtype=np.float32))
    (ckpt / "item_ids.json").write_text(json.dumps([f"i{i}" for i in range(n_items)]))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["n_items"] = n_items
    (ckpt / "config.json").write_text(json.dumps(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np

    from models_util import tiny_model
    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.model.checkpoint import load_for_serving
    from redrec.release.model_store import ModelStore
    from redrec.serving.registry import ModelSource

    rows = []
    with tempfile.TemporaryDirectory(prefix="redrec-bench-store-") as tmp:
        tmp = Path(tmp)
        base = tiny_model(generate(SyntheticConfig(n_users=120, n_items=200, seed=3)), tmp / "m", seed=0)
        for n in args.items:
            ck = tmp / f"ck{n}"
            os.system(f"cp -r {base} {ck}")
            grow(ck, n)
            store = ModelStore(str(tmp / f"store{n}"))
            version = f"v{n}"
            store.put(ck, version)
            d = Path(store._dir(version))
            size_mb = sum(f["bytes"] for f in store.manifest(version)["files"].values()) / 2**20
            source = ModelSource(store.uri)
            checked, unchecked, verify = [], [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                store.path(version)
                verify.append(time.perf_counter() - t)
                t = time.perf_counter()
                _, info = source.load(version)
                np.load(Path(info["model_dir"]) / "item_embeddings.npy")
                checked.append(time.perf_counter() - t)
                t = time.perf_counter()
                load_for_serving(d)
                np.load(d / "item_embeddings.npy")
                unchecked.append(time.perf_counter() - t)
            row = {"items": n, "model_mb": round(size_mb, 1), "verify_s": round(statistics.median(verify), 3),
                   "load_checked_s": round(statistics.median(checked), 3),
                   "load_unchecked_s": round(statistics.median(unchecked), 3)}
            row["verify_mb_per_s"] = round(size_mb / row["verify_s"], 0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"rows": rows, "repeats": args.repeats, "machine": machine(), "load_avg_at_end": os.getloadavg()}
    dest = ROOT / "bench" / "results" / "model-store-verify.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'items':>9} {'model MB':>9} {'verify s':>9} {'MB/s':>7} {'load+check s':>13} {'load only s':>12}")
    for r in rows:
        print(f"{r['items']:>9} {r['model_mb']:>9} {r['verify_s']:>9} {r['verify_mb_per_s']:>7.0f} "
              f"{r['load_checked_s']:>13} {r['load_unchecked_s']:>12}")
    print(f"\nwrote {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
