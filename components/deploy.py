"""KFP component: deploy (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Input, Metrics, Model


def deploy(model: Input[Model], metrics: Input[Metrics], previous_collection: str, dataset: str, workspace: str,
           milvus_uri: str, index_alias: str, model_store: str, deploy_target: str, serving_port: int,
           run_id: str, inject_fault: str) -> str:
    """Write the model and its release record to the model store, roll the serving deployment to
    it, under the release lease the run's publish step handed over; returns where it serves."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import deploy as step

    p = PipelineParams(dataset=dataset, workspace=workspace, milvus_uri=milvus_uri, index_alias=index_alias,
                       model_store=model_store, deploy_target=deploy_target, serving_port=serving_port,
                       inject_fault=inject_fault)
    out = step(p, model.path, previous_collection or None, metrics.path, run_id=run_id)
    return str(out.get("url") or out.get("deployment") or out.get("target"))
