"""Where serving loads its models from: the model store (``redrec.release.model_store``, a
directory or object-store URI every pod reads; the default wherever ``model_store.uri`` is set), or
the BentoML model store (``redrec:<version>``), which stays as a local cache and for bentos that
bundle their model.

A stored model is an exported checkpoint (``redrec.model.checkpoint.export_checkpoint`` output)
copied verbatim, so ``load_for_serving`` reads it unchanged. ``bentoml build`` packs the models a
bento lists into the bento's own store; inside the container ``bundled`` (the chart's default
``model_version``) names the newest model there.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import bentoml

from redrec.model.checkpoint import ServingModel, load_for_serving, read_config

MODEL_NAME = "redrec"
BUNDLED = "bundled"
_VERSION_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def _tag(version: str) -> str:
    return f"{MODEL_NAME}:latest" if version == BUNDLED else f"{MODEL_NAME}:{version}"


def save_model(ckpt_dir: str | Path, version: str, labels: dict[str, str] | None = None) -> bentoml.Tag:
    """Store the checkpoint under ``redrec:<version>`` (versions are immutable: an existing one is
    refused, publish a new version instead)."""
    ckpt_dir = Path(ckpt_dir)
    if not _VERSION_RE.fullmatch(version) or version in (BUNDLED, "latest"):
        raise ValueError(f"version {version!r}: use lowercase letters, digits, '_', '.', '-' (max 63), not "
                         f"'{BUNDLED}'/'latest'")
    info = read_config(ckpt_dir)  # refuses anything that is not a serving checkpoint
    for f in ("serving.safetensors", "item_ids.json", "item_embeddings.npy"):
        if not (ckpt_dir / f).is_file():
            raise ValueError(f"{ckpt_dir}: missing {f}; export the checkpoint with export_checkpoint")
    try:
        bentoml.models.get(_tag(version))
        raise ValueError(f"model {_tag(version)} already exists in the BentoML model store; versions are immutable")
    except bentoml.exceptions.NotFound:
        pass
    meta = {"format": info["format"], "variant": info.get("variant"), "dataset": info.get("dataset"),
            "scenarios": info["model"].get("scenarios"), "n_items": info["model"].get("n_items")}
    with bentoml.models.create(_tag(version), labels={"project": "redrec", **(labels or {})},
                               metadata={k: v for k, v in meta.items() if v is not None}) as m:
        for f in ckpt_dir.iterdir():
            if f.is_file() and f.name != "model.safetensors":  # training weights are not served
                shutil.copy2(f, Path(m.path) / f.name)
    return m.tag


def list_versions() -> list[str]:
    try:
        return sorted(str(m.tag.version) for m in bentoml.models.list(MODEL_NAME))
    except bentoml.exceptions.NotFound:  # no redrec model stored yet
        return []


def model_path(version: str) -> Path:
    try:
        return Path(bentoml.models.get(_tag(version)).path)
    except bentoml.exceptions.NotFound:
        raise LookupError(f"model_version {version!r}: no model {_tag(version)} in the BentoML model store "
                          f"(known: {list_versions()}); store one with `redrec serving save-model`") from None


def resolve(version: str) -> str:
    """The concrete version a name stands for (``bundled`` -> the newest stored model)."""
    return str(bentoml.models.get(_tag(version)).tag.version) if version == BUNDLED else version


def load_model(version: str, device: str = "cpu") -> tuple[ServingModel, dict]:
    d = model_path(version)
    model, info = load_for_serving(d, device=device)
    info["model_version"], info["model_dir"] = resolve(version), str(d)
    return model, info


class ModelSource:
    """The model store when ``store_uri`` is set, else the BentoML model store."""

    def __init__(self, store_uri: str = "", cache_dir: str = ""):
        from redrec.release.model_store import ModelStore

        self.store = ModelStore(store_uri, cache_dir) if store_uri else None

    @property
    def name(self) -> str:
        return f"model store {self.store.uri}" if self.store else "BentoML model store"

    def versions(self) -> list[str]:
        return self.store.versions() if self.store else [*list_versions(), BUNDLED]

    def path(self, version: str) -> Path:
        return self.store.path(version) if self.store else model_path(version)

    def load(self, version: str, device: str = "cpu") -> tuple[ServingModel, dict]:
        """The model and its info; ``info["model_dir"]`` is where its files were read, checked
        against the store's manifest (read the other files from there: no second check)."""
        if self.store is None:
            return load_model(version, device)
        d = self.store.path(version)  # raises CorruptModelError before anything is loaded
        model, info = load_for_serving(d, device=device)
        info["model_version"], info["model_dir"] = version, str(d)
        return model, info
