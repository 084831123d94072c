"""KFP component: check drift (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import HTML, Output


def check_drift(workspace: str, serving_log_dir: str, scenarios: list, since_hours: float, report: Output[HTML]) -> bool:
    """Per-scenario drift of the serving log against the training reference; True when any
    scenario drifted past its thresholds."""
    from redrec.pipeline.monitor import check_drift as step

    return step(workspace, serving_log_dir, scenarios, since_hours, report.path)
