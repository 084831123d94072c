"""``redrec items add --config SERVING_CONFIG FILE``: onboard new items into the served models.

The config is the serving config the deployment runs (``$REDREC_CONFIG``; for ``make run`` the
local deployment's ``<workspace>/serving/config.yaml``; on Kubernetes the chart's ConfigMap, which
an onboarding Job mounts). Exit status 2 and every problem listed when the file is refused.
"""

from __future__ import annotations

import json
import os
import sys


def cmd_add(args) -> int:
    from redrec.index.milvus import PublishRefused
    from redrec.items.onboard import OnboardingRefused, onboard_items
    from redrec.items.validate import ItemsRefused
    from redrec.serving.config import ConfigError, ServingConfig

    path = args.config or os.environ.get("REDREC_CONFIG")
    if not path:
        raise SystemExit("give --config (the serving config.yaml) or set REDREC_CONFIG")
    try:
        cfg = ServingConfig.from_yaml(path)
        report = onboard_items(cfg, args.file)
    # refusals are final (exit 2: a Job must not retry them); anything else may be transient
    except (ItemsRefused, OnboardingRefused, PublishRefused, ConfigError) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("items", help="onboard new items into the served models without a retrain")
    sub = p.add_subparsers(dest="items_command", required=True)
    a = sub.add_parser("add", help="check, embed and add the items of FILE (.jsonl, .csv, .parquet)")
    a.add_argument("--config", help="the serving config (default $REDREC_CONFIG)")
    a.add_argument("file", help="one item per row: item_id, title, body, tags, scenarios")
    a.set_defaults(func=cmd_add)
