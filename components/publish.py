"""KFP component: publish (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Markdown, Model, Output


def publish(data: Input[Dataset], model: Input[Model], milvus_uri: str, index_alias: str, inject_fault: str,
            report: Output[Markdown]) -> str:
    """Publish the item index (new collection, verify, alias swap); returns the collection the
    alias served before ("" when none), which deploy restores should it fail."""
    import json

    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import publish as step

    out = step(PipelineParams(milvus_uri=milvus_uri, index_alias=index_alias, inject_fault=inject_fault), data.path, model.path)
    with open(report.path, "w") as f:
        f.write("# Index publication\n\n```json\n" + json.dumps(out, indent=2) + "\n```\n")
    return out["previous_collection"] or ""
