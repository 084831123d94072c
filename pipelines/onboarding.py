"""The onboarding pipeline (wiring only): import a file of new items -> ``onboard_items``
(``redrec items add`` as a step: checked, embedded by the served models' encoder, written to
Feast, each arm's Milvus collection and the model store). ``onboarding_pipeline`` is the local form.

On a cluster the step reads the chart's serving config (its ConfigMap, ``cluster.serving_config_map``)
with the release laid over it (``cluster.release_config_map``, optional),
writes the model store on the workspace claim, upserts Milvus with the pipeline's token and carries
the pod label ``FEATURE_SERVER_CLIENT``: the chart's feature server admits it only when
``networkPolicy.feastIngressFrom`` names that label (docs/install-kubernetes.md).
"""

from kfp import dsl
from kfp.dsl import Dataset

from pipelines.wiring import components_for, pipeline_kwargs
from redrec.pipeline.config import ClusterConfig, PipelineParams

CONFIG_MOUNT = "/etc/redrec"  # where the chart mounts the same ConfigMap in its pods
RELEASE_MOUNT = "/etc/redrec-release"  # and the release ConfigMap (redrec.pipeline.k8s_deploy)
FEATURE_SERVER_CLIENT = ("redrec-feature-server-client", "true")


def make_onboarding_pipeline(cluster: ClusterConfig | None = None, defaults: PipelineParams | None = None,
                             image: str | None = None):
    """``defaults`` is accepted for ``compile_pipelines``' sake: no training parameter applies."""
    c = components_for(cluster, image)
    config_default = f"{CONFIG_MOUNT}/config.yaml" if cluster is not None else ""

    def redrec_onboarding(items_uri: str, config_path: str = config_default):
        """RED-Rec items onboarding: the file at items_uri (s3://, gs://, minio://; its extension
        .jsonl, .csv or .parquet says how it is read) into every model the serving config serves.

        config_path: the serving config.yaml (empty: $REDREC_CONFIG of the step)."""
        items = dsl.importer(artifact_uri=items_uri, artifact_class=Dataset, reimport=True)
        task = c.onboard_items(items=items.output, config_path=config_path)
        task.set_caching_options(False)  # writes Feast, Milvus and the model store
        if cluster is not None:
            _cluster_settings(task, cluster)

    return dsl.pipeline(**pipeline_kwargs("redrec-onboarding", cluster))(redrec_onboarding)


def _cluster_settings(task, cluster: ClusterConfig) -> None:
    from kfp import kubernetes

    kubernetes.use_config_map_as_volume(task, config_map_name=cluster.serving_config_map, mount_path=CONFIG_MOUNT)
    # the models the release serves (absent before the first deploy: the config's own versions)
    kubernetes.use_config_map_as_volume(task, config_map_name=cluster.release_config_map, mount_path=RELEASE_MOUNT,
                                        optional=True)
    task.set_env_variable("REDREC_RELEASE_OVERLAY", f"{RELEASE_MOUNT}/release.yaml")
    kubernetes.use_secret_as_env(task, secret_name=cluster.milvus_secret,
                                 secret_key_to_env={cluster.milvus_secret_key: "MILVUS_TOKEN"}, optional=False)
    kubernetes.mount_pvc(task, pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
    if cluster.feast_secret and cluster.feast_secret_env:  # a SQL registry's password, as build-features gets it
        kubernetes.use_secret_as_env(task, secret_name=cluster.feast_secret, secret_key_to_env=cluster.feast_secret_env,
                                     optional=False)
    kubernetes.add_pod_label(task, label_key=FEATURE_SERVER_CLIENT[0], label_value=FEATURE_SERVER_CLIENT[1])


onboarding_pipeline = make_onboarding_pipeline()
