"""Training end to end on synthetic data: learning, determinism, kill + resume, export, 2 ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from redrec.data import chronological_split, encode, load_dataset
from redrec.evaluate import evaluate_model, evaluate_popularity
from redrec.experiment import ExperimentConfig, build_model_config, train_variant, training_record
from redrec.model.checkpoint import export_checkpoint, load_for_serving
from redrec.model.recommender import ModelConfig, RecModel
from redrec.train.batches import BatchBuilder

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out_dir, **train):
    return {
        "dataset": "synthetic",
        "dataset_args": {"n_users": 120, "n_items": 200, "seed": 3},
        "variants": ["redrec"],
        "model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
        "train": {"epochs": 2, "batch_size": 16, "negatives": 64, "progress": False, "warmup_steps": 2, **train},
        "out_dir": str(out_dir),
    }


def run_cli(args, log, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("item_source", ["cache-residual", "cache-finetune", "id"])
def test_short_training_beats_popularity_by_a_clear_margin(tmp_path, item_source):
    """Text-initialised items and plain id items both learn: with side-information tables at
    nn.Embedding's default std 1, an id-item RED-Rec stayed at popularity (0.049 vs 0.049 NDCG@10
    on the synthetic bench), its items drowned in the side information added to them."""
    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "dataset_args": {"n_users": 600, "seed": 0}, "model": {"item_source": item_source},
        "train": {"epochs": 20, "batch_size": 32, "progress": False, "warmup_steps": 10}, "out_dir": str(tmp_path),
    })
    data = load_dataset(cfg.dataset, **cfg.dataset_args)
    enc = encode(data)
    split = chronological_split(enc)
    trainer, fit = train_variant(cfg, "redrec", data, enc, split, tmp_path / "redrec", resume=False)
    model_ = evaluate_model(trainer.module, trainer.builder, enc, split)
    pop = evaluate_popularity(enc, split)
    assert fit["history"][-1]["loss"] < fit["history"][0]["loss"]
    # measured 1.6x overall; a broken model (random or leaking-free noise) sits far below popularity
    assert model_.overall["ndcg@10"] > 1.3 * pop.overall["ndcg@10"], (model_.overall, pop.overall)
    for s in enc.scenarios:
        assert model_.per_scenario[s]["ndcg@10"] > pop.per_scenario[s]["ndcg@10"], s

    # the exported serving checkpoint ranks exactly like the trained model
    ckpt = export_checkpoint(trainer.module, tmp_path / "model", enc.item_ids, {"variant": "redrec"})
    served, info = load_for_serving(ckpt)
    again = evaluate_model(served, BatchBuilder(enc, cfg.model.user_tower.max_len, cfg.model.window), enc, split)
    assert again.overall == pytest.approx(model_.overall)
    assert info["item_ids"] == enc.item_ids
    emb = np.load(ckpt / "item_embeddings.npy")
    assert emb.shape == (enc.n_items, cfg.model.dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_same_seed_same_weights(tmp_path):
    data = load_dataset("synthetic", n_users=120, n_items=200, seed=3)
    enc = encode(data)
    split = chronological_split(enc)
    states = []
    for run in ("a", "b"):
        # validation every 2 steps: the kept best weights are a trained state, not the initial one
        cfg = ExperimentConfig.model_validate(tiny_config(tmp_path / run, max_steps=6, eval_every=2))
        trainer, fit = train_variant(cfg, "redrec", data, enc, split, tmp_path / run, resume=False)
        states.append({k: v.clone() for k, v in trainer.module.state_dict().items()})
        assert fit["steps"] == 6 and fit["best_step"] >= 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # the checkpoint records the kept weights' validation, scored once during training
    kept = training_record(trainer, fit, enc, split)["valid"]
    assert trainer.best_valid_result is not None
    assert kept == evaluate_model(trainer.module, trainer.builder, enc, split, on="valid").as_dict()
    assert kept["overall"]["ndcg@10"] == pytest.approx(fit["best_valid"])
    # and training did something: the weights moved away from the seed's initialisation
    torch.manual_seed(0)
    init = RecModel(trainer.mcfg, item_cache=trainer.module.item_table.weight.detach()[1:].numpy() * 0).state_dict()
    moved = [k for k in states[0] if k in init and "item_table" not in k and not torch.equal(states[0][k], init[k])]
    assert len(moved) >= 5, moved


@pytest.mark.parametrize("variant, querying, cuts", [("redrec", "readout", None), ("redrec", "scenario", 3), ("sasrec", "last", None)])
def test_readout_models_train_every_position_and_query_token_models_their_cuts(variant, querying, cuts):
    """A readout (cross-attention or last state) reads every prefix's user vector from one causal
    pass, so it trains on every position; query tokens cost K positions per cut, so they train
    ``cuts_per_sequence`` sampled prefixes."""
    data = load_dataset("synthetic", n_users=60, n_items=100, seed=3)
    enc = encode(data)
    split = chronological_split(enc)
    template = ModelConfig(cuts_per_sequence=3, user_tower={"querying": "scenario" if querying == "scenario" else "readout", "max_len": 20})
    mcfg = build_model_config(template, variant, data, enc.n_items)
    assert mcfg.user_tower.querying == querying
    builder = BatchBuilder(enc, 20, mcfg.window, mcfg.history_mode)
    batch = next(builder.train_batches(split.train_end, 8, mcfg.train_cuts, 0, 0))
    per_row = batch["cut_valid"].sum(1)
    if cuts is None:
        # every prefix with a next training event is a cut: lengths 1 .. n-1 of each window
        assert (batch["cut"][:, 0] == 1).all() and (per_row >= batch["length"] - 1).all(), (per_row, batch["length"])
    else:
        assert (batch["cut_valid"].shape[1] == cuts) and (per_row <= cuts).all()
        assert (batch["length"] > cuts + 1).any()  # longer sequences than cuts: the sampling was exercised


@pytest.mark.slow
def test_killed_run_resumes_without_losing_progress(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path / "killed", epochs=6, checkpoint_every=4)))
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump(tiny_config(tmp_path / "ref", epochs=6, checkpoint_every=4)))
    ref = run_cli(["redrec.cli", "train", "--config", str(ref_path)], tmp_path / "ref.log")

    proc = run_cli(["redrec.cli", "train", "--config", str(cfg_path)], tmp_path / "killed.log", start_new_session=True)
    latest = tmp_path / "killed" / "redrec" / "ds_checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed: " + (tmp_path / "killed.log").read_text()[-2000:]
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "redrec" / "model").exists()

    resumed = run_cli(["redrec.cli", "train", "--config", str(cfg_path)], tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert "resumed from" in log
    a = load_file(tmp_path / "killed" / "redrec" / "model" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "redrec" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resumed run diverged from the uninterrupted one"


@pytest.mark.slow
def test_two_process_deepspeed_run_on_cpu(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    raw = tiny_config(tmp_path / "dist", epochs=1, zero_stage=1)
    raw["model"]["full_softmax_max_items"] = 0  # the sampled path: negatives drawn per rank, then gathered
    cfg_path.write_text(yaml.safe_dump(raw))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "redrec.cli", "train", "--config", str(cfg_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "world size 2" in text and "128 per step" in text  # 64 negatives per rank, gathered
    assert (tmp_path / "dist" / "redrec" / "model" / "serving.safetensors").exists()


def test_two_ranks_gather_tensors_and_gradients_across_processes(tmp_path):
    """The trainer's cross-rank gather (negatives are shared across ranks with it), for real over 2
    torchrun processes (gloo): contents in rank order and gradients flowing back through it."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "gather_worker.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    coeff = np.arange(24, dtype=np.float32).reshape(8, 3)
    for r, res in enumerate(ranks):
        assert (res["rank"], res["world"], res["gather_is_none"]) == (r, 2, False)
        assert Path(res["redrec"]).resolve().is_relative_to(ROOT)  # this tree's trainer, not another install's
        # ids: int64 survives the gather, rank 0's then rank 1's
        assert res["ids_shape"] == [8] and res["ids_dtype"] == "torch.int64"
        assert res["ids"] == [0, 1, 2, 3, 10, 11, 12, 13]
        # floats: [8, 3], rank 0's rows (1.0) then rank 1's (2.0), still attached to the graph
        assert res["shape"] == [8, 3] and res["requires_grad"] is True
        assert np.array_equal(np.array(res["values"]), np.repeat([[1.0], [2.0]], 4, axis=0) * np.ones((8, 3)))
        # every rank summed all 8 rows: the local slice's gradient is the sum over both ranks' losses
        assert res["grad_sum"] is not None, "no gradient reached the local tensor through the gather"
        assert np.array_equal(np.array(res["grad_sum"]), np.full((4, 3), 2.0))
        # rank s weighted its loss by (s + 1): rank r's slice gets coeff[4r:4r+4] * (1 + 2)
        assert np.allclose(np.array(res["grad_weighted"]), coeff[4 * r : 4 * r + 4] * 3.0), (r, res["grad_weighted"])


def test_an_ablation_that_changes_nothing_is_redrec_itself():
    """The window ablations: whichever window the config trains on, the ablation naming that window
    is redrec itself (the bench skips it) and the other one is a real ablation."""
    from redrec.experiment import ABLATIONS, is_redrec_itself

    shipped = yaml.safe_load((ROOT / "configs" / "ml1m-cpu.yaml").read_text())["model"]
    w1, w5 = (ModelConfig.model_validate({**shipped, "window": w}) for w in (1, 5))
    assert is_redrec_itself(w1, "redrec-next-item") and not is_redrec_itself(w1, "redrec-next-window")
    assert is_redrec_itself(w5, "redrec-next-window") and not is_redrec_itself(w5, "redrec-next-item")
    assert [m for m in ABLATIONS if is_redrec_itself(w5, m)] == ["redrec-next-window"]
    assert not is_redrec_itself(w5, "redrec") and not is_redrec_itself(w5, "sasrec")
    # the model's own default is two queries per scenario: there redrec-k2 is redrec itself
    assert is_redrec_itself(ModelConfig(), "redrec-k2")
