"""KFP component: evaluate (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(data: Input[Dataset], model: Input[Model], experiment: dict, workspace: str, milvus_uri: str,
             index_alias: str, model_store: str, inject_fault: str, metrics: Output[Metrics], table: Output[Markdown]):
    """Full-ranking metrics of the candidate, the production model (read from the model store,
    re-scored on the same split) and popularity."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import evaluate as step

    p = PipelineParams(experiment=experiment, workspace=workspace, milvus_uri=milvus_uri, index_alias=index_alias,
                       model_store=model_store, inject_fault=inject_fault)
    # the metrics JSON is the artifact's file; the overall numbers also go to the KFP UI
    out = step(p, data.path, model.path, metrics.path, table.path)
    for name, res in out["results"].items():
        for k, v in (res or {}).get("overall", {}).items():
            metrics.log_metric(f"{name}/{k}", float(v))
