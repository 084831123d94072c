"""The cluster side: compile the pipelines (training, monitoring, onboarding) to YAML with their
kfp-kubernetes settings, and submit a run (training) or a recurring run (monitoring) to a KFP
backend with ``kfp.Client``. The onboarding pipeline is compiled for upload only: its parameters
(the items file) are not the run config's."""

from __future__ import annotations

import os
from pathlib import Path

from redrec.pipeline.config import ClusterConfig, PipelineParams

NAMES = {"training": "redrec-training", "monitoring": "redrec-monitoring", "onboarding": "redrec-onboarding"}
SA_TOKEN = "/var/run/secrets/kubeflow/pipelines/token"


def compile_pipelines(params: PipelineParams, cluster: ClusterConfig, out_dir: str | Path) -> list[Path]:
    """One YAML per pipeline under ``out_dir``; the run config's parameters become the defaults."""
    from kfp import compiler

    from pipelines import make_monitoring_pipeline, make_onboarding_pipeline, make_training_pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, make in (("training", make_training_pipeline), ("monitoring", make_monitoring_pipeline),
                       ("onboarding", make_onboarding_pipeline)):
        path = out / f"{NAMES[kind]}.yaml"
        compiler.Compiler().compile(make(cluster, params), str(path))
        paths.append(path)
    return paths


def kfp_client(host: str, namespace: str | None = None):
    """``kfp.Client`` for ``host``; inside the cluster it authenticates with the pod's projected
    ServiceAccount token (``ServiceAccountTokenVolumeCredentials``)."""
    import kfp

    creds = None
    if os.path.exists(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", SA_TOKEN)):
        creds = kfp.client.ServiceAccountTokenVolumeCredentials(path=None)
    return kfp.Client(host=host, namespace=namespace, credentials=creds)


def submit(params: PipelineParams, cluster: ClusterConfig, host: str, pipeline: str = "training",
           schedule: str | None = None, experiment: str = "redrec", work_dir: str | Path = "build/pipelines",
           client=None) -> dict:
    """Compile and submit: a run of ``pipeline``, or with ``schedule`` (6-field cron, e.g.
    ``"0 0 */6 * * *"``) a recurring run (the monitoring pipeline's normal mode)."""
    paths = {p.stem: p for p in compile_pipelines(params, cluster, work_dir)}
    package = str(paths[NAMES[pipeline]])
    args = params.model_dump()
    args["workspace"] = cluster.workspace_mount
    if args["deploy_target"] == "local":
        args["deploy_target"] = "kubernetes"
    c = client or kfp_client(host, cluster.namespace)
    exp = c.create_experiment(name=experiment, namespace=cluster.namespace)
    if schedule:
        job = c.create_recurring_run(experiment_id=exp.experiment_id, job_name=f"{NAMES[pipeline]}-recurring",
                                     cron_expression=schedule, pipeline_package_path=package, params=args,
                                     max_concurrency=1, no_catchup=True, service_account=cluster.service_account)
        return {"recurring_run_id": job.recurring_run_id, "package": package}
    run = c.create_run_from_pipeline_package(package, arguments=args, experiment_name=experiment,
                                             namespace=cluster.namespace, run_name=f"{NAMES[pipeline]}",
                                             service_account=cluster.service_account)
    return {"run_id": run.run_id, "package": package}
