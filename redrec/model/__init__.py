"""Towers, head, loss and the two-tower model."""

from redrec.model.recommender import ModelConfig, RecModel

__all__ = ["ModelConfig", "RecModel"]
