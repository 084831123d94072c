"""KFP component: train (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Input, Model, Output


def train(data: Input[Dataset], training_set: Input[Dataset], dataset: str, experiment: dict, hidden_size: int,
          layers: int, epochs: int, max_steps: int, zero_stage: int, nodes: int, gpus_per_node: int, launcher: str,
          trainer_runtime: str, trainer_image: str, workspace: str, inject_fault: str, model: Output[Model]) -> str:
    """Train RED-Rec (in-process, or a Kubeflow TrainJob on the deepspeed-distributed runtime);
    returns the new model version."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import train as step

    p = PipelineParams(dataset=dataset, experiment=experiment, hidden_size=hidden_size, layers=layers, epochs=epochs,
                       max_steps=max_steps, zero_stage=zero_stage, nodes=nodes, gpus_per_node=gpus_per_node,
                       launcher=launcher, trainer_runtime=trainer_runtime, trainer_image=trainer_image,
                       workspace=workspace, inject_fault=inject_fault)
    meta = step(p, data.path, training_set.path, model.path)
    model.metadata.update({"version": meta["version"], "launcher": meta["launcher"]})
    return meta["version"]
