"""What both pipelines share: the training steps' wiring and the cluster (kfp-kubernetes) settings.

On a cluster: the train step's GPU type and limit, node selector and tolerations; the Milvus token
Secret as ``MILVUS_TOKEN`` on the steps that talk to Milvus; the workspace PVC on the steps that
keep state. Test hooks (``inject_fault``) are not parameters of the compiled pipelines.
"""


import inspect

from kfp import dsl

import components as comps
from redrec.pipeline.config import ClusterConfig, PipelineParams

# parameters of the local forms only: a cluster run cannot ask a step to fail
TEST_ONLY_PARAMS = ("inject_fault",)

# The parameters of both pipelines, in the order of PipelineParams (names are the contract).
PARAMS = list(PipelineParams.model_fields)


def training_steps(c, a: dict, cluster: ClusterConfig | None) -> dict:
    """Add the training steps to the current pipeline; ``a`` maps parameter name -> channel."""
    prep = c.prepare_data(dataset=a["dataset"], dataset_args=a["dataset_args"], scenarios=a["scenarios"])
    feats = c.build_features(data=prep.outputs["data"], experiment=a["experiment"], workspace=a["workspace"],
                             feature_store_yaml=a["feature_store_yaml"], offline_engine=a["offline_engine"])
    tr = c.train(data=prep.outputs["data"], training_set=feats.outputs["training_set"], dataset=a["dataset"],
                 experiment=a["experiment"], hidden_size=a["hidden_size"], layers=a["layers"], epochs=a["epochs"],
                 max_steps=a["max_steps"], zero_stage=a["zero_stage"], nodes=a["nodes"], gpus_per_node=a["gpus_per_node"],
                 launcher=a["launcher"], trainer_runtime=a["trainer_runtime"], trainer_image=a["trainer_image"],
                 workspace=a["workspace"], inject_fault=a["inject_fault"])
    ev = c.evaluate(data=prep.outputs["data"], model=tr.outputs["model"], experiment=a["experiment"],
                    workspace=a["workspace"], milvus_uri=a["milvus_uri"], index_alias=a["index_alias"],
                    model_store=a["model_store"], inject_fault=a["inject_fault"])
    g = c.gate(metrics=ev.outputs["metrics"], gate_metrics=a["gate_metrics"], gate_margin=a["gate_margin"])
    # kfp.local resolves a condition only on a task's single output, hence a separate gate task
    with dsl.If(g.outputs["Output"] == True, name="candidate-beats-production"):  # noqa: E712
        # publish and deploy hold one release lease, handed from one to the other by the run's id
        pub = c.publish(data=prep.outputs["data"], model=tr.outputs["model"], metrics=ev.outputs["metrics"],
                        workspace=a["workspace"], milvus_uri=a["milvus_uri"], index_alias=a["index_alias"],
                        deploy_target=a["deploy_target"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        inject_fault=a["inject_fault"])
        dep = c.deploy(model=tr.outputs["model"], metrics=ev.outputs["metrics"], previous_collection=pub.outputs["Output"],
                       dataset=a["dataset"], workspace=a["workspace"], milvus_uri=a["milvus_uri"],
                       index_alias=a["index_alias"], model_store=a["model_store"], deploy_target=a["deploy_target"],
                       serving_port=a["serving_port"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                       inject_fault=a["inject_fault"])
        ref = c.record_reference(data=prep.outputs["data"], model=tr.outputs["model"], metrics=ev.outputs["metrics"],
                                 dataset=a["dataset"], experiment=a["experiment"], workspace=a["workspace"],
                                 requests_at=a["drift_reference_at"]).after(dep)
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
    # the release's objects (ConfigMaps, Deployment, Lease) are named after the chart release, which
    # may live in another namespace than the run; /ops/release on the serving pods needs a token
    for name in ("publish", "deploy"):
        tasks[name].set_env_variable("REDREC_RELEASE_FULLNAME", cluster.release_fullname)
        if cluster.release_namespace:
            tasks[name].set_env_variable("REDREC_DEPLOY_NAMESPACE", cluster.release_namespace)
    if cluster.ops_token_secret:
        kubernetes.use_secret_as_env(tasks["deploy"], secret_name=cluster.ops_token_secret,
                                     secret_key_to_env={cluster.ops_token_key: "REDREC_OPS_TOKEN"}, optional=False)
    # publish too: off Kubernetes (deploy_target none) its release lease is a file in the workspace
    for name in ("build-features", "train", "evaluate", "publish", "deploy", "record-reference", "check-drift"):
        if name in tasks:
            kubernetes.mount_pvc(tasks[name], pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
    # the features step fills the online store serving reads: the chart's Feast config and its secrets
    feats = tasks["build-features"]
    kubernetes.use_config_map_as_volume(feats, config_map_name=cluster.feast_config_map,
                                        mount_path=cluster.feast_config_mount)
    if cluster.feast_secret and cluster.feast_secret_env:
        kubernetes.use_secret_as_env(feats, secret_name=cluster.feast_secret, secret_key_to_env=cluster.feast_secret_env,
                                     optional=False)


def with_defaults(func, defaults: dict, cluster: ClusterConfig | None):
    """Give ``func`` (whose parameters are the pipeline's) the run config's values as defaults,
    so the compiled YAML carries them; the cluster form drops the test-only parameters (their
    Python defaults, "no fault", reach the steps as constants)."""
    sig = inspect.signature(func)
    drop = TEST_ONLY_PARAMS if cluster is not None else ()
    func.__signature__ = sig.replace(parameters=[
        p.replace(default=defaults.get(p.name, p.default)) for p in sig.parameters.values() if p.name not in drop])
    return func


def pipeline_kwargs(name: str, cluster: ClusterConfig | None) -> dict:
    kw = {"name": name}
    if cluster is not None:
        kw["pipeline_root"] = cluster.pipeline_root
    return kw


def components_for(cluster: ClusterConfig | None, image: str | None = None):
    """The cluster's image, else ``image`` (kfp.local.DockerRunner), else the default components."""
    if cluster is not None or image:
        return comps.build(image or cluster.image)
    return comps.DEFAULT


def default_values(defaults: PipelineParams | None, cluster: ClusterConfig | None) -> dict:
    d = (defaults or PipelineParams()).model_dump()
    if cluster is not None:
        d["workspace"] = cluster.workspace_mount
        # the chart renders feature_store.offline.yaml (the Spark offline store) beside the serving one
        fs_file = "feature_store.offline.yaml" if d["offline_engine"] == "spark" else "feature_store.yaml"
        d["feature_store_yaml"] = d["feature_store_yaml"] or f"{cluster.feast_config_mount}/{fs_file}"
        d["deploy_target"] = "kubernetes" if d["deploy_target"] == "local" else d["deploy_target"]
    return d


