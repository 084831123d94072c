"""KFP component: record reference (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Metrics, Model


def record_reference(data: Input[Dataset], model: Input[Model], metrics: Input[Metrics], dataset: str, experiment: dict,
                     workspace: str, requests_at: str = "window-end") -> str:
    """The training window becomes the drift monitor's reference; returns its path."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import record_reference as step

    p = PipelineParams(dataset=dataset, experiment=experiment, workspace=workspace, drift_reference_at=requests_at)
    return step(p, data.path, model.path, metrics.path)["path"]
