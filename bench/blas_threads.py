"""The exact search's matrix product under a capped and an uncapped BLAS pool.

Why serving caps numpy's (and scipy's) OpenBLAS at ``serving.torch_threads``: on shared cores the
pool's threads spin against the others, so the same product costs several times the CPU and a long
tail. One micro-batch's product (``--batch`` requests x ``--items`` unit vectors of ``--dim``) is
timed with 1 thread and with one per core (OpenBLAS's default, the peer), alternating; wall p50/p99
and CPU per product go to bench/results/blas-threads.json. Run it beside a loaded core to see what
the server sees (the JSON records the load average).

    python bench/blas_threads.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redrec.index.milvus import similarity  # noqa: E402


def measure(threads: int, q: np.ndarray, x: np.ndarray, reps: int) -> dict:
    with threadpool_limits(threads, user_api="blas"):
        lat, c0 = [], time.process_time()
        for _ in range(reps):
            t = time.perf_counter()
            similarity("COSINE", q, x)
            lat.append(time.perf_counter() - t)
        cpu = (time.process_time() - c0) / reps
    return {"threads": threads, "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3), "cpu_ms": round(cpu * 1e3, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=50, help="requests in the micro-batch (one query vector each)")
    ap.add_argument("--items", type=int, default=3883, help="catalogue size (ML-1M: 3883)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "blas-threads.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.items, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
    default = os.cpu_count() or 1
    runs = [measure(t, q, x, args.reps) for _ in range(args.rounds) for t in (default, 1)]
    best = {t: min((r for r in runs if r["threads"] == t), key=lambda r: r["cpu_ms"]) for t in (default, 1)}
    out = {"benchmark": "blas-threads", "batch": args.batch, "items": args.items, "dim": args.dim, "reps": args.reps,
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": list(os.getloadavg()),
           "blas": [{k: i[k] for k in ("internal_api", "prefix", "num_threads")} for i in threadpool_info() if i["user_api"] == "blas"],
           "runs": runs, "cpu_ratio_default_to_capped": round(best[default]["cpu_ms"] / best[1]["cpu_ms"], 2),
           "p99_ratio_default_to_capped": round(best[default]["p99_ms"] / best[1]["p99_ms"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'threads':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms':>8}")
    for r in runs:
        print(f"{r['threads']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['cpu_ms']:>8}")
    print(f"default/capped: cpu {out['cpu_ratio_default_to_capped']}x, p99 {out['p99_ratio_default_to_capped']}x "
          f"(load average {out['load_average'][0]:.2f}); written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
