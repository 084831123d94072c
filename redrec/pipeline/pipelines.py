"""The two pipelines.

training_pipeline: prepare data -> Feast features + training set -> train (DeepSpeed; a TrainJob
on a cluster) -> evaluate -> gate -> [dsl.If passed] publish the Milvus index -> deploy ->
record the drift reference.

monitoring_pipeline: per-scenario drift of the serving log -> [dsl.If drifted] the training
pipeline's steps (which are themselves gated: a retrained model that does not beat popularity and production
is not published).

``make_training_pipeline(cluster, defaults)`` builds either for ``kfp.local`` (``cluster=None``)
or for a KFP backend, with kfp-kubernetes settings: the train step's GPU type and limit, node
selector and tolerations; the Milvus token Secret as ``MILVUS_TOKEN`` on the steps that talk to
Milvus; the workspace PVC on the steps that keep state. The module-level ``training_pipeline``
and ``monitoring_pipeline`` are the local forms (``"redrec.pipeline.pipelines:training_pipeline"``).
"""


import inspect

from kfp import dsl

from redrec.pipeline import components as comps
from redrec.pipeline.config import ClusterConfig, PipelineParams

# The parameters of both pipelines, in the order of PipelineParams (names are the contract).
PARAMS = list(PipelineParams.model_fields)


def _steps(c, a: dict, cluster: ClusterConfig | None) -> dict:
    """Add the training steps to the current pipeline; ``a`` maps parameter name -> channel."""
    prep = c.prepare_data(dataset=a["dataset"], dataset_args=a["dataset_args"], scenarios=a["scenarios"])
    feats = c.build_features(data=prep.outputs["data"], experiment=a["experiment"], workspace=a["workspace"])
    tr = c.train(data=prep.outputs["data"], training_set=feats.outputs["training_set"], dataset=a["dataset"],
                 experiment=a["experiment"], hidden_size=a["hidden_size"], layers=a["layers"], epochs=a["epochs"],
                 max_steps=a["max_steps"], zero_stage=a["zero_stage"], nodes=a["nodes"], gpus_per_node=a["gpus_per_node"],
                 launcher=a["launcher"], trainer_runtime=a["trainer_runtime"], trainer_image=a["trainer_image"],
                 workspace=a["workspace"], inject_fault=a["inject_fault"])
    ev = c.evaluate(data=prep.outputs["data"], model=tr.outputs["model"], experiment=a["experiment"],
                    milvus_uri=a["milvus_uri"], index_alias=a["index_alias"], inject_fault=a["inject_fault"])
    g = c.gate(metrics=ev.outputs["metrics"], gate_metrics=a["gate_metrics"], gate_margin=a["gate_margin"])
    # kfp.local resolves a condition only on a task's single output, hence a separate gate task
    with dsl.If(g.outputs["Output"] == True, name="candidate-beats-production"):  # noqa: E712
        pub = c.publish(data=prep.outputs["data"], model=tr.outputs["model"], milvus_uri=a["milvus_uri"],
                        index_alias=a["index_alias"], inject_fault=a["inject_fault"])
        dep = c.deploy(model=tr.outputs["model"], previous_collection=pub.outputs["Output"], dataset=a["dataset"],
                       workspace=a["workspace"], milvus_uri=a["milvus_uri"], index_alias=a["index_alias"],
                       deploy_target=a["deploy_target"], serving_port=a["serving_port"], inject_fault=a["inject_fault"])
        ref = c.record_reference(data=prep.outputs["data"], model=tr.outputs["model"], metrics=ev.outputs["metrics"],
                                 dataset=a["dataset"],
                                 experiment=a["experiment"], workspace=a["workspace"]).after(dep)
    tasks = {"prepare-data": prep, "build-features": feats, "train": tr, "evaluate": ev, "gate": g, "publish": pub,
             "deploy": dep, "record-reference": ref}
    for t in tasks.values():
        t.set_caching_options(False)  # steps with side effects (Feast, Milvus, serving) must run every time
    if cluster is not None:
        _cluster_settings(tasks, cluster)
    return tasks


def _cluster_settings(tasks: dict, cluster: ClusterConfig) -> None:
    from kfp import kubernetes

    tr = tasks["train"]
    if cluster.gpu_limit:
        tr.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(cluster.gpu_limit)
    for k, v in cluster.train_node_selector.items():
        kubernetes.add_node_selector(tr, label_key=k, label_value=v)
    for tol in cluster.train_tolerations:
        kubernetes.add_toleration(tr, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    for name in ("evaluate", "publish", "deploy"):
        kubernetes.use_secret_as_env(tasks[name], secret_name=cluster.milvus_secret,
                                     secret_key_to_env={cluster.milvus_secret_key: "MILVUS_TOKEN"}, optional=False)
    for name in ("build-features", "train", "deploy", "record-reference", "check-drift"):
        if name in tasks:
            kubernetes.mount_pvc(tasks[name], pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)


def _with_defaults(func, defaults: dict):
    """Give ``func`` (whose parameters are the pipeline's) the run config's values as defaults,
    so the compiled YAML carries them."""
    sig = inspect.signature(func)
    func.__signature__ = sig.replace(parameters=[
        p.replace(default=defaults.get(p.name, p.default)) for p in sig.parameters.values()])
    return func


def _defaults(defaults: PipelineParams | None, cluster: ClusterConfig | None) -> dict:
    d = (defaults or PipelineParams()).model_dump()
    if cluster is not None:
        d["workspace"] = cluster.workspace_mount
        d["deploy_target"] = "kubernetes" if d["deploy_target"] == "local" else d["deploy_target"]
    return d


def make_training_pipeline(cluster: ClusterConfig | None = None, defaults: PipelineParams | None = None):
    c = comps.build(cluster.image) if cluster is not None else comps.DEFAULT

    def redrec_training(
        dataset: str = "movielens-1m", dataset_args: dict = {}, scenarios: list = [], experiment: dict = {},  # noqa: B006
        hidden_size: int = 0, layers: int = 0, epochs: int = 0, max_steps: int = 0, zero_stage: int = 0,
        nodes: int = 1, gpus_per_node: int = 0, gate_metrics: list = ["ndcg@10"], gate_margin: float = 0.0,  # noqa: B006
        workspace: str = "build/pipeline/ml1m", milvus_uri: str = "", index_alias: str = "redrec_items",
        deploy_target: str = "local", serving_port: int = 3000, launcher: str = "auto",
        trainer_runtime: str = "deepspeed-distributed", trainer_image: str = "", inject_fault: str = "",
    ):
        """RED-Rec training: features -> train -> evaluate -> gate -> publish index -> deploy -> drift reference.

        Parameters are documented on redrec.pipeline.config.PipelineParams (same names)."""
        _steps(c, dict(locals()), cluster)

    _with_defaults(redrec_training, _defaults(defaults, cluster))
    kw = {"name": "redrec-training"}
    if cluster is not None:
        kw["pipeline_root"] = cluster.pipeline_root
    return dsl.pipeline(**kw)(redrec_training)


def make_monitoring_pipeline(cluster: ClusterConfig | None = None, defaults: PipelineParams | None = None):
    c = comps.build(cluster.image) if cluster is not None else comps.DEFAULT

    def redrec_monitoring(
        serving_log_dir: str = "", since_hours: float = 24.0,
        dataset: str = "movielens-1m", dataset_args: dict = {}, scenarios: list = [], experiment: dict = {},  # noqa: B006
        hidden_size: int = 0, layers: int = 0, epochs: int = 0, max_steps: int = 0, zero_stage: int = 0,
        nodes: int = 1, gpus_per_node: int = 0, gate_metrics: list = ["ndcg@10"], gate_margin: float = 0.0,  # noqa: B006
        workspace: str = "build/pipeline/ml1m", milvus_uri: str = "", index_alias: str = "redrec_items",
        deploy_target: str = "local", serving_port: int = 3000, launcher: str = "auto",
        trainer_runtime: str = "deepspeed-distributed", trainer_image: str = "", inject_fault: str = "",
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
            _steps(c, a, cluster)

    _with_defaults(redrec_monitoring, _defaults(defaults, cluster))
    kw = {"name": "redrec-monitoring"}
    if cluster is not None:
        kw["pipeline_root"] = cluster.pipeline_root
    return dsl.pipeline(**kw)(redrec_monitoring)


training_pipeline = make_training_pipeline()
monitoring_pipeline = make_monitoring_pipeline()
