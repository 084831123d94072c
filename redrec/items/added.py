"""Items added to a served model after training, kept beside the model in the model store.

A model version's files are immutable (its manifest pins them). Items onboarded later are batches
under ``<store>/models/<version>/items-added/``, one ``.npz`` per ``redrec items add`` call, each
written whole (a temporary name, then a rename where the store has renames; an object store's put
is atomic per object). A batch is the commit point of an onboarding: it is written after the
item's Feast features and Milvus rows, so a server that sees it can serve the item. Serving pods
poll the folder and append new batches to their in-process copy of the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np

from redrec.release.model_store import CorruptModelError, ModelStore

FOLDER = "items-added"


@dataclass
class AddedBatch:
    name: str
    item_ids: list[str]
    scenarios: list[list[str]]
    text_vectors: np.ndarray  # [n, D] the encoder's output (kept for a later retrain or re-projection)
    reps: np.ndarray  # [n, H] in the user tower's space: what a history holding the item reads
    embeddings: np.ndarray  # [n, dim] unit vectors: what the index holds

    def __len__(self) -> int:
        return len(self.item_ids)


def _folder(store: ModelStore, version: str) -> str:
    return f"{store._dir(version)}/{FOLDER}"


def list_batches(store: ModelStore, version: str) -> list[str]:
    """Batch names of ``version``, oldest first (names start with their creation time)."""
    d = _folder(store, version)
    if not store.fs.exists(d):
        return []
    names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(d, detail=False)]
    return sorted(n[: -len(".npz")] for n in names if n.endswith(".npz") and not n.startswith("."))


def read_batch(store: ModelStore, version: str, name: str) -> AddedBatch:
    """The batch, its bytes checked against the SHA-256 prefix its name carries (batches are not
    in the version's manifest, which is written once)."""
    path = f"{_folder(store, version)}/{name}.npz"
    with store.fs.open(path, "rb") as f:
        data = f.read()
    want, got = name.rsplit("-", 1)[-1], hashlib.sha256(data).hexdigest()
    if not got.startswith(want):
        raise CorruptModelError(
            f"model store {store.uri}: {version}/{FOLDER}/{name}.npz does not match the digest in its name: SHA-256 "
            f"{got}, the name records {want}...; the batch is damaged and its items are not served: delete the file and "
            f"onboard the same items again (`redrec items add`; every write is an upsert)")
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return AddedBatch(name, [str(i) for i in z["item_ids"]], json.loads(str(z["scenarios"])), z["text_vectors"],
                      z["reps"], z["embeddings"])


def write_batch(store: ModelStore, version: str, item_ids: list[str], scenarios: list[list[str]], text_vectors: np.ndarray,
                reps: np.ndarray, embeddings: np.ndarray) -> str:
    if not store.has(version):
        raise ValueError(f"model store {store.uri}: no complete model version {version!r}")
    buf = io.BytesIO()
    np.savez(buf, item_ids=np.array(item_ids, dtype=str), scenarios=np.array(json.dumps(scenarios)),
             text_vectors=text_vectors.astype(np.float32), reps=reps.astype(np.float32),
             embeddings=embeddings.astype(np.float32))
    data = buf.getvalue()
    name = f"{time.time_ns():020d}-{hashlib.sha256(data).hexdigest()[:12]}"
    d = _folder(store, version)
    store.fs.makedirs(d, exist_ok=True)
    tmp = f"{d}/.{name}.npz.tmp"
    with store.fs.open(tmp, "wb") as f:
        f.write(data)
    store.fs.mv(tmp, f"{d}/{name}.npz")
    return name


def added_ids(store: ModelStore, version: str) -> set[str]:
    return {i for n in list_batches(store, version) for i in read_batch(store, version, n).item_ids}
