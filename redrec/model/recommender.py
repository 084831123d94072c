"""The two-tower model: item side (cached text reps: frozen, fine-tuned, or text plus a learned id
residual; item ids; or the item LLM end to end) and the user tower, joined by the shared projection
head. One class, three variants:

- ``redrec``: dense mixing of all scenarios + scenario-aware queries (the method);
- ``single-scenario``: one scenario's history only, last-state readout (HLLM-style baseline);
- ``sasrec``: item-id embeddings, mixed history without side information, last-state readout.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from redrec.model.heads import ProjectionHead
from redrec.model.item_tower import ItemTower, ItemTowerConfig
from redrec.model.loss import LogitScale, full_softmax_infonce, near_duplicate_table, next_window_infonce
from redrec.model.user_tower import UserTower, UserTowerConfig

Variant = Literal["redrec", "single-scenario", "sasrec"]
# cache-residual: the cached text vector plus a learned per-item residual (zero for an item the model
# never trained on), so an item onboarded after training is represented by its text alone
ItemSource = Literal["cache-residual", "cache-frozen", "cache-finetune", "id", "end-to-end"]
# item sources whose representation is a function of the text vector (``RecModel.text_reps``): a
# new item's vector can be computed from its text without a retrain
TEXT_SOURCES = ("cache-residual", "cache-finetune", "cache-frozen")


class ModelConfig(BaseModel):
    variant: Variant = "redrec"
    item_source: ItemSource = "cache-residual"
    item_tower: ItemTowerConfig = Field(default_factory=ItemTowerConfig)
    # cache-residual only: the share of item occurrences (history, targets, the softmax
    # denominator) whose residual is dropped in a training step, so the text path alone learns to
    # place an item where its interactions would
    residual_dropout: float = Field(0.2, ge=0, le=1)
    user_tower: UserTowerConfig = Field(default_factory=UserTowerConfig)
    dim: int = Field(64, ge=8)
    window: int = Field(5, ge=1, description="next-window size W: positives per sample")
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=1)
    false_negative_cos: float = Field(0.98, gt=0, le=1)
    in_batch_negatives: int = Field(512, ge=0, description="distinct in-batch positives used as extra negatives (sampled softmax only, logQ-corrected)")
    full_softmax_max_items: int = Field(20000, ge=0, description="full softmax over the eligible catalogue up to this many items; sampled softmax with logQ above")
    # for query tokens in the decoder (querying "scenario"), where each cut costs K positions: 16
    # cuts beat every position per CPU-minute on the synthetic bench (NDCG@10 0.136 in 566 s vs
    # 0.133 in 939 s, both early-stopped). Readout and last-state models train every position.
    cuts_per_sequence: int = Field(16, ge=0, description="prefixes trained per sequence with querying 'scenario'; 0 = every position")
    mixing: bool = Field(True, description="dense mixing of every scenario's history; False reads only the target scenario's (ablation)")
    # filled from the data at build time
    scenarios: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    n_items: int = 0
    item_rep_dim: int = 0

    @property
    def history_mode(self) -> str:
        return "per-scenario" if self.variant == "single-scenario" or not self.mixing else "mixed"

    @property
    def train_cuts(self) -> int:
        """A last-state or cross-attention readout computes every position's state anyway: train on
        all of them. Query tokens cost a forward position each, so they train ``cuts_per_sequence``."""
        return self.cuts_per_sequence if self.user_tower.querying == "scenario" else 0

    @property
    def full_softmax(self) -> bool:
        return self.n_items <= self.full_softmax_max_items

    def for_variant(self) -> "ModelConfig":
        """Apply what a variant implies, so a baseline differs from RED-Rec only where it must."""
        c = self.model_copy(deep=True)
        if c.variant == "sasrec":
            c.item_source = "id"
            c.user_tower.querying = "last"
            c.user_tower.side_info = False
            c.window = 1  # textbook SASRec: the next item only
            c.mixing = True
        elif c.variant == "single-scenario":
            c.user_tower.querying = "last"
            c.mixing = False
        return c


class RecModel(nn.Module):
    def __init__(self, cfg: ModelConfig, item_cache: np.ndarray | None = None, item_tokens: dict | None = None):
        super().__init__()
        self.cfg = cfg
        H = cfg.user_tower.hidden_size
        n = cfg.n_items + 1  # row 0 is padding
        if cfg.item_source in TEXT_SOURCES:
            if item_cache is None or item_cache.shape[0] != cfg.n_items:
                raise ValueError("item_source 'cache-*' needs item_cache with one row per catalogue item")
            table = torch.zeros(n, item_cache.shape[1])
            table[1:] = torch.as_tensor(item_cache, dtype=torch.float32)
            if cfg.item_source == "cache-frozen":
                self.register_buffer("item_cache", table)
            elif cfg.item_source == "cache-residual":
                self.register_buffer("item_cache", table)
                # in the user tower's space, after the adapter: the text path's input never changes
                # with the residual, so a new item's adapter(text) is what training fed it
                self.item_residual = nn.Embedding(n, H, padding_idx=0)
                nn.init.zeros_(self.item_residual.weight)  # training starts from the text path alone
            else:
                self.item_table = nn.Embedding.from_pretrained(table, freeze=False, padding_idx=0)
            self.item_adapter = nn.Sequential(nn.LayerNorm(table.shape[1]), nn.Linear(table.shape[1], H))
            # the near-duplicate test of the loss needs fixed vectors; not part of the checkpoint
            self.register_buffer("dup_ref", nn.functional.normalize(table, dim=-1), persistent=False)
        elif cfg.item_source == "id":
            self.item_table = nn.Embedding(n, H, padding_idx=0)
            nn.init.normal_(self.item_table.weight, std=0.02)
            self.item_adapter = nn.Identity()
        else:
            self.item_tower = ItemTower(cfg.item_tower)
            if item_tokens is None:
                raise ValueError("item_source 'end-to-end' needs the tokenised catalogue (item_tokens)")
            self.register_buffer("tok_ids", item_tokens["input_ids"], persistent=False)
            self.register_buffer("tok_mask", item_tokens["attention_mask"], persistent=False)
            self.item_adapter = nn.Linear(self.item_tower.hidden_size, H)
        self.user_tower = UserTower(cfg.user_tower, len(cfg.scenarios), len(cfg.actions))
        self.head = ProjectionHead(H, cfg.dim)
        self.logit_scale = LogitScale(cfg.init_temperature, cfg.max_logit_scale)

    # ---- item side -------------------------------------------------------------------------
    def item_reps(self, idx: torch.Tensor) -> torch.Tensor:
        """Item representations in the user tower's space, for item indices of any shape."""
        src = self.cfg.item_source
        if src == "cache-frozen":
            return self.item_adapter(self.item_cache[idx])
        if src == "cache-residual":
            res = self.item_residual(idx)
            p = self.cfg.residual_dropout
            if self.training and p > 0:
                res = res * (torch.rand(idx.shape, device=res.device) >= p).unsqueeze(-1).to(res.dtype)
            return self.item_adapter(self.item_cache[idx]) + res
        if src in ("cache-finetune", "id"):
            return self.item_adapter(self.item_table(idx))
        flat = idx.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        reps = self.item_tower(self.tok_ids[uniq], self.tok_mask[uniq])  # the LLM runs once per unique item
        return self.item_adapter(reps)[inv].reshape(*idx.shape, -1)

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.item_reps(idx))

    def text_reps(self, text_vecs: torch.Tensor) -> torch.Tensor:
        """The representation of items known only by their text vectors: what ``item_reps`` gives an
        item whose residual is zero (cache-residual), or whose table row is still its text vector."""
        if self.cfg.item_source not in TEXT_SOURCES:
            raise ValueError(f"item_source {self.cfg.item_source!r} has no text path: an item the model never "
                             f"trained on cannot be represented (use one of {list(TEXT_SOURCES)})")
        return self.item_adapter(text_vecs)

    def text_vectors(self) -> torch.Tensor:
        """[n_items + 1, D] the text encoder's vectors the item side was built from (row 0 padding)."""
        src = self.cfg.item_source
        if src in ("cache-frozen", "cache-residual"):
            return self.item_cache
        if src == "cache-finetune":
            return self.dup_ref  # the table's starting point, unit length (the adapter's LayerNorm ignores scale)
        raise ValueError(f"item_source {src!r} has no text vectors")

    @torch.no_grad()
    def all_item_embeddings(self, chunk: int = 4096) -> torch.Tensor:
        """[n_items + 1, dim] unit vectors (row 0 is padding) for full ranking and the index."""
        dev = next(self.parameters()).device
        rows = [self.item_embeddings(torch.arange(i, min(i + chunk, self.cfg.n_items + 1), device=dev)) for i in range(0, self.cfg.n_items + 1, chunk)]
        return torch.cat(rows).float()

    # ---- user side -------------------------------------------------------------------------
    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, C, K, dim] unit vectors: K per (history prefix, scenario) cut."""
        return self.head(self.user_tower(self.item_reps(batch["items"]), batch))

    def item_embeddings_all(self) -> torch.Tensor:
        """[n_items + 1, dim] with gradients: the full-softmax denominator."""
        dev = next(self.parameters()).device
        return self.item_embeddings(torch.arange(self.cfg.n_items + 1, device=dev))

    def loss(self, batch: dict[str, torch.Tensor], eligible: torch.Tensor, negative_ids: torch.Tensor | None = None,
             gather=None, item_prob: torch.Tensor | None = None):
        """Full softmax over the sample's eligible catalogue when ``negative_ids`` is None, else
        sampled softmax with logQ correction (``item_prob``: training frequency per item)."""
        user = self.user_vectors(batch)  # [B, C, K, d]
        B, C, K, d = user.shape
        valid = batch["cut_valid"].reshape(-1)
        user = user.reshape(B * C, K, d)[valid]
        target_ids = batch["targets"].reshape(B * C, -1)[valid]
        scen = batch["cut_scen"].reshape(-1)[valid]
        if negative_ids is None:
            if not hasattr(self, "_pools"):
                # one scenario (or a catalogue eligible everywhere): one pool, nothing to restrict
                self._pools = None if bool(eligible[:, 1:].all()) else [torch.nonzero(e).flatten() for e in eligible]
                ref = getattr(self, "dup_ref", None)
                self._dups = None if ref is None else near_duplicate_table(ref, self.cfg.false_negative_cos)
            return full_softmax_infonce(user, target_ids, self.item_embeddings_all(), self.logit_scale(), sample_scen=scen,
                                        pools=self._pools, eligible=None if self._pools is None else eligible, duplicates=self._dups)
        targets = self.item_embeddings(target_ids)
        negatives = self.item_embeddings(negative_ids)
        n_cat = self.cfg.n_items
        if gather is not None:  # negatives from every rank, with gradients
            negatives, negative_ids = gather(negatives), gather(negative_ids)
        return next_window_infonce(
            user, targets, target_ids, negatives, negative_ids, self.logit_scale(),
            eligible=eligible, sample_scen=scen,
            false_negative_cos=self.cfg.false_negative_cos, in_batch=self.cfg.in_batch_negatives,
            dup_ref=getattr(self, "dup_ref", None), item_prob=item_prob, n_catalogue=n_cat,
        )
