"""DeepSpeed training: one entry point for a plain process, torchrun/deepspeed launchers and pods.

- Without a launcher (no WORLD_SIZE in the environment) it initialises a one-rank gloo group on a
  free local port, so a laptop needs nothing extra.
- The ZeRO stage, bf16 and gradient accumulation come from ``TrainConfig``; the optimizer is a
  torch one so DeepSpeed compiles no fused-Adam op on CPU. DeepSpeed's CPU comm op is JIT-built
  once into ``build/torch_extensions`` (TORCH_EXTENSIONS_DIR) and reused.
- Negatives are sampled per rank and all-gathered with gradients, so every rank sees all of them.
- Checkpoints: DeepSpeed's own (optimizer + client state, ``latest`` tag written last) every
  ``checkpoint_every`` steps for resume, and an exported serving checkpoint (safetensors + config
  + item embeddings) at the end. Batches are a pure function of (seed, epoch, rank), so a resumed
  run skips exactly the batches already done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from redrec.data.dataset import EncodedData
from redrec.data.split import Split
from redrec.model.recommender import ModelConfig, RecModel
from redrec.train.batches import BatchBuilder


class TrainConfig(BaseModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="sequences per micro-batch per rank")
    cuts_per_sequence: int = Field(8, ge=1)
    negatives: int = Field(512, ge=1, description="sampled negatives per rank, shared by the batch")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: bool = False
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(500, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (tests, smoke runs)")
    progress: bool = True


def init_distributed(device: str) -> tuple[int, int]:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("build/torch_extensions").resolve()))
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    # under mpirun (the Kubeflow deepspeed-distributed runtime) ranks come from the OMPI_* variables
    if "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ and not dist.is_initialized():
        # one plain process: an in-memory store, so concurrent runs never race for a TCP port; nothing
        # goes into os.environ, where child processes would mistake it for a launcher's rendezvous
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # the DeepSpeed engine insists on it; launchers ignore it
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return name


def ds_config(cfg: TrainConfig, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _gather_with_grad(world: int) -> Callable | None:
    if world == 1:
        return None
    import torch.distributed.nn.functional as dnn

    def gather(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.int64, torch.int32):
            import torch.distributed as dist

            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)
        return torch.cat(dnn.all_gather(x.contiguous()))

    return gather


class Trainer:
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, enc: EncodedData, split: Split, out_dir: str | Path,
                 item_cache: np.ndarray | None = None, item_tokens: dict | None = None, log: Callable[[str], None] = print):
        self.mcfg, self.cfg, self.enc, self.split = model_cfg, train_cfg, enc, split
        self.out = Path(out_dir)
        self.device = resolve_device(train_cfg.device)
        self.rank, self.world = init_distributed(self.device)
        self.log = log if self.rank == 0 else (lambda *_: None)
        torch.manual_seed(train_cfg.seed)  # identical init on every rank
        self.model = RecModel(model_cfg, item_cache=item_cache, item_tokens=item_tokens)
        self.builder = BatchBuilder(enc, model_cfg.user_tower.max_len, model_cfg.window, model_cfg.history_mode)
        self.eligible = torch.from_numpy(enc.eligible)
        import deepspeed

        opt = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        warm = max(1, train_cfg.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=sched, config=ds_config(train_cfg, self.world)
        )
        self.dev = self.engine.device
        self.eligible = self.eligible.to(self.dev)
        self.gather = _gather_with_grad(self.world)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "micro_steps": 0}
        self.log(f"deepspeed: world size {self.world} on {self.dev}, ZeRO stage {train_cfg.zero_stage}, bf16 {train_cfg.bf16}, "
                 f"{train_cfg.negatives} negatives per rank, {train_cfg.negatives * self.world} per step")
        self.history: list[dict] = []

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ds_dir(self) -> Path:
        return self.out / "ds_checkpoints"

    def save_checkpoint(self) -> None:
        tag = f"step{self.state['global_step']}-m{self.state['micro_steps']}"
        client = dict(self.state, torch_rng=torch.get_rng_state().tolist(), history=self.history)
        self.engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client)

    def try_resume(self) -> bool:
        if not (self.ds_dir / "latest").exists():
            return False
        _, client = self.engine.load_checkpoint(str(self.ds_dir))
        if client is None:
            return False
        for k in self.state:
            self.state[k] = client[k]
        self.history = client.get("history", [])
        torch.set_rng_state(torch.tensor(client["torch_rng"], dtype=torch.uint8))
        self.log(f"resumed from {self.ds_dir} at epoch {self.state['epoch']} batch {self.state['batch_in_epoch']} (step {self.state['global_step']})")
        return True

    # ---- loop ---------------------------------------------------------------------------------
    def _negatives(self, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(rng.integers(1, self.enc.n_items + 1, size=self.cfg.negatives)).to(self.dev)

    def fit(self, resume: bool = True) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if resume:
            self.try_resume()
        elif self.rank == 0 and self.ds_dir.exists():
            shutil.rmtree(self.ds_dir)  # a fresh run must not mix with an older run's checkpoints
        ends = self.split.train_end
        n_batches = self.builder.n_train_batches(ends, cfg.batch_size, self.world)
        t0 = time.time()
        seqs = 0
        done = False
        while self.state["epoch"] < cfg.epochs and not done:
            ep = self.state["epoch"]
            self.engine.train()
            skip = self.state["batch_in_epoch"]
            bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {ep + 1}/{cfg.epochs}", disable=not (cfg.progress and self.rank == 0), leave=False)
            neg_rng = np.random.default_rng([cfg.seed, ep, self.rank, 7])
            losses = []
            for bi, batch in enumerate(self.builder.train_batches(ends, cfg.batch_size, cfg.cuts_per_sequence, cfg.seed, ep, self.rank, self.world)):
                neg = self._negatives(neg_rng)  # drawn even for skipped batches: same stream on resume
                if bi < skip:
                    continue
                batch = {k: v.to(self.dev) for k, v in batch.items()}
                loss, stats = self.engine.module.loss(batch, neg, self.eligible, gather=self.gather)
                self.engine.backward(loss)
                self.engine.step()
                self.state["micro_steps"] += 1
                self.state["batch_in_epoch"] = bi + 1
                if self.engine.is_gradient_accumulation_boundary() or self.state["micro_steps"] % cfg.grad_accum == 0:
                    self.state["global_step"] = self.engine.global_steps
                seqs += batch["items"].shape[0] * self.world
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", seq_s=f"{seqs / max(time.time() - t0, 1e-9):.0f}", T=f"{1 / stats['scale']:.3f}")
                bar.update(1)
                if self.state["micro_steps"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.max_steps and self.engine.global_steps >= cfg.max_steps:
                    done = True
                    break
            bar.close()
            if not done:
                self.history.append({"epoch": ep + 1, "loss": float(np.mean(losses)) if losses else None, "seconds": time.time() - t0})
                self.log(f"epoch {ep + 1}/{cfg.epochs} loss {self.history[-1]['loss']:.4f} ({time.time() - t0:.0f}s, {seqs / max(time.time() - t0, 1e-9):.0f} seq/s)")
                self.state["epoch"] = ep + 1
                self.state["batch_in_epoch"] = 0
        self.save_checkpoint()
        return {"seconds": time.time() - t0, "sequences": seqs, "steps": self.engine.global_steps, "history": self.history}

    @property
    def module(self) -> RecModel:
        return self.engine.module
