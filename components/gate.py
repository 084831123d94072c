"""KFP component: gate (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Input, Markdown, Metrics, Output


def gate(metrics: Input[Metrics], gate_metrics: list, gate_margin: float, report: Output[Markdown]) -> bool:
    """True when the candidate beats popularity, and production by gate_margin, on every gate metric."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import gate as step

    return step(PipelineParams(gate_metrics=gate_metrics, gate_margin=gate_margin), metrics.path, report.path).passed
