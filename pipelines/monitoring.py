"""The monitoring pipeline (wiring only): per-scenario drift of the serving log -> [dsl.If
drifted] the training pipeline's steps (themselves gated: a retrained model that does not beat
popularity and production is not released). ``monitoring_pipeline`` is the local form.
"""

from kfp import dsl

from pipelines.wiring import components_for, default_values, pipeline_kwargs, training_steps, with_defaults
from redrec.pipeline.config import ClusterConfig, PipelineParams


def make_monitoring_pipeline(cluster: ClusterConfig | None = None, defaults: PipelineParams | None = None,
                        image: str | None = None):
    c = components_for(cluster, image)

    def redrec_monitoring(
        serving_log_dir: str = "", since_hours: float = 24.0,
        dataset: str = "movielens-1m", dataset_args: dict = {}, scenarios: list = [], experiment: dict = {},  # noqa: B006
        hidden_size: int = 0, layers: int = 0, epochs: int = 0, max_steps: int = 0, zero_stage: int = 0,
        nodes: int = 1, gpus_per_node: int = 0, gate_metrics: list = ["ndcg@10"], gate_margin: float = 0.0,  # noqa: B006
        workspace: str = "build/pipeline/ml1m", milvus_uri: str = "", index_alias: str = "redrec_items",
        feature_store_yaml: str = "", offline_engine: str = "auto", model_store: str = "", deploy_target: str = "local", serving_port: int = 3000, launcher: str = "auto",
        trainer_runtime: str = "deepspeed-distributed", trainer_image: str = "", drift_reference_at: str = "window-end",
        inject_fault: str = "",
    ):
        """RED-Rec monitoring: drift per scenario -> [drifted] retrain through the gated training steps.

        serving_log_dir: the serving log (empty: <workspace>/serving-log); since_hours: the window
        of the log compared with the reference. The other parameters are the training pipeline's."""
        a = dict(locals())
        drift = c.check_drift(workspace=workspace, serving_log_dir=serving_log_dir, scenarios=scenarios,
                              since_hours=since_hours)
        drift.set_caching_options(False)
        if cluster is not None:
            from kfp import kubernetes

            kubernetes.mount_pvc(drift, pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
        with dsl.If(drift.outputs["Output"] == True, name="drift-detected"):  # noqa: E712
            training_steps(c, a, cluster)

    with_defaults(redrec_monitoring, default_values(defaults, cluster), cluster)
    return dsl.pipeline(**pipeline_kwargs("redrec-monitoring", cluster))(redrec_monitoring)


monitoring_pipeline = make_monitoring_pipeline()
