"""Item index publication and search on Milvus (Milvus Lite embedded, Milvus on Kubernetes).

``publish`` writes a versioned collection ``<name>_v<version>``, verifies recall against exact
search and then moves the serving alias ``<name>`` to it in one step; ``rollback`` moves it back;
``search`` is the serving-side retrieval (max over a user's K query vectors, scenario filter,
exclusions); ``publish_checkpoint`` publishes an exported checkpoint against the catalogue.
``LiteServer`` shares a Milvus Lite file between processes on 127.0.0.1.
"""

from redrec.index.checkpoint import publish_checkpoint, read_checkpoint_items
from redrec.index.config import IndexConfig, default_token, default_uri
from redrec.index.lite import LiteServer, free_port
from redrec.index.milvus import (
    CollectionInfo,
    PublishError,
    PublishRefused,
    PublishResult,
    RollbackError,
    client,
    close_clients,
    current_collection,
    current_version,
    describe,
    exact_topk,
    list_versions,
    publish,
    rollback,
)
from redrec.index.search import NotPublished, search

__all__ = [
    "IndexConfig", "default_token", "default_uri", "LiteServer", "free_port", "CollectionInfo", "PublishError",
    "PublishRefused", "PublishResult", "RollbackError", "client", "close_clients", "current_collection",
    "current_version", "describe", "exact_topk", "list_versions", "publish", "rollback", "NotPublished", "search",
    "publish_checkpoint", "read_checkpoint_items",
]
