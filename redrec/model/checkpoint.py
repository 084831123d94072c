"""Serving checkpoints: safetensors weights + config + cached item representations/embeddings.

The request path never runs the item encoder: the checkpoint carries each item's representation
in the user tower's space (``item_reps``) and its projected, normalised embedding
(``item_embeddings``, what goes into the Milvus index). A model whose items are built from text
vectors also carries the adapter from the text encoder's space (``item_adapter.*``) and a probe of
the text vectors it trained on (``item_text_probe``, for the items ``config.json`` names), so an
item onboarded later is embedded by the same encoder and checked to be in the same space
(``redrec.items``). A checkpoint is written to a temporary directory and renamed, so a reader
never sees a half-written one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from redrec.model.heads import ProjectionHead
from redrec.model.recommender import TEXT_SOURCES, ModelConfig, RecModel
from redrec.model.user_tower import UserTower

FORMAT = "redrec-checkpoint/1"
PROBE_ITEMS = 8  # text vectors kept to check that an onboarding encoder reproduces the model's


@torch.no_grad()
def export_checkpoint(model: RecModel, out_dir: str | Path, item_ids: list[str], meta: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = model.eval()
    dev = next(model.parameters()).device
    n = model.cfg.n_items + 1
    reps = torch.cat([model.item_reps(torch.arange(i, min(i + 4096, n), device=dev)) for i in range(0, n, 4096)]).float().cpu()
    emb = model.all_item_embeddings().cpu()
    serving = {f"user_tower.{k}": v.float().contiguous().cpu() for k, v in model.user_tower.state_dict().items()}
    serving.update({f"head.{k}": v.float().contiguous().cpu() for k, v in model.head.state_dict().items()})
    serving["item_reps"] = reps.contiguous()
    text_meta = {}
    if model.cfg.item_source in TEXT_SOURCES:
        serving.update({f"item_adapter.{k}": v.float().contiguous().cpu() for k, v in model.item_adapter.state_dict().items()})
        m = min(PROBE_ITEMS, len(item_ids))
        serving["item_text_probe"] = torch.nn.functional.normalize(model.text_vectors()[1 : m + 1].float(), dim=-1).cpu().contiguous()
        text_meta = {"item_text": {"probe_items": list(item_ids[:m]), "encoder_seed": 0}}
    save_file(serving, tmp / "serving.safetensors")
    save_file({k: v.float().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    np.save(tmp / "item_embeddings.npy", emb[1:].numpy().astype(np.float32))
    (tmp / "item_ids.json").write_text(json.dumps(item_ids))
    info = {"format": FORMAT, "created": time.time(), "model": json.loads(model.cfg.model_dump_json()), **text_meta, **(meta or {})}
    (tmp / "config.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


class ServingModel(nn.Module):
    """User tower + head over cached item representations: what the serving path and CPU evaluation run."""

    def __init__(self, cfg: ModelConfig, item_reps: torch.Tensor, unknown: torch.Tensor | None = None,
                 text_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg.user_tower, len(cfg.scenarios), len(cfg.actions))
        self.head = ProjectionHead(cfg.user_tower.hidden_size, cfg.dim)
        self.register_buffer("item_reps_table", item_reps)
        # the text path (``text_dim``: the text encoder's width), where the checkpoint carries it
        self.item_adapter = (nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cfg.user_tower.hidden_size))
                             if text_dim else None)
        # items the model never saw (``for_catalogue``): a zero embedding, every score 0
        self.unknown = unknown
        self.text_probe: np.ndarray | None = None

    def item_reps(self, idx: torch.Tensor) -> torch.Tensor:
        return self.item_reps_table[idx]

    @torch.no_grad()
    def text_reps(self, text_vecs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Representations of items known only by their text vectors (an item onboarded after
        training: its residual is zero, so this is exactly what training gave such an item)."""
        if self.item_adapter is None:
            raise ValueError(f"this model (item_source {self.cfg.item_source!r}) carries no text path: an item it never "
                             f"trained on cannot be embedded; train with item_source 'cache-residual'")
        return self.item_adapter(torch.as_tensor(np.asarray(text_vecs), dtype=torch.float32))

    @torch.no_grad()
    def append_items(self, reps: torch.Tensor) -> range:
        """Give items added after training the next indices; returns them. The table is replaced,
        not resized in place, so a forward already running keeps the table it started with."""
        start = self.item_reps_table.shape[0]
        self.item_reps_table = torch.cat([self.item_reps_table, reps.to(self.item_reps_table)])
        if self.unknown is not None:
            self.unknown = torch.cat([self.unknown, torch.zeros(len(reps), dtype=torch.bool)])
        return range(start, start + len(reps))

    @torch.no_grad()
    def all_item_embeddings(self) -> torch.Tensor:
        emb = self.head(self.item_reps_table)
        if self.unknown is not None:
            emb = emb.masked_fill(self.unknown[:, None], 0.0)
        return emb

    def for_catalogue(self, own_ids: list[str], item_ids: list[str]) -> "ServingModel":
        """This model over another catalogue (``item_ids``, index i+1 = item_ids[i]): items it
        knows keep their representations, the others are zero (in a history) and score 0 (as a
        candidate), so it can be re-scored on a newer split whose catalogue grew."""
        pos = {i: n for n, i in enumerate(own_ids, start=1)}
        idx = torch.tensor([0] + [pos.get(i, 0) for i in item_ids])
        unknown = idx == 0
        unknown[0] = False  # padding stays padding
        reps = self.item_reps_table[idx].clone()
        reps[unknown] = 0.0
        m = ServingModel(self.cfg.model_copy(update={"n_items": len(item_ids)}), reps, unknown)
        m.user_tower, m.head = self.user_tower, self.head
        return m.eval()

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.user_tower(self.item_reps(batch["items"]), batch))


def read_config(ckpt_dir: str | Path) -> dict:
    info = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir}/config.json: field 'format' is {info.get('format')!r}, expected {FORMAT!r}")
    return info


def load_for_serving(ckpt_dir: str | Path, device: str = "cpu") -> tuple[ServingModel, dict]:
    ckpt_dir = Path(ckpt_dir)
    info = read_config(ckpt_dir)
    cfg = ModelConfig.model_validate(info["model"])
    tensors = load_file(ckpt_dir / "serving.safetensors", device=device)
    probe = tensors.pop("item_text_probe", None)
    adapter_w = tensors.get("item_adapter.1.weight")
    model = ServingModel(cfg, tensors.pop("item_reps"), text_dim=None if adapter_w is None else int(adapter_w.shape[1]))
    model.load_state_dict(tensors, strict=False)
    missing = [k for k in model.state_dict() if k not in tensors and k != "item_reps_table"]
    if missing:
        raise ValueError(f"{ckpt_dir}/serving.safetensors lacks {missing[:5]}: the checkpoint is incomplete; re-export it")
    info["item_ids"] = json.loads((ckpt_dir / "item_ids.json").read_text())
    # unit text vectors of info["item_text"]["probe_items"], as the model trained on them
    model.text_probe = None if probe is None else probe.float().cpu().numpy()
    return model.to(device).eval(), info
