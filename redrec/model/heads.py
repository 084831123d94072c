"""The projection head shared by the user queries and the items (H -> d, GELU, residual, LayerNorm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    def __init__(self, hidden: int, dim: int = 64):
        super().__init__()
        self.inp = nn.Linear(hidden, dim)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return F.normalize(self.norm(h + self.mlp(h)), dim=-1)
