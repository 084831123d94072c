"""The training pipeline (wiring only; the steps are ``components/``).

prepare data -> Feast features + training set -> train (DeepSpeed; a TrainJob on a cluster) ->
evaluate -> gate -> [dsl.If passed] publish the Milvus index -> deploy (model store + serving)
-> record the drift reference.

``make_training_pipeline(cluster, defaults)`` builds it for ``kfp.local`` (``cluster=None``) or
for a KFP backend; ``training_pipeline`` is the local form (``"pipelines.training:training_pipeline"``).
"""

from kfp import dsl

from pipelines.wiring import components_for, default_values, pipeline_kwargs, training_steps, with_defaults
from redrec.pipeline.config import ClusterConfig, PipelineParams


def make_training_pipeline(cluster: ClusterConfig | None = None, defaults: PipelineParams | None = None,
                        image: str | None = None):
    c = components_for(cluster, image)

    def redrec_training(
        dataset: str = "movielens-1m", dataset_args: dict = {}, scenarios: list = [], experiment: dict = {},  # noqa: B006
        hidden_size: int = 0, layers: int = 0, epochs: int = 0, max_steps: int = 0, zero_stage: int = 0,
        nodes: int = 1, gpus_per_node: int = 0, gate_metrics: list = ["ndcg@10"], gate_margin: float = 0.0,  # noqa: B006
        workspace: str = "build/pipeline/ml1m", milvus_uri: str = "", index_alias: str = "redrec_items",
        feature_store_yaml: str = "", offline_engine: str = "auto", model_store: str = "", deploy_target: str = "local", serving_port: int = 3000, launcher: str = "auto",
        trainer_runtime: str = "deepspeed-distributed", trainer_image: str = "", drift_reference_at: str = "window-end",
        inject_fault: str = "",
    ):
        """RED-Rec training: features -> train -> evaluate -> gate -> publish index -> deploy -> drift reference.

        Parameters are documented on redrec.pipeline.config.PipelineParams (same names)."""
        training_steps(c, dict(locals()), cluster)

    with_defaults(redrec_training, default_values(defaults, cluster), cluster)
    return dsl.pipeline(**pipeline_kwargs("redrec-training", cluster))(redrec_training)


training_pipeline = make_training_pipeline()
