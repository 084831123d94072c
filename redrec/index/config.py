"""Typed configuration of the item index (Milvus / Milvus Lite)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _data_dir() -> Path:
    return Path(os.environ.get("REDREC_DATA", "data"))


def default_uri() -> str:
    """``$MILVUS_URI``, else a Milvus Lite file under the project's data dir."""
    return os.environ.get("MILVUS_URI") or str(_data_dir() / "milvus.db")


def default_token() -> str:
    return os.environ.get("MILVUS_TOKEN", "")


class IndexConfig(BaseModel):
    """Where and how item embeddings are published and searched.

    ``uri``: a Milvus Lite file (``*.db``: the process opens it through pymilvus), a Milvus Lite
    server shared by several processes (``http://127.0.0.1:<port>``, see ``LiteServer``) or a Milvus
    server on Kubernetes; the code path is the same for all three.

    Index: ``IVF_FLAT`` by default. It builds in seconds per 100k vectors on a CPU (HNSW takes
    minutes for 1M on 2 cores), and publication checks recall, raising ``nprobe`` up to
    ``max_nprobe`` until ``min_recall`` is met; the chosen ``nprobe`` is stored on the collection
    and used by every search. Collections smaller than ``flat_below`` items get an exact ``FLAT``
    index. ``nlist`` is per segment (Milvus builds one index per segment; Milvus Lite seals a
    segment every 100k rows), ``None`` = about sqrt(rows per segment).
    """

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(default_factory=default_uri)
    token: str = Field(default_factory=default_token, repr=False)
    name: str = "redrec_items"  # alias served; versions are collections <name>_v<version>
    dim: int = Field(64, ge=2, le=32768)
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"  # vectors are L2-normalised for COSINE
    keep_versions: int = Field(3, ge=2)  # current + at least one to roll back to
    verify_sample: int = Field(200, ge=10)
    verify_k: int = Field(10, ge=1)
    min_recall: float = Field(0.95, gt=0, le=1)
    index_type: Literal["IVF_FLAT", "HNSW", "FLAT", "AUTOINDEX"] = "IVF_FLAT"
    nlist: int | None = Field(None, ge=1)
    nprobe: int = Field(16, ge=1)
    max_nprobe: int = Field(256, ge=1)
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(64, ge=8)
    hnsw_ef: int = Field(64, ge=1)
    flat_below: int = Field(20_000, ge=0)
    segment_rows: int = Field(100_000, ge=1)  # rows per sealed segment, for the nlist default
    insert_batch: int = Field(50_000, ge=1)
    max_topk: int = Field(16_384, ge=1)  # Milvus' limit on limit; more exclusions go into the filter
    # searches excluding at most this many ids over-fetch k + len(exclude) hits per query vector;
    # more exclusions go into the filter (``item_id not in [...]``) and only k hits are fetched:
    # hits are what a search pays for (Milvus Lite materialises every hit's row), and a user's
    # seen items (up to seq_len per scenario) would otherwise multiply them by ~15
    overfetch_max_exclusions: int = Field(16, ge=0)
    # searches may reuse the collection this process last resolved the alias to for this long
    # (0: resolve it on every search, two round trips each; serving sets milvus.alias_ttl_s); a
    # swap made elsewhere is seen within this time, one made by this process at once; a search
    # always uses one version whole
    alias_ttl_s: float = Field(0.0, ge=0)
    # ready collections of at most this many items are copied into this process once and searched
    # there exactly (redrec.index.exact); 0: every search goes to Milvus. Serving sets it
    # (milvus.exact_search_max_items)
    exact_max_items: int = Field(0, ge=0)
    timeout_s: float = Field(600.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", v):
            raise ValueError(f"index name {v!r} must be letters, digits and underscores, not starting with a digit")
        return v

    def collection(self, version: str) -> str:
        return f"{self.name}_v{version}"
