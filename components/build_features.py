"""KFP component: build features (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Markdown, Output


def build_features(data: Input[Dataset], experiment: dict, workspace: str, feature_store_yaml: str, offline_engine: str,
                   training_set: Output[Dataset], report: Output[Markdown]):
    """Feast apply + materialise; the point-in-time training set from get_historical_features."""
    import json

    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import build_features as step

    rep = step(PipelineParams(experiment=experiment, workspace=workspace, feature_store_yaml=feature_store_yaml,
                              offline_engine=offline_engine), data.path, training_set.path)
    training_set.metadata.update({"rows": rep["rows"], "scenarios": rep["scenarios"]})
    with open(report.path, "w") as f:
        f.write("# Feast training set\n\n```json\n" + json.dumps(rep, indent=2, default=str) + "\n```\n")
