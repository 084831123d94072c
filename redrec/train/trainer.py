"""DeepSpeed training: one entry point for a plain process, torchrun/deepspeed launchers and pods.

- Without a launcher (no WORLD_SIZE in the environment) it initialises a one-rank gloo group on a
  free local port, so a laptop needs nothing extra.
- The ZeRO stage, bf16 and gradient accumulation come from ``TrainConfig``; the optimizer is a
  torch one so DeepSpeed compiles no fused-Adam op on CPU. DeepSpeed's CPU comm op is JIT-built
  once into ``build/torch_extensions`` (TORCH_EXTENSIONS_DIR) and reused; the runtime image has it
  compiled into the deepspeed package instead (the Dockerfile's builder stage), and no compiler.
- Negatives are sampled per rank and all-gathered with gradients, so every rank sees all of them.
- Checkpoints: DeepSpeed's own (optimizer + client state, ``latest`` tag written last) every
  ``checkpoint_every`` steps for resume, and an exported serving checkpoint (safetensors + config
  + item embeddings) at the end. Batches are a pure function of (seed, epoch, rank), so a resumed
  run skips exactly the batches already done.
- Training batches come from the encoded log in memory, or (``train_source``) are streamed from each
  rank's shard of the training set (redrec.train.stream), so no rank holds every user.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from redrec.data.dataset import EncodedData
from redrec.data.split import Split
from redrec.model.recommender import ModelConfig, RecModel
from redrec.train.batches import BatchBuilder

if TYPE_CHECKING:
    from redrec.train.stream import ShardedTrainSource


class TrainConfig(BaseModel):
    max_steps: int = Field(20000, ge=1, description="step budget: optimizer steps at most (early stopping usually ends sooner)")
    epochs: int | None = Field(None, ge=1, description="optional cap on passes over the users")
    max_minutes: float | None = Field(None, gt=0, description="optional wall-clock cap (a demo run); breaks determinism")
    batch_size: int = Field(128, ge=1, description="sequences per micro-batch per rank")
    negatives: int = Field(512, ge=1, description="sampled negatives per rank, shared by the batch (sampled softmax only)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_frac: float = Field(0.01, ge=0, lt=1, description="linear warmup over this fraction of max_steps")
    warmup_steps: int | None = Field(None, ge=0, description="explicit warmup length; overrides warmup_frac")
    eval_every: int | None = Field(None, ge=1, description="validate every this many steps; None = once per epoch")
    # Patience in optimizer steps, not validations: an epoch is 47 steps on ML-1M and 16 on the
    # synthetic bench, so "5 validations" meant a different amount of training per dataset and
    # per eval_every, and starved the slow starters (an id table from random init plateaus early
    # and climbs again); min_steps keeps every model training at least that long.
    patience_steps: int = Field(500, ge=1, description="stop once this many steps passed since the best validation (and step >= min_steps)")
    min_steps: int = Field(0, ge=0, description="never stop early before this many optimizer steps")
    valid_metric: str = Field("ndcg@10", description="overall validation metric that early stopping maximises")
    valid_max_users: int | None = Field(20000, ge=1, description="validate on at most this many users (a fixed sample)")
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: bool = False
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(500, ge=1)
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_validation_patience(cls, raw):
        # an unknown key is otherwise dropped silently: an old config would lose its patience
        if isinstance(raw, dict) and "patience" in raw:
            raise ValueError("train.patience (validations) is gone: set patience_steps (optimizer steps since the best "
                             "validation) and min_steps instead, e.g. patience 5 at one validation per epoch = 5 epochs of steps")
        return raw

    def should_stop(self, step: int, best_step: int) -> bool:
        """The early-stopping rule, checked after each validation."""
        return step >= self.min_steps and step - best_step >= self.patience_steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_frac * self.max_steps))


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
                 item_cache: np.ndarray | None = None, item_tokens: dict | None = None, log: Callable[[str], None] = print,
                 train_source: ShardedTrainSource | None = None):
        """``train_source``: training batches streamed from each rank's shard of the training set
        (redrec.train.stream) instead of built from ``enc``; ``enc``/``split`` then only need to hold
        the validation users (redrec.pipeline.training_data.validation_users) and the catalogue."""
        self.mcfg, self.cfg, self.enc, self.split = model_cfg, train_cfg, enc, split
        self.source = train_source
        if train_source is not None and train_source.cat.item_ids != enc.item_ids:
            raise ValueError("train_source's catalogue differs from the validation data's items: build both from the same prepared data")
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
        warm = max(1, train_cfg.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=sched, config=ds_config(train_cfg, self.world)
        )
        self.dev = self.engine.device
        self.eligible = self.eligible.to(self.dev)
        self.gather = _gather_with_grad(self.world)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "micro_steps": 0,
                      "best": None, "best_step": 0, "bad_evals": 0, "stopped": None}  # bad_evals: informative only
        self.full_softmax = model_cfg.full_softmax
        # training frequency per item: the logQ correction of in-batch negatives (sampled softmax)
        if train_source is None:
            counts = np.bincount(np.concatenate([enc.item[enc.offsets[u]:split.train_end[u]] for u in range(enc.n_users)] or [np.zeros(0, np.int64)]),
                                 minlength=enc.n_items + 1).astype(np.float32)
        else:
            counts = self._shard_item_counts(train_source)
        self.item_prob = torch.from_numpy(counts / max(counts.sum(), 1.0)).to(self.dev)
        negs = "full softmax over the eligible catalogue" if self.full_softmax else (
            f"sampled softmax with logQ: {train_cfg.negatives} negatives per rank, {train_cfg.negatives * self.world} per step")
        self.log(f"deepspeed: world size {self.world} on {self.dev}, ZeRO stage {train_cfg.zero_stage}, bf16 {train_cfg.bf16}, {negs}")
        self.history: list[dict] = []
        # the full validation result of the kept weights (None after a resume or a sampled
        # validation): what the serving checkpoint records, without scoring the users again
        self.best_valid_result = self._last_valid = None

    def _shard_item_counts(self, source: ShardedTrainSource) -> np.ndarray:
        """Every rank counts its own shard; the sum over ranks is the whole training set's."""
        counts = torch.from_numpy(source.item_counts(self.rank, self.world)).to(self.dev)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        return counts.cpu().numpy().astype(np.float32)

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

    # ---- validation and early stopping ---------------------------------------------------------
    @property
    def best_path(self) -> Path:
        return self.out / "best_model.pt"

    def validate(self) -> dict | None:
        """Overall validation metrics, or None when the split holds no validation events. Every
        rank scores the same users with the same weights, so all ranks take the same decision."""
        from redrec.evaluate import evaluate_model

        if not (self.split.valid_end > self.split.train_end).any():
            return None
        res = evaluate_model(self.engine.module, self.builder, self.enc, self.split, on="valid", max_users=self.cfg.valid_max_users)
        self.engine.train()
        n_users = self.source.n_users if self.source is not None else self.enc.n_users  # a streamed run's enc is the sample
        sampled = self.cfg.valid_max_users is not None and n_users > self.cfg.valid_max_users
        self._last_valid = None if sampled else res
        return res.overall

    def _after_validation(self, metrics: dict, loss: float | None, t0: float) -> bool:
        """Records the curve point, keeps the best weights; True when patience has run out."""
        value = float(metrics.get(self.cfg.valid_metric, float("nan")))
        step = int(self.engine.global_steps)
        point = {"epoch": self.state["epoch"] + self.state["batch_in_epoch"] / max(self.n_batches, 1), "step": step,
                 "loss": loss, "valid": metrics, "seconds": time.time() - t0}
        self.history.append(point)
        best = self.state["best"]
        if best is None or value > best:
            self.state.update(best=value, best_step=step, bad_evals=0)
            self.best_valid_result = self._last_valid
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                tmp = self.best_path.with_suffix(".tmp")
                torch.save(self.engine.module.state_dict(), tmp)
                os.replace(tmp, self.best_path)
        else:
            self.state["bad_evals"] += 1
        self.log(f"step {step} (epoch {point['epoch']:.1f}): loss {loss if loss is None else round(loss, 4)} valid {self.cfg.valid_metric} "
                 f"{value:.4f} (best {self.state['best']:.4f} at step {self.state['best_step']}; {time.time() - t0:.0f}s)")
        return self.cfg.should_stop(step, self.state["best_step"])

    def _restore_best(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 wrote the file
        if self.best_path.exists():
            self.engine.module.load_state_dict(torch.load(self.best_path, map_location=self.dev, weights_only=True))

    # ---- loop ---------------------------------------------------------------------------------
    def _negatives(self, rng: np.random.Generator) -> torch.Tensor | None:
        if self.full_softmax:
            return None
        return torch.from_numpy(rng.integers(1, self.enc.n_items + 1, size=self.cfg.negatives)).to(self.dev)

    def fit(self, resume: bool = True) -> dict:
        """Train until ``patience_steps`` steps pass without a better validation (once past
        ``min_steps``), the step budget, the optional epoch or time cap; the best validated
        weights are restored."""
        from tqdm import tqdm

        cfg = self.cfg
        if resume:
            self.try_resume()
        elif self.rank == 0:
            if self.ds_dir.exists():
                shutil.rmtree(self.ds_dir)  # a fresh run must not mix with an older run's checkpoints
            self.best_path.unlink(missing_ok=True)
        ends = self.split.train_end
        if self.source is None:
            self.n_batches = n_batches = self.builder.n_train_batches(ends, cfg.batch_size, self.world)
        else:
            self.n_batches = n_batches = self.source.n_batches(cfg.batch_size, self.world)
        t0 = time.time()
        seqs = 0
        stop = self.state["stopped"]
        while stop is None:
            ep = self.state["epoch"]
            if cfg.epochs is not None and ep >= cfg.epochs:
                stop = "epochs"
                break
            self.engine.train()
            skip = self.state["batch_in_epoch"]
            bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {ep + 1}", disable=not (cfg.progress and self.rank == 0), leave=False)
            neg_rng = np.random.default_rng([cfg.seed, ep, self.rank, 7])
            losses = []
            for bi, batch in enumerate(self._train_batches(ends, ep)):
                neg = self._negatives(neg_rng)  # drawn even for skipped batches: same stream on resume
                if bi < skip:
                    continue
                batch = {k: v.to(self.dev) for k, v in batch.items()}
                loss, stats = self.engine.module.loss(batch, self.eligible, neg, gather=self.gather, item_prob=self.item_prob)
                self.engine.backward(loss)
                self.engine.step()
                self.state["micro_steps"] += 1
                self.state["batch_in_epoch"] = bi + 1
                self.state["global_step"] = self.engine.global_steps
                seqs += batch["items"].shape[0] * self.world
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", seq_s=f"{seqs / max(time.time() - t0, 1e-9):.0f}", T=f"{1 / stats['scale']:.3f}")
                bar.update(1)
                step = self.engine.global_steps
                at_boundary = self.state["micro_steps"] % cfg.grad_accum == 0
                if at_boundary and cfg.eval_every and step % cfg.eval_every == 0:
                    m = self.validate()
                    if m is not None and self._after_validation(m, float(np.mean(losses[-50:])), t0):
                        stop = "early stopping"
                if self.state["micro_steps"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop is None and step >= cfg.max_steps:
                    stop = "step budget"
                if stop is None and cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
                    stop = "time cap"
                if stop is not None:
                    break
            bar.close()
            if stop is None or bi + 1 >= n_batches:
                self.state["epoch"] = ep + 1
                self.state["batch_in_epoch"] = 0
                if not cfg.eval_every:
                    m = self.validate()
                    if m is None:
                        self.history.append({"epoch": ep + 1, "step": int(self.engine.global_steps),
                                             "loss": float(np.mean(losses)) if losses else None, "seconds": time.time() - t0})
                    elif self._after_validation(m, float(np.mean(losses)) if losses else None, t0) and stop is None:
                        stop = "early stopping"
                self.log(f"epoch {ep + 1} done ({time.time() - t0:.0f}s, {seqs / max(time.time() - t0, 1e-9):.0f} seq/s)")
        self.state["stopped"] = stop
        self.save_checkpoint()
        self._restore_best()
        self.log(f"stopped ({stop}) after {self.engine.global_steps} steps; best {cfg.valid_metric} "
                 f"{self.state['best'] if self.state['best'] is not None else float('nan'):.4f} at step {self.state['best_step']}")
        return {"seconds": time.time() - t0, "sequences": seqs, "steps": self.engine.global_steps, "history": self.history,
                "stopped": stop, "best_step": self.state["best_step"], "best_valid": self.state["best"]}

    def _train_batches(self, ends: np.ndarray, epoch: int):
        cfg = self.cfg
        if self.source is None:
            return self.builder.train_batches(ends, cfg.batch_size, self.mcfg.train_cuts, cfg.seed, epoch, self.rank, self.world)
        return self.source.train_batches(cfg.batch_size, self.mcfg.train_cuts, cfg.seed, epoch, self.rank, self.world,
                                         max_len=self.mcfg.user_tower.max_len, window=self.mcfg.window, history_mode=self.mcfg.history_mode)

    @property
    def module(self) -> RecModel:
        return self.engine.module
