"""How serving reaches Feast: always through ``FeatureRepo``.

With ``serving.feature_server_url`` set (Kubernetes, and the tests), the repo gets a generated
``feature_store.yaml`` whose online store is Feast's ``remote`` store: every online read and every
push goes over HTTP to ``feast serve``; the registry (feature definitions only) is read from
``feast.registry``. Without it, the embedded repo at ``feast.repo_path`` (SQLite) is opened
directly. The calling code is the same in both cases.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import yaml

from redrec.features.definitions import ITEM_POP_VIEW, ITEM_TEXT_VIEW
from redrec.features.store import FeatureRepo
from redrec.serving.config import ConfigError, ServingConfig


def remote_store_yaml(cfg: ServingConfig) -> dict:
    if not cfg.feast.registry and not cfg.feast.repo_path:
        raise ConfigError("feast.registry is empty: with serving.feature_server_url set, name the Feast registry "
                          "(the chart's file registry) or feast.repo_path (its feast_registry.db)")
    registry = cfg.feast.registry or str((Path(cfg.feast.repo_path) / "feast_registry.db").resolve())
    reg = {"registry_type": cfg.feast.registry_type, "path": registry, "cache_ttl_seconds": 60}
    if cfg.feast.registry_type == "sql":
        missing = sorted(set(re.findall(r"\$\{(\w+)\}", registry)) - set(os.environ))
        if missing:
            raise ConfigError(f"feast.registry names ${{{missing[0]}}}, which is not set in the environment "
                              "(the chart sets FEAST_REGISTRY_PASSWORD from feast.registry.sql.passwordSecret)")
        # expanded here, so the YAML written below quotes whatever the password holds
        reg["path"] = re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], registry)
        reg["sqlalchemy_config_kwargs"] = {"pool_pre_ping": True}
    return {
        "project": cfg.feast.project,
        "provider": "local",
        "registry": reg,
        "online_store": {"type": "remote", "path": cfg.serving.feature_server_url, "connection_retries": 1},
        "entity_key_serialization_version": 3,
    }


def open_repo(cfg: ServingConfig) -> FeatureRepo:
    if not cfg.serving.feature_server_url:
        if not cfg.feast.repo_path:
            raise ConfigError("feast.repo_path is empty: name the embedded Feast repo, or set "
                              "serving.feature_server_url to read through a feature server")
        repo = FeatureRepo(cfg.feast.repo_path, scenarios=cfg.scenarios)
    else:
        # remote: nothing local but the generated yaml, in a temporary directory (a read-only root works)
        d = Path(tempfile.mkdtemp(prefix="redrec-feast-"))
        fs_yaml = d / "feature_store.yaml"
        fs_yaml.write_text(yaml.safe_dump(remote_store_yaml(cfg), sort_keys=False))
        repo = FeatureRepo(cfg.feast.repo_path or d, fs_yaml=fs_yaml, scenarios=cfg.scenarios)
    # the server's workers (serving.workers) push through one lock per store: two workers updating
    # one user's window at once would otherwise lose one update (Feast has no compare-and-set)
    store = cfg.serving.feature_server_url or str(Path(cfg.feast.repo_path).resolve())
    repo.push_lock_path = Path(tempfile.gettempdir()) / f"redrec-push-{hashlib.sha256(store.encode()).hexdigest()[:16]}.lock"
    return repo


def item_catalogue(repo: FeatureRepo, item_ids: list[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Per item: the scenarios it may be shown in, and its popularity (both from the online store)."""
    res = repo.online_columns([f"{ITEM_TEXT_VIEW}:scenarios", f"{ITEM_POP_VIEW}:popularity"], "item_id",
                              [str(i) for i in item_ids])
    scen = {str(i): list(s or []) for i, s in zip(item_ids, res[f"{ITEM_TEXT_VIEW}__scenarios"])}
    pop = {str(i): int(p or 0) for i, p in zip(item_ids, res[f"{ITEM_POP_VIEW}__popularity"])}
    return scen, pop
