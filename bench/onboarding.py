"""How long until an item onboarded with `redrec items add` is served, against its peer: the
retrain that was the only way in before.

One real stack (synthetic data, a cache-residual model trained here, Milvus Lite, embedded Feast,
a model store, `bentoml serve` on 127.0.0.1 polling the store every `--poll-s`): each round
onboards one item the model never trained on and times the command and the moment
`/similar_items` first answers for it (serving has picked up the batch; `/recommend` can rank it
from then on). The peer is the training run of the same model on the same machine in the same
run: what waiting for a retrain costs at the least (no data pipeline, no publication).

    python bench/onboarding.py [--rounds 5] [--poll-s 1]

Writes bench/results/onboarding.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.quality import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--poll-s", type=float, default=1.0, help="serving's model_store.config_poll_s")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "onboarding.json"))
    args = ap.parse_args()

    import httpx
    import yaml

    from redrec.data import encode
    from redrec.data.dataset import RecData
    from redrec.data.split import chronological_split
    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.experiment import ExperimentConfig, train_variant
    from redrec.index.lite import LiteServer
    from redrec.model.checkpoint import export_checkpoint
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare

    work = Path(tempfile.mkdtemp(prefix="redrec-bench-onboarding-"))
    full = generate(SyntheticConfig(n_users=300, n_items=300, seed=5))
    ids = full.items["item_id"].astype(str)
    held = list(ids.iloc[::25][: args.rounds])
    data = RecData(full.name, full.events[~full.events["item_id"].astype(str).isin(held)],
                   full.items[~ids.isin(held)].reset_index(drop=True), full.scenarios, full.actions)
    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": ["redrec"],
        "model": {"item_source": "cache-residual", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
        "train": {"batch_size": 32, "progress": False, "warmup_steps": 5, "max_steps": 300, "eval_every": 100, "seed": 0},
        "out_dir": str(work / "train")})
    enc = encode(data)
    t = time.perf_counter()
    trainer, fit = train_variant(cfg, "redrec", data, enc, chronological_split(enc), work / "train" / "redrec",
                                 log=lambda *a: None, resume=False)
    retrain_s = time.perf_counter() - t
    ckpt = export_checkpoint(trainer.module, work / "model", enc.item_ids, {"variant": "redrec"})

    rounds = []
    with LiteServer(work / "milvus.db") as uri:
        cfg_path = prepare(data, {"v1": ckpt}, work, uri, [{"name": "control", "model_version": "v1", "index_alias": "", "share": 1.0}],
                           seq_len=20, model_store=str(work / "models"))
        raw = yaml.safe_load(cfg_path.read_text())
        raw["model_store"]["config_poll_s"] = args.poll_s
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with LocalServer(cfg_path) as srv:
            items = full.items.set_index(ids)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            for item in held:
                it = items.loc[item]
                f = work / f"{item}.jsonl"
                f.write_text(json.dumps({"item_id": item, "title": it["title"], "body": it["body"], "tags": list(it["tags"]),
                                         "scenarios": list(it["scenarios"])}) + "\n")
                scen = list(it["scenarios"])[0]
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "redrec.cli", "items", "add", "--config", str(cfg_path), str(f)],
                                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
                t_cmd = time.perf_counter() - t0
                if out.returncode != 0:
                    raise SystemExit(f"redrec items add failed:\n{out.stderr[-3000:]}")
                while httpx.post(srv.url + "/similar_items", json={"item_id": item, "scenario": scen, "k": 5},
                                 timeout=30).status_code != 200:
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit(f"{item} not served 300 s after the command started")
                    time.sleep(0.05)
                rounds.append({"item_id": item, "command_s": round(t_cmd, 3), "served_s": round(time.perf_counter() - t0, 3),
                               "steps_s": json.loads(out.stdout)["seconds"]})
    served = statistics.median(r["served_s"] for r in rounds)
    result = {"rounds": rounds, "median_served_s": served, "median_command_s": statistics.median(r["command_s"] for r in rounds),
              "max_served_s": max(r["served_s"] for r in rounds), "poll_s": args.poll_s,
              "peer": {"name": "retrain (training only, same model and data)", "seconds": round(retrain_s, 1),
                       "steps": fit["steps"]},
              "ratio_served_to_retrain": round(served / retrain_s, 4), "machine": machine(),
              "load_avg_at_end": os.getloadavg()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"{'item':<12}{'command s':>11}{'served s':>10}")
    for r in rounds:
        print(f"{r['item_id']:<12}{r['command_s']:>11.2f}{r['served_s']:>10.2f}")
    print(f"median served {served:.1f} s (max {result['max_served_s']:.1f} s) vs retrain {retrain_s:.0f} s "
          f"({fit['steps']} steps): {result['ratio_served_to_retrain']:.3f}x\nwritten {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
