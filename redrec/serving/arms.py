"""The arms a serving worker holds and how they change: each arm's model, vocabulary and index
loaded and checked together, installed as one generation (a request reads config, arms and
catalogue of the same one), swapped whole when the config or the release overlay changes (or
refused whole), and grown in place by onboarded items. ``Engine`` mixes this in; it owns the
state (``self.models``, ``self.reload``, ``self.board``, ...)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from redrec.index.config import IndexConfig
from redrec.serving import added_items
from redrec.serving.batching import MicroBatcher
from redrec.serving.config import ConfigError, ServingConfig, read_config_source
from redrec.serving.history import Vocab

log = logging.getLogger("redrec.serving.engine")


@dataclass
class ArmRuntime:
    name: str
    version: str
    alias: str
    model: torch.nn.Module
    vocab: Vocab
    item_ids: list[str]
    item_emb: np.ndarray  # [n_items, dim], row i-1 = item index i
    index: IndexConfig
    batcher: MicroBatcher | None = None
    added: set[str] = field(default_factory=set)  # batches of onboarded items applied (redrec.items.added)



@dataclass(frozen=True)
class _Generation:
    cfg: ServingConfig
    arms: dict[str, ArmRuntime]
    control: str
    catalogue: list[str]
    known_items: set[str]
    actions: list[str]


class ArmsMixin:
    # ---- models: load, install, reload -----------------------------------------------------------
    def _load_arms(self, cfg: ServingConfig) -> dict[str, ArmRuntime]:
        """Every arm's model loaded and checked; raises (naming the arm and the fix) on any problem."""
        cfg.experiment.check_versions(self.models.versions(), where=self.models.name)
        models: dict[str, tuple] = {}
        arms: dict[str, ArmRuntime] = {}
        for arm in cfg.experiment.arms:
            rt = self._arm_of(cfg, arm.name, arm.model_version, cfg.alias_for(arm.name), models,
                              f"experiment.arms[{arm.name}].model_version")
            rt.batcher = MicroBatcher(lambda asks, rt=rt: self._serve_batch(rt, asks), cfg.serving.batch_max_size,
                                      cfg.serving.batch_max_wait_ms, name=f"arm-{arm.name}",
                                      max_concurrent=cfg.serving.batch_max_concurrent)
            arms[arm.name] = rt
        added_items.pick_up(self.models.store, arms)
        return arms

    def _arm_of(self, cfg: ServingConfig, name: str, version: str, alias: str, models: dict, field: str,
                timeout_s: float | None = None) -> ArmRuntime:
        """One model with its vocabulary, item embeddings and index settings (no batcher);
        ``models`` caches loads by version across the arms of one config."""
        if version not in models:
            models[version] = self.models.load(version)
        model, info = models[version]
        missing = [s for s in self.scenarios if s not in info["model"]["scenarios"]]
        if missing:
            raise ValueError(f"{field} {version}: the model has no "
                             f"queries for scenario(s) {missing} (it knows {info['model']['scenarios']})")
        emb = np.load(Path(info["model_dir"]) / "item_embeddings.npy")  # checked with the model
        idx = IndexConfig(uri=cfg.milvus.uri, token=cfg.milvus.token, name=alias, dim=int(emb.shape[1]),
                          timeout_s=timeout_s or cfg.milvus.timeout_s, alias_ttl_s=cfg.milvus.alias_ttl_s,
                          exact_max_items=cfg.milvus.exact_search_max_items)
        return ArmRuntime(name, info["model_version"], alias, model, Vocab.from_info(info), list(info["item_ids"]), emb, idx)

    def _install(self, cfg: ServingConfig, arms: dict[str, ArmRuntime]) -> None:
        catalogue = sorted({i for a in arms.values() for i in a.item_ids})
        actions = sorted({a for rt in arms.values() for a in rt.vocab.action_index})
        # one assignment: a request reads config, arms and catalogue of the same generation
        self._gen = _Generation(cfg, arms, cfg.experiment.arms[0].name, catalogue, set(catalogue), actions)

    cfg = property(lambda self: self._gen.cfg)
    arms = property(lambda self: self._gen.arms)
    control = property(lambda self: self._gen.control)
    catalogue = property(lambda self: self._gen.catalogue)
    known_items = property(lambda self: self._gen.known_items)
    actions = property(lambda self: self._gen.actions)

    def _watch_config(self) -> None:
        while True:
            time.sleep(self.cfg.model_store.config_poll_s)
            try:
                if self._config_path:
                    self.reload_config()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad config
                log.exception("config reload failed")
            try:
                self.pick_up_items()
            except Exception:  # noqa: BLE001 - a store hiccup: the next poll retries
                log.exception("reading onboarded items failed")

    def pick_up_items(self) -> int:
        """Items onboarded since the arms were loaded (``redrec.serving.added_items``); the
        catalogue, the known items and the popularity fallback grow with them."""
        g = self._gen
        n = added_items.pick_up(self.models.store, g.arms)
        if n:
            self._install(g.cfg, g.arms)
            self._popular_at = 0.0  # the next fallback read refreshes the table with the new items
        return n

    def reload_config(self) -> bool:
        """Load the config file again if it changed; True when new arms were swapped in. A config
        that does not load (unknown version, a model missing from the store, bad YAML) is refused
        whole: the running arms keep serving and ``release_status`` says why."""
        try:
            src = read_config_source(self._config_path)
        except OSError as e:
            self.reload["error"] = f"cannot read {self._config_path}: {e}"
            return False
        if src == self._config_src:
            return False
        try:
            new = ServingConfig.from_source(src)
            fixed = ("scenarios", "serving", "milvus", "feast", "model_store")
            changed = [k for k in fixed if getattr(new, k) != getattr(self.cfg, k)]
            if changed:
                raise ConfigError(f"sections {changed} changed: they take effect on a restart (only 'experiment' "
                                  "is reloaded in place)")
            arms = self._load_arms(new)
            shadow = self.shadow.load(new)
        except Exception as e:  # noqa: BLE001
            self.reload.update(error=f"{type(e).__name__}: {e}", error_sha256=src.sha256)
            self._config_src = src  # report once, retry on the next change
            self._publish_status()
            log.error("config %s not loaded, still serving %s: %s", self._config_path,
                      {a: rt.version for a, rt in self.arms.items()}, self.reload["error"])
            return False
        old = self.arms
        for rt in self._retired:  # idle since the reload before this one
            rt.batcher.close()
        self._retired = list(old.values())
        self._install(new, arms)
        self.shadow.install(new, shadow)
        self._config_src = src
        self.reload.update(loaded=time.time(), loaded_sha256=src.sha256, error=None, error_sha256=None,
                           reloads=self.reload["reloads"] + 1)
        self._ready_cache = (0.0, False, "reloaded")
        self._publish_status()
        log.info("config reloaded: arms %s", {a: rt.version for a, rt in arms.items()})
        return True

    def _publish_status(self) -> None:
        try:
            self.board.publish(self.reload, {a: rt.version for a, rt in self.arms.items()})
        except OSError as e:  # a full /tmp: the pod's status goes stale, the requests are unaffected
            log.warning("worker status not written to %s: %s", self.board.dir, e)
