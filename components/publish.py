"""KFP component: publish (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def publish(data: Input[Dataset], model: Input[Model], metrics: Input[Metrics], workspace: str, milvus_uri: str,
            index_alias: str, deploy_target: str, run_id: str, inject_fault: str, report: Output[Markdown]) -> str:
    """Publish the item index (new collection, verify, alias swap) under the release lease of run
    ``run_id``, which the deploy step takes over; returns the collection the alias served before
    ("" when none), which deploy restores should it fail."""
    import json

    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import publish as step

    p = PipelineParams(workspace=workspace, milvus_uri=milvus_uri, index_alias=index_alias, deploy_target=deploy_target,
                       inject_fault=inject_fault)
    out = step(p, data.path, model.path, metrics.path, run_id=run_id)
    with open(report.path, "w") as f:
        f.write("# Index publication\n\n```json\n" + json.dumps(out, indent=2) + "\n```\n")
    return out["previous_collection"] or ""
