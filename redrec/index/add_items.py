"""Adding items to a published collection: the one write a ready collection takes after publication.

Publication (``redrec.index.milvus.publish``) writes a collection whole from one model version.
Items onboarded later (``redrec.items``) are embedded by that same model and upserted into that
same collection, so the pairing rule still holds: every vector in a collection comes from the model
version it records. A collection of another model, or one not ready, is refused; so is an item
eligible in a scenario the collection has no field for.
"""

from __future__ import annotations

import numpy as np

from redrec.index.config import IndexConfig
from redrec.index.milvus import PK, VEC, PublishRefused, _normalise, client, describe


def check_target(cfg: IndexConfig, model_version: str, scenarios: list[list[str]]) -> str:
    """The model's own collection, checked ready, from ``model_version``, knowing every scenario."""
    name = cfg.collection(model_version)
    if not client(cfg).has_collection(name):
        raise PublishRefused(f"no collection {name} at {cfg.uri}: model {model_version}'s index is not published "
                             "(publish it before adding items)")
    info = describe(cfg, name)
    if info.status != "ready" or info.version != str(model_version):
        raise PublishRefused(f"collection {name} is {info.status!r} from model {info.version}; items are added only to a "
                             f"ready collection of model {model_version}")
    if info.dim != cfg.dim:
        raise PublishRefused(f"collection {name} has dim {info.dim}; the vectors have dim {cfg.dim}")
    missing = sorted({s for lst in scenarios for s in lst} - set(info.scenarios))
    if missing:
        raise PublishRefused(f"collection {name} has no eligibility field for scenario(s) {missing}; it knows "
                             f"{sorted(info.scenarios)} (a new scenario needs a new publication)")
    return name


def upsert_items(cfg: IndexConfig, model_version: str, item_ids: list[str], vectors: np.ndarray,
                 scenarios: list[list[str]]) -> str:
    """Upsert the items into model ``model_version``'s collection; returns its name. Idempotent:
    an onboarding retried after a failure writes the same rows again."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(item_ids), cfg.dim) or not np.isfinite(vectors).all():
        raise PublishRefused(f"vectors must be finite, shape ({len(item_ids)}, {cfg.dim}); got {vectors.shape}")
    name = check_target(cfg, model_version, scenarios)
    info = describe(cfg, name)
    if cfg.metric == "COSINE":
        vectors = _normalise(vectors).astype(np.float32)
    rows = [{PK: i, VEC: v.tolist(), **{f: s in scen for s, f in info.scenarios.items()}}
            for i, v, scen in zip(item_ids, vectors, scenarios)]
    c = client(cfg)
    for s in range(0, len(rows), cfg.insert_batch):
        c.upsert(name, rows[s : s + cfg.insert_batch], timeout=cfg.timeout_s)
    c.flush(name)
    got = c.get(name, ids=list(item_ids), output_fields=[PK], timeout=cfg.timeout_s)
    if len(got) != len(item_ids):
        raise PublishRefused(f"collection {name} holds {len(got)} of the {len(item_ids)} items just upserted")
    return name
