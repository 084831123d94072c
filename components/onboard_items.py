"""KFP component: onboard new items (a thin shell over ``redrec.items.onboard``)."""

from kfp.dsl import Dataset, Input, Markdown, Output


def onboard_items(items: Input[Dataset], config_path: str, report: Output[Markdown]) -> int:
    """Check, embed and add the items of ``items`` (.jsonl, .csv or .parquet: the artifact's own
    extension says which) to every model the serving config at ``config_path`` serves (empty:
    $REDREC_CONFIG); returns how many were added. A refused file fails the step, nothing written."""
    import json
    import os

    from redrec.items.onboard import onboard_from_config_path

    out = onboard_from_config_path(config_path or os.environ.get("REDREC_CONFIG", ""), items.path)
    with open(report.path, "w") as f:
        f.write("# Items onboarding\n\n```json\n" + json.dumps(out, indent=2) + "\n```\n")
    return out["items"]
