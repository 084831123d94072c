"""Peak memory and wall time of the drift check as the serving log grows (1 M, 5 M, 20 M lines).

    python bench/drift_volume.py [--sizes 1000000,5000000,20000000] [--old-sizes 1000000]

The log is what the serving pods write (the engine's response record and the feedback record,
compact JSON as AppendLog writes them): 4 pods, files rotated hourly (mtime = their last line),
72 h of traffic (the chart's retention) ending at --now; one response line per request (10 items
and scores, a 64-d user embedding, timings) and on average 3 feedback lines (2 reacting to a
response, 1 unprompted). The files are named pipes by default: a thread writes each file's lines
(the same bytes a regular file would hold) as the check opens it, so no size needs disk (20 M
lines are ~8 GB; this machine's shared disk had less free); --files writes regular files.

Each check is the CronJob's entry point, `redrec drift check` (24 h window, the shipped
thresholds, trigger off), in a child process; its peak RSS is read with getrusage(RUSAGE_CHILDREN)
in a wrapper process of its own, so one run's peak never hides another's. The peer is the old
loader: the same command from the commit before the streaming reader (--old-ref, extracted with
git archive), which holds every line of the log as a dict; it runs at --old-sizes only (at 5 M
lines it needs more memory than this machine has).

The reference: 7 days of the same traffic (behaviour events, recorded with record_reference) and
model outputs drawn like the log's (embeddings, scores, replay hit rate), so every check runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redrec.drift.reference import record_reference  # noqa: E402
from redrec.experiments.log import FILE_AGE_SLACK_S  # noqa: E402

OLD_REF = "ecbd2f3cdc5640391de9fb6bc1a3d7628e024949"  # the last commit with the all-in-memory loader
SCENARIOS = ("homefeed", "search", "ads")
SHARE = (0.6, 0.3, 0.1)
ACTIONS = ("click", "like", "skip")
N_ITEMS, DIM, K, PODS, HOURS = 20_000, 64, 10, 4, 72
FEEDBACK_PER_REQUEST = 3.0  # 2 reactions to a response + 1 unprompted event, on average

WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=4 * 3600)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kib": rss, "stderr_tail": p.stderr[-2000:]}))
"""


class Traffic:
    """The generator of users' requests and events (shared by the reference and the log)."""

    def __init__(self, n_users: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.n_users = n_users
        # item popularity: Zipf within each scenario's catalogue slice
        self.item_p = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.9
        self.item_p /= self.item_p.sum()
        self.user_p = 1.0 / np.arange(1, n_users + 1) ** 0.7
        self.user_p /= self.user_p.sum()
        r = np.random.default_rng(1)
        # pools of serialised vectors: sizes and values like the engine's (rounded to 5 / 6 decimals)
        emb = r.normal(size=(4096, DIM))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        self.emb_pool = [json.dumps([round(float(x), 5) for x in v], separators=(",", ":")) for v in emb]
        sc = np.sort(r.beta(5, 3, size=(4096, K)), axis=1)[:, ::-1]
        self.score_pool = [json.dumps([round(float(x), 6) for x in v], separators=(",", ":")) for v in sc]
        self.emb = emb
        self.scores = sc

    def draw(self, rng: np.random.Generator, n: int, t0: float, t1: float):
        users = rng.choice(self.n_users, size=n, p=self.user_p)
        scen = rng.choice(3, size=n, p=SHARE)
        ts = np.sort(rng.uniform(t0, t1, size=n))
        items = rng.choice(N_ITEMS, size=(n, K), p=self.item_p)
        return users, scen, ts, items


def reference_events(tr: Traffic, t0: float, t1: float, n: int) -> pd.DataFrame:
    users, scen, ts, items = tr.draw(tr.rng, n, t0, t1)
    pick = tr.rng.integers(0, K, size=n)
    return pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{items[i, pick[i]]}" for i in range(n)],
                         "scenario": np.asarray(SCENARIOS)[scen], "action": tr.rng.choice(ACTIONS, size=n, p=(0.6, 0.1, 0.3)),
                         "ts": ts.astype("int64")})


def build_reference(work: Path, now: float) -> Path:
    tr = Traffic(60_000, seed=11)
    ev = reference_events(tr, now - (HOURS + 8 * 24) * 3600, now - HOURS * 3600, 300_000)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)], "title": "t", "body": "b",
                          "tags": [[f"cat{i % 40}"] for i in range(N_ITEMS)], "scenarios": [list(SCENARIOS)] * N_ITEMS, "image": None})
    ref = record_reference(ev, items, work / "reference")
    # model outputs drawn like the log's: the model-side checks run on both sides
    rng = np.random.default_rng(12)
    rows, srows, hits = [], [], {}
    for s in SCENARIOS:
        idx = rng.integers(0, len(tr.emb), size=2000)
        hl = rng.integers(1, 60, size=2000)
        rows.append(pd.DataFrame({"scenario": s, "history_len": hl, **{f"e{d}": tr.emb[idx, d] for d in range(DIM)}}))
        for r in range(K):
            srows.append(pd.DataFrame({"scenario": s, "history_len": hl, "rank": r, "score": tr.scores[idx, r]}))
        hits[s] = {"k": K, "requests": 2000, "hits": {"click": 600, "like": 100, "skip": 300}}
    pd.concat(rows, ignore_index=True).to_parquet(ref / "user_embeddings.parquet", index=False)
    pd.concat(srows, ignore_index=True).to_parquet(ref / "scores.parquet", index=False)
    info = json.loads((ref / "reference.json").read_text())
    info["model"] = {"dim": DIM, "variant": "redrec", "n_requests": 6000, "requests_at": "window-end", "replay_hits": hits}
    (ref / "reference.json").write_text(json.dumps(info))
    return ref


class Log:
    """``n_lines`` serving-log lines over the HOURS before ``now``: one file per pod, kind and hour
    (hourly rotation), each generated on its own from (seed, hour), so any file can be written
    alone and in any order."""

    def __init__(self, log_dir: Path, n_lines: int, now: float, seed: int):
        self.dir, self.now, self.seed = log_dir, now, seed
        self.n_req = int(round(n_lines / (1 + FEEDBACK_PER_REQUEST)))
        self.n_fb = n_lines - self.n_req
        self.req_h = np.diff(np.linspace(0, self.n_req, HOURS + 1).round().astype(int))
        self.fb_h = np.diff(np.linspace(0, self.n_fb, HOURS + 1).round().astype(int))
        self.tr = Traffic(max(20_000, n_lines // 30), seed)
        self.files = {}  # name -> (hour, pod, kind)
        for h in range(HOURS):
            for kind in ("serving", "feedback"):
                for pod in range(PODS):
                    base = f"{kind}-redrec-serving-{pod}-7"
                    self.files[f"{base}.jsonl" if h == 0 else f"{base}.{h}.jsonl"] = (h, pod, kind)
        self.bytes = {"serving": 0, "feedback": 0}
        self.lines = {"serving": 0, "feedback": 0}

    def mtime(self, h: int) -> float:
        return min(self.now - (HOURS - h - 1) * 3600 - 1, self.now)  # written until the hour's end

    def hour(self, h: int, pod: int, kind: str) -> bytes:
        tr, rng = self.tr, np.random.default_rng([self.seed, h])
        t0 = self.now - (HOURS - h) * 3600
        n, nf = int(self.req_h[h]), int(self.fb_h[h])
        users, scen, ts, items = tr.draw(rng, n, t0, t0 + 3600)
        rid = [f"{x:032x}" for x in rng.integers(0, 2**63, size=n)]
        cold, fallback = rng.random(n) < 0.05, rng.random(n) < 0.005
        emb_i, hl, lat = rng.integers(0, len(tr.emb_pool), size=n), rng.integers(1, 60, size=n), rng.gamma(3, 4, size=n)
        # feedback: 2/3 react to a response (an item it served, seconds later), 1/3 unprompted
        nr = min(nf * 2 // 3, 4 * n)
        src, delay, pick = rng.integers(0, n, size=nr), rng.exponential(30, size=nr), rng.integers(0, K, size=nr)
        act = rng.choice(ACTIONS, size=nf, p=(0.6, 0.1, 0.3))
        u2, s2, t2, it2 = tr.draw(rng, nf - nr, t0, t0 + 3600)
        out = []
        if kind == "serving":
            for i in np.flatnonzero(users % PODS == pod):
                it = '["' + '","'.join(f"i{x}" for x in items[i]) + '"]'
                warm = not cold[i] and not fallback[i]
                line = (f'{{"request_id":"{rid[i]}","experiment":"default","user_id":"u{users[i]}","scenario":"{SCENARIOS[scen[i]]}",'
                        f'"arm":"control","model_version":"{"popularity" if fallback[i] else "v7"}","index_version":"idx-7",'
                        f'"items":{it},"scores":{tr.score_pool[emb_i[i]]},"cold_start":{"true" if cold[i] else "false"},'
                        f'"fallback":{"true" if fallback[i] else "false"},"ts":{float(ts[i])!r},"latency_ms":{round(float(lat[i]), 3)!r},'
                        f'"queue_ms":0.412,"feast_ms":3.105,"tower_ms":2.87,"search_ms":{round(float(lat[i]) / 2, 3)!r},"batch_size":8')
                if warm:
                    line += f',"index_collection":"redrec_items_7","history_len":{int(hl[i])},"user_embedding":{tr.emb_pool[emb_i[i]]}'
                out.append((ts[i], line + "}\n"))
        else:
            for j in np.flatnonzero(users[src] % PODS == pod):
                i = src[j]
                rec = ts[i] + delay[j]
                out.append((rec, f'{{"user_id":"u{users[i]}","item_id":"i{items[i, pick[j]]}","scenario":"{SCENARIOS[scen[i]]}",'
                                 f'"action":"{act[j]}","ts":{int(rec)},"request_id":"{rid[i]}","received_ts":{float(rec)!r}}}\n'))
            for j in np.flatnonzero(u2 % PODS == pod):
                out.append((t2[j], f'{{"user_id":"u{u2[j]}","item_id":"i{it2[j, 0]}","scenario":"{SCENARIOS[s2[j]]}",'
                                   f'"action":"{act[nr + j]}","ts":{int(t2[j])},"request_id":null,"received_ts":{float(t2[j])!r}}}\n'))
        out.sort(key=lambda x: x[0])
        data = "".join(x[1] for x in out).encode()
        self.bytes[kind] += len(data)
        self.lines[kind] += len(out)
        return data

    def write(self) -> None:
        """Regular files."""
        self.dir.mkdir(parents=True)
        for name, (h, pod, kind) in self.files.items():
            (self.dir / name).write_bytes(self.hour(h, pod, kind))
            os.utime(self.dir / name, (self.mtime(h), self.mtime(h)))

    def serve(self, opened_after: float | None) -> threading.Thread:
        """Named pipes instead of files (no disk: 20 M lines are ~8 GB): a thread writes each
        file's lines when the reader opens it, in the reader's order (sorted names), skipping the
        files a reader with ``opened_after`` leaves unopened (last written before it)."""
        self.dir.mkdir(parents=True)
        for name, (h, _, _) in self.files.items():
            os.mkfifo(self.dir / name)
            os.utime(self.dir / name, (self.mtime(h), self.mtime(h)))

        def feed():
            for name in sorted(self.files):
                h, pod, kind = self.files[name]
                if opened_after is not None and self.mtime(h) < opened_after:
                    continue
                data = self.hour(h, pod, kind)
                try:
                    with open(self.dir / name, "wb") as f:  # blocks until the reader opens it
                        f.write(data)
                except BrokenPipeError:
                    return

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        return t

    def release(self) -> None:
        """Unblock a feeder whose reader stopped early, then remove the pipes."""
        for name in sorted(self.files):
            try:
                os.close(os.open(self.dir / name, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict:
        n = sum(self.lines.values())
        return {"lines_written": n, "bytes_written": sum(self.bytes.values()),
                "bytes_per_line": round(sum(self.bytes.values()) / max(n, 1), 1),
                "bytes_per_response_line": round(self.bytes["serving"] / max(self.lines["serving"], 1), 1),
                "bytes_per_feedback_line": round(self.bytes["feedback"] / max(self.lines["feedback"], 1), 1),
                "files": len(self.files), "response_lines": self.n_req, "feedback_lines": self.n_fb,
                "est_gib_on_disk": round((self.n_req * self.bytes["serving"] / max(self.lines["serving"], 1)
                                          + self.n_fb * self.bytes["feedback"] / max(self.lines["feedback"], 1)) / 2**30, 2)}


def run_check(pythonpath: Path, config: Path, ref: Path, log_dir: Path, out: Path, now: float) -> dict:
    """`redrec drift check` as the CronJob runs it, in a wrapper that reports the child's peak RSS."""
    cmd = [sys.executable, "-m", "redrec.cli", "drift", "check", "--config", str(config), "--reference", str(ref), "--out", str(out),
           "--serving-log", str(log_dir), "--now", str(now), "--window-hours", "24", "--no-trigger",
           "--thresholds", str(ROOT / "monitoring" / "thresholds.yaml")]
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True, cwd=str(pythonpath))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["peak_rss_mib"] = round(res.pop("maxrss_kib") / 1024, 1)
    res["wall_s"] = round(res["wall_s"], 1)
    runs = [d for d in out.iterdir() if d.is_dir()] if out.exists() else []
    if runs:
        s = json.loads((runs[0] / "summary.json").read_text())
        res["status"] = s.get("status")
        res["verdicts"] = {x["scenario"]: x["verdict"] for x in s.get("scenarios", [])}
        res["inputs"] = s.get("inputs")
        smp = s.get("sampling")
        if smp:
            res["sampling"] = {"sampled": smp["sampled"], "peak_kept_events": smp["peak_kept_events"],
                               "peak_kept_requests": smp["peak_kept_requests"], "scenarios": smp["scenarios"]}
    if res["rc"] not in (0, 3):
        print(f"check failed (rc {res['rc']}):\n{res['stderr_tail']}", file=sys.stderr)
    else:
        res.pop("stderr_tail")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,5000000,20000000")
    ap.add_argument("--old-sizes", default="1000000", help="sizes at which the old loader runs too ('' = none)")
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--files", action="store_true", help="write regular files (~0.4 KB a line on disk) instead of named pipes")
    # its own section of drift.json: the ML-1M timing of bench/drift.py keeps the top level
    ap.add_argument("--out", default=str(ROOT / "bench/results/drift.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    old_sizes = {int(x) for x in args.old_sizes.split(",") if x}
    work = Path(args.work or tempfile.mkdtemp(prefix="redrec-drift-volume-"))
    work.mkdir(parents=True, exist_ok=True)
    now = float(int(time.time()))
    old_tree = work / "old"
    if old_sizes:
        old_tree.mkdir(exist_ok=True)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_ref, "redrec", "monitoring"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=arch.stdout, check=True)
    ref = build_reference(work, now)
    config = work / "config.yaml"  # the chart's config.yaml as far as the drift check reads it
    config.write_text(json.dumps({"scenarios": list(SCENARIOS), "drift": {"window_hours": 24, "cooldown_hours": 6}}))
    rows = []
    margin_start = now - 48 * 3600  # the window (24 h) and the reference's seq lookback (24 h)
    for n in sizes:
        row = {"target_lines": n}
        for side in ("new", "old") if n in old_sizes else ("new",):
            log = Log(work / f"log-{n}-{side}", n, now, seed=n % 1000 + 1)
            t0 = time.perf_counter()
            if args.files:
                log.write()
                feeder = None
            else:  # the new reader leaves files older than the margin unopened; the old one opens all
                feeder = log.serve(margin_start - FILE_AGE_SLACK_S if side == "new" else None)
            try:
                row[side] = run_check(ROOT if side == "new" else old_tree, config, ref, log.dir, work / f"out-{side}-{n}", now)
            finally:
                if feeder is not None:
                    feeder.join(timeout=1)
                log.release()
            row[side]["log"] = {**log.stats(), "source": "files" if args.files else "named pipes (same names, mtimes, bytes)",
                                "write_and_check_s": round(time.perf_counter() - t0, 1)}
            print(f"{n:>11,} lines, {side}: {row[side]['peak_rss_mib']} MiB peak RSS, {row[side]['wall_s']} s "
                  f"({log.stats()['bytes_per_line']:.0f} B/line, {log.stats()['lines_written']:,} lines read from the log)", flush=True)
        if "old" in row:
            row["old_over_new_rss"] = round(row["old"]["peak_rss_mib"] / row["new"]["peak_rss_mib"], 2)
            row["old_over_new_wall"] = round(row["old"]["wall_s"] / row["new"]["wall_s"], 2)
        rows.append(row)
    rss = [r["new"]["peak_rss_mib"] for r in rows]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2-core AMD EPYC shared with other jobs: wall times are noisy; RSS is not"},
        "setup": {"hours_of_log": HOURS, "window_hours": 24, "pods": PODS, "items_per_response": K, "embedding_dim": DIM,
                  "feedback_lines_per_response": FEEDBACK_PER_REQUEST, "old_ref": args.old_ref,
                  "entry_point": "redrec drift check (the CronJob's), trigger off, monitoring/thresholds.yaml"},
        "sizes": rows,
        "new_peak_rss_max_over_min": round(max(rss) / min(rss), 3) if rss else None,
        "targets": {"flat_within_20pct": bool(rss) and max(rss) / min(rss) <= 1.2, "under_1_gib": bool(rss) and max(rss) < 1024},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    whole = json.loads(out.read_text()) if out.exists() else {}
    whole["volume"] = result
    out.write_text(json.dumps(whole, indent=2))
    print(f"\n{'lines':>11} {'B/line':>7} {'new MiB':>8} {'new s':>7} {'old MiB':>8} {'old s':>7} {'old/new RSS':>11}  status")
    for r in rows:
        o = r.get("old") or {}
        print(f"{r['target_lines']:>11,} {r['new']['log']['bytes_per_line']:>7.0f} {r['new']['peak_rss_mib']:>8} {r['new']['wall_s']:>7} "
              f"{o.get('peak_rss_mib', '-'):>8} {o.get('wall_s', '-'):>7} {r.get('old_over_new_rss', '-'):>11}  {r['new'].get('status')}")
    print(f"peak RSS max/min {result['new_peak_rss_max_over_min']} (target <= 1.2), targets {result['targets']}; "
          f"cpu_count={os.cpu_count()} (shared); results: {args.out}")


if __name__ == "__main__":
    main()
