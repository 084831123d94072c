"""Serving picks up items onboarded after its models were loaded (``redrec.items``), no restart.

Each poll lists every served model version's batches in the model store (``redrec.items.added``)
and appends the new ones to the arms of that version: the model's representation table (a history
holding the item reads it), the arm's vocabulary, item ids and embeddings (``/similar_items``).
Arms of one version share one model object, which is extended once. The in-process exact copy of
the arm's collection was read before the upsert: it is dropped, and until it is read again the
searches go to Milvus, which already holds the items (they were upserted before the batch was
written).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from redrec.index import exact
from redrec.index.search import forget_collection
from redrec.items import added

log = logging.getLogger(__name__)


def pick_up(store, arms: dict) -> int:
    """Apply every batch the arms have not seen yet; returns how many items were added."""
    if store is None:
        return 0
    by_version: dict[str, list] = {}
    for rt in arms.values():
        by_version.setdefault(rt.version, []).append(rt)
    n_added = 0
    for version, rts in by_version.items():
        for name in added.list_batches(store, version):
            if all(name in rt.added for rt in rts):
                continue
            batch = added.read_batch(store, version, name)
            indices: dict[int, range] = {}  # one append per distinct model object
            for rt in rts:
                if name in rt.added:
                    continue
                new = [j for j, i in enumerate(batch.item_ids) if i not in rt.vocab.item_index]
                if new:
                    key = id(rt.model)
                    if key not in indices:
                        indices[key] = rt.model.append_items(torch.from_numpy(batch.reps[new]))
                    idx = indices[key]
                    # the model's table first: a request that sees the new vocabulary entry must
                    # find its row; each list is replaced whole, never resized under a reader
                    rt.item_emb = np.concatenate([rt.item_emb, batch.embeddings[new]])
                    rt.item_ids = rt.item_ids + [batch.item_ids[j] for j in new]
                    rt.vocab.item_index.update({batch.item_ids[j]: k for j, k in zip(new, idx)})
                    forget_collection(rt.index, rt.index.collection(version))
                    exact.forget_collection(rt.index.uri, rt.index.collection(version))
                rt.added.add(name)
                n_added += len(new)
            log.info("model %s: %d item(s) of batch %s added", version, len(batch), name)
    return n_added
