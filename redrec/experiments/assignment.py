"""Deterministic arm assignment: a hash of (experiment, user_id) mapped onto the arms' shares.

The hash is SHA-256 (not Python's ``hash``, which is salted per process), so every replica and
every restart puts a user in the same arm. Renaming the experiment reshuffles users, which is
what a new experiment should do; changing one arm's share only moves users at the boundaries.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HOLDOUT = "holdout"
INTERLEAVED = "interleaved"  # the ``arm`` of a response merged from both arms' rankings
_SCALE = float(2**64)


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    model_version: str = Field(min_length=1, max_length=128)
    index_alias: str = Field("", max_length=200)  # empty: milvus.collection_alias
    share: float = Field(gt=0, le=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"arm name {v!r} must be letters, digits, '_', '.' or '-'")
        if v in (HOLDOUT, INTERLEAVED):
            raise ValueError(f"arm name {v!r} is reserved ({HOLDOUT!r}: the holdout group, {INTERLEAVED!r}: "
                             "responses of an interleaving experiment)")
        return v


class ExperimentSpec(BaseModel):
    """``experiment`` section of config.yaml: arms and the holdout (users outside every arm).

    ``type: ab`` splits users between the arms by their shares. ``type: interleaving`` shows every
    user (outside the holdout) one list merged by team draft from exactly two arms' rankings
    (``redrec.experiments.interleaving``); the shares still sum to 1 but split nothing."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=128)
    type: Literal["ab", "interleaving"] = "ab"
    holdout_share: float = Field(0.0, ge=0, le=0.5)
    arms: list[Arm] = Field(min_length=1)

    @model_validator(mode="after")
    def _shares(self) -> "ExperimentSpec":
        total = sum(a.share for a in self.arms)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"experiment.arms: shares sum to {total:.6g}, they must sum to 1 "
                             f"({', '.join(f'{a.name}={a.share}' for a in self.arms)})")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"experiment.arms: duplicate arm name(s) {dup}")
        if self.type == "interleaving" and len(self.arms) != 2:
            raise ValueError(f"experiment.arms: an interleaving experiment merges exactly two arms' rankings, "
                             f"{len(self.arms)} given ({names}); list two arms or use type: ab")
        return self

    def check_versions(self, known: set[str] | list[str], where: str = "the BentoML model store") -> None:
        """Every arm must serve a model version that exists in ``where``."""
        known = set(known)
        bad = [f"{a.name}: {a.model_version!r}" for a in self.arms if a.model_version not in known]
        if bad:
            raise ValueError(f"experiment.arms[].model_version: unknown version(s) {bad} in {where}; "
                             f"known: {sorted(known)} (the training pipeline's deploy step stores each release's model; "
                             "`redrec release list` shows them)")

    @property
    def interleaved(self) -> bool:
        return self.type == "interleaving"

    def expected_shares(self) -> dict[str, float]:
        """Share of all traffic per group, holdout included."""
        if self.interleaved:
            out = {INTERLEAVED: 1 - self.holdout_share}
            if self.holdout_share > 0:
                out[HOLDOUT] = self.holdout_share
            return out
        out = {a.name: (1 - self.holdout_share) * a.share for a in self.arms}
        if self.holdout_share > 0:
            out[HOLDOUT] = self.holdout_share
        return out


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from the parts, the same on every machine and Python version."""
    h = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / _SCALE


def assign(spec: ExperimentSpec, user_id: str) -> str:
    """The arm name (or ``"holdout"``) for a user. Holdout and arm split use independent hashes,
    so changing the holdout share does not reshuffle users between arms."""
    if spec.holdout_share > 0 and unit_hash(spec.name, "holdout", str(user_id)) < spec.holdout_share:
        return HOLDOUT
    if spec.interleaved:
        return INTERLEAVED
    u = unit_hash(spec.name, "arm", str(user_id))
    acc = 0.0
    for a in spec.arms:
        acc += a.share
        if u < acc:
            return a.name
    return spec.arms[-1].name  # float rounding at the top end
