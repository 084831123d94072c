"""``redrec index publish|rollback|status``: the item index from the command line.

Where the index lives comes, in this order, from the flags, the ``milvus`` section of the chart's
config.yaml (``--config``, default ``$REDREC_CONFIG``: ``uri``, ``collection_alias``), then the
environment (``MILVUS_URI``, ``MILVUS_TOKEN``), then ``<data>/milvus.db``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def _milvus_section(path: str | None) -> dict:
    path = path or os.environ.get("REDREC_CONFIG")
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--config: {path} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    sec = raw.get("milvus") or {}
    if not isinstance(sec, dict):
        raise ValueError(f"{path}: field 'milvus' must be a mapping with uri and collection_alias")
    return sec


def _index_config(args, **extra):
    from redrec.index.config import IndexConfig

    sec = _milvus_section(args.config)
    fields = {}
    uri = args.uri or sec.get("uri")
    if uri:
        fields["uri"] = str(uri)
    alias = args.alias or sec.get("collection_alias")
    if alias:
        fields["name"] = str(alias)
    if getattr(args, "keep_versions", None):
        fields["keep_versions"] = args.keep_versions
    if getattr(args, "min_recall", None):
        fields["min_recall"] = args.min_recall
    return IndexConfig(**fields, **extra)


def _catalogue(args):
    import pandas as pd

    if args.dataset:
        from redrec.data import load_dataset, parse_dataset_args

        return load_dataset(args.dataset, **parse_dataset_args(args.dataset_arg)).items
    path = Path(args.items or Path(os.environ.get("REDREC_DATA", "data")) / "feast_sources" / "items.parquet")
    if not path.exists():
        raise ValueError(f"--items: catalogue {path} does not exist; pass --items <parquet with item_id, scenarios> "
                         "or --dataset NAME (or build the feature repo's sources first: `redrec features build`)")
    return pd.read_parquet(path, columns=["item_id", "scenarios"])


def cmd_publish(args) -> int:
    from redrec.index.checkpoint import publish_checkpoint

    res = publish_checkpoint(_index_config(args), args.checkpoint, args.version, _catalogue(args))
    print(json.dumps({"version": res.version, "collection": res.collection, "alias": res.alias,
                      "previous": res.previous_collection, "items": res.n_items, "recall": round(res.recall, 4),
                      "index": res.index_params, "search_params": res.search_params, "dropped": res.dropped,
                      "seconds": {k: round(v, 3) for k, v in res.seconds.items()}}, indent=2))
    return 0


def cmd_rollback(args) -> int:
    from redrec.index.milvus import rollback

    frm, to = rollback(_index_config(args))
    print(json.dumps({"from": frm, "to": to}))
    return 0


def cmd_status(args) -> int:
    from redrec.index.milvus import current_collection, list_versions

    cfg = _index_config(args)
    served = current_collection(cfg)
    print(json.dumps({
        "uri": cfg.uri, "alias": cfg.name, "serves": served,
        "versions": [{"collection": v.name, "version": v.version, "status": v.status, "dim": v.dim, "metric": v.metric,
                      "recall": v.recall, "index": v.index_type, "search_params": v.search_params,
                      "published_at": v.published_at, "served": v.name == served} for v in list_versions(cfg)],
    }, indent=2))
    return 0


def _guard(fn):
    """Refusals and bad flags end with their message and exit code 2, not a traceback."""

    def run(args) -> int:
        from pydantic import ValidationError

        from redrec.index.milvus import IndexError_

        try:
            return fn(args)
        except (IndexError_, ValidationError, ValueError) as e:
            print(f"redrec index {args.index_command}: {e}", file=sys.stderr)
            return 2
        finally:
            from redrec.index.milvus import close_clients

            close_clients()

    return run


def register(sub) -> None:
    p = sub.add_parser("index", help="publish item embeddings to Milvus, roll back, show versions")
    isub = p.add_subparsers(dest="index_command", required=True)

    def common(q):
        q.add_argument("--config", help="chart config.yaml (milvus.uri, milvus.collection_alias); default $REDREC_CONFIG")
        q.add_argument("--uri", help="Milvus URI: a Milvus Lite file (*.db), http://127.0.0.1:<port> or a Milvus server")
        q.add_argument("--alias", help="serving alias (versions are collections <alias>_v<version>)")

    q = isub.add_parser("publish", help="publish a checkpoint's item embeddings, verify recall, swap the alias")
    common(q)
    q.add_argument("--checkpoint", required=True, help="exported serving checkpoint (…/<variant>/model)")
    q.add_argument("--version", required=True, help="model version: letters, digits, underscores")
    q.add_argument("--items", help="catalogue parquet (item_id, scenarios); default <data>/feast_sources/items.parquet")
    q.add_argument("--dataset", help="take the catalogue from this dataset instead (movielens-1m, synthetic, parquet)")
    q.add_argument("--dataset-arg", action="append", help="key=value passed to the dataset loader (repeatable)")
    q.add_argument("--keep-versions", dest="keep_versions", type=int)
    q.add_argument("--min-recall", dest="min_recall", type=float)
    q.set_defaults(func=_guard(cmd_publish))

    q = isub.add_parser("rollback", help="serve the version published before the served one")
    common(q)
    q.set_defaults(func=_guard(cmd_rollback))

    q = isub.add_parser("status", help="the alias, the collection it serves and the kept versions")
    common(q)
    q.set_defaults(func=_guard(cmd_status))
