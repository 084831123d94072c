"""User tower: a decoder LLM over the item representations of the user's behaviour.

Dense mixing: one time-ordered sequence of items from ALL scenarios; each position adds learned
scenario, action, hour-of-day and position-within-its-scenario embeddings.

Scenario-aware querying: K learned query tokens per scenario are appended. One sequence can carry
several "cuts" (training) or one cut per scenario (serving): query tokens of cut c attend only to
the first ``cut[c]`` items and to themselves, so a single forward yields user vectors for many
(history prefix, scenario) pairs without any leakage from later items. Each cut costs K extra
decoder positions, so training affords a few cuts per sequence.

``querying="readout"`` moves the queries out of the decoder: the items run through the fused
causal decoder alone, then the K queries of the cut's scenario (added to the state of the cut's
last item) read the visible prefix's states in one cross-attention block. A cut then costs a few
attention rows instead of K decoder positions, so every position of every sequence trains at
about SASRec's cost (bench/results/quality.json compares the two). ``querying="last"`` reads
the hidden state of the last visible item instead (SASRec / HLLM style), for the baselines.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn


class UserTowerConfig(BaseModel):
    hidden_size: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    max_len: int = Field(50, ge=2)
    queries_per_scenario: int = Field(2, ge=1, le=16)
    # readout: every position trains at about SASRec's cost; scenario (query tokens in the decoder)
    # is kept as an ablation, and "last" is the baselines' last-state readout
    querying: Literal["readout", "scenario", "last"] = "readout"
    side_info: bool = True
    dropout: float = Field(0.1, ge=0, lt=1)
    gradient_checkpointing: bool = False


class QueryReadout(nn.Module):
    """K learned queries per scenario, each added to the state of the cut's last item, attend to
    the states of the items the cut may see (pre-norm cross-attention + MLP, both residual)."""

    def __init__(self, hidden: int, heads: int, n_scenarios: int, k: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"user_tower.hidden_size {hidden} is not divisible by user_tower.heads {heads}")
        self.heads, self.k = heads, k
        # on the scale of the normalised states they are added to: at std 0.02 every scenario
        # starts reading the same vector, and a briefly trained model serves one list everywhere
        self.queries = nn.Parameter(torch.randn(n_scenarios, k, hidden))
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, cut: torch.Tensor, cut_scen: torch.Tensor, dropout: float) -> torch.Tensor:
        """h [B, L, H] item states -> [B, C, K, H]; cut c sees items [0, cut[c])."""
        B, L, H = h.shape
        C, K, nh = cut.shape[1], self.k, self.heads
        last = torch.gather(h, 1, (cut - 1).clamp_min(0)[..., None].expand(B, C, H))  # [B, C, H]
        x = (last[:, :, None] + self.queries[cut_scen]).reshape(B, C * K, H)
        q = self.q(self.norm_q(x)).view(B, C * K, nh, H // nh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(h)).view(B, L, 2, nh, H // nh).permute(2, 0, 3, 1, 4)
        sees = torch.arange(L, device=h.device)[None, None, :] < cut.repeat_interleave(K, dim=1)[:, :, None]  # [B, CK, L]
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None])
        x = x + nn.functional.dropout(self.o(a.transpose(1, 2).reshape(B, C * K, H)), dropout, self.training)
        x = x + nn.functional.dropout(self.mlp(self.norm_mlp(x)), dropout, self.training)
        return x.view(B, C, K, H)


class UserTower(nn.Module):
    def __init__(self, cfg: UserTowerConfig, n_scenarios: int, n_actions: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.cfg = cfg
        H = cfg.hidden_size
        conf = LlamaConfig(
            vocab_size=1,  # inputs are embeddings; the token table is unused
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_len + 2,
            # dropout on the attention probabilities forces SDPA's unfused path (3x slower on CPU):
            # regularise the residual branches instead, as SASRec/GPT-2 do
            attention_dropout=0.0,
        )
        conf._attn_implementation = "sdpa"
        self.decoder = LlamaModel(conf)
        for layer in self.decoder.layers:
            layer.self_attn.register_forward_hook(self._residual_dropout)
            layer.mlp.register_forward_hook(self._residual_dropout)
        if cfg.gradient_checkpointing:
            self.decoder.gradient_checkpointing_enable()
        self.n_scenarios = n_scenarios
        if cfg.side_info:
            self.scenario_emb = nn.Embedding(n_scenarios, H)
            self.action_emb = nn.Embedding(n_actions, H)
            self.hour_emb = nn.Embedding(24, H)
            self.spos_emb = nn.Embedding(cfg.max_len, H)
            # small, as SASRec/GPT-2 initialise position tables: at nn.Embedding's std 1 the four
            # tables' sum (std 2) drowns the item representations it is added to (an id table at
            # std 0.02, the text adapter's ~0.6), and an id-item model never learns past popularity
            for table in (self.scenario_emb, self.action_emb, self.hour_emb, self.spos_emb):
                nn.init.normal_(table.weight, std=0.02)
        if cfg.querying == "scenario":
            self.queries = nn.Parameter(torch.randn(n_scenarios, cfg.queries_per_scenario, H) * 0.02)
        elif cfg.querying == "readout":
            self.readout = QueryReadout(H, cfg.heads, n_scenarios, cfg.queries_per_scenario)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual_dropout(self, module, args, output):
        if not (self.training and self.cfg.dropout > 0):
            return output
        if isinstance(output, tuple):
            return (nn.functional.dropout(output[0], self.cfg.dropout, True), *output[1:])
        return nn.functional.dropout(output, self.cfg.dropout, True)

    @property
    def k(self) -> int:
        return 1 if self.cfg.querying == "last" else self.cfg.queries_per_scenario

    def forward(self, item_reps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """item_reps [B, L, H] (rows past ``length`` are ignored) -> user states [B, C, K, H]."""
        B, L, H = item_reps.shape
        length, cut, cut_scen = batch["length"], batch["cut"], batch["cut_scen"]
        C = cut.shape[1]
        x = item_reps
        if self.cfg.side_info:
            x = x + self.scenario_emb(batch["scen"]) + self.action_emb(batch["act"]) + self.hour_emb(batch["hour"])
            x = x + self.spos_emb(batch["spos"].clamp_max(self.cfg.max_len - 1))
        x = self.drop(x)
        ar = torch.arange(L, device=x.device)
        if self.cfg.querying != "scenario":
            # right padding: under a plain causal mask no real position sees a padded one, so the
            # decoder's fused causal path gives exactly the masked result
            pos = ar.expand(B, L)
            h = self.decoder(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
            if self.cfg.querying == "readout":
                return self.readout(h, cut, cut_scen, self.cfg.dropout)
            idx = (cut - 1).clamp_min(0)  # [B, C]
            out = torch.gather(h, 1, idx[..., None].expand(B, C, H))
            return out[:, :, None, :]
        # query tokens need an explicit mask (the [B, L, L] one is built only on this path)
        valid = ar[None, :] < length[:, None]  # [B, L]
        item_mask = (ar[None, :, None] >= ar[None, None, :]) & valid[:, None, :]  # causal over real items
        item_mask = item_mask | torch.eye(L, dtype=torch.bool, device=x.device)[None]  # padding sees itself
        K = self.cfg.queries_per_scenario
        Q = C * K
        q = self.queries[cut_scen]  # [B, C, K, H]
        q = q.reshape(B, Q, H)
        seq = torch.cat([x, q], 1)
        q_cut = cut.repeat_interleave(K, dim=1)  # [B, Q]
        q_sees_items = ar[None, None, :] < q_cut[:, :, None]  # [B, Q, L]
        top = torch.cat([item_mask, torch.zeros(B, L, Q, dtype=torch.bool, device=x.device)], 2)
        bottom = torch.cat([q_sees_items, torch.eye(Q, dtype=torch.bool, device=x.device).expand(B, Q, Q)], 2)
        mask = torch.cat([top, bottom], 1)[:, None]  # [B, 1, L+Q, L+Q]
        pos = torch.cat([ar.expand(B, L), q_cut], 1)
        h = self.decoder(inputs_embeds=seq, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return h[:, L:].reshape(B, C, K, H)
