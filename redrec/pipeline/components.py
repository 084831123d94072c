"""KFP components: one per step, each a thin shell over ``redrec.pipeline.steps``.

KFP runs a lightweight component's function source in a fresh process, so every body imports
``redrec`` itself; nothing is pip-installed at run time (``packages_to_install=[]``): the image
(cluster) or the current environment (``kfp.local.SubprocessRunner(use_venv=False)``) carries
redrec. ``build(image)`` decorates the functions for an image; ``DEFAULT`` uses
``$REDREC_PIPELINE_IMAGE`` or the project's image name.
"""

import os
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/redrec/redrec-pipeline:latest"


def prepare_data(dataset: str, dataset_args: dict, scenarios: list, data: Output[Dataset]):
    """Load the dataset (adapter + args), keep the scenarios asked for, write events/items parquet."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import prepare_data as step

    desc = step(PipelineParams(dataset=dataset, dataset_args=dataset_args, scenarios=scenarios), data.path)
    data.metadata.update({"users": desc["users"], "items": desc["items"], "events": desc["events"]})


def build_features(data: Input[Dataset], experiment: dict, workspace: str, training_set: Output[Dataset],
                   report: Output[Markdown]):
    """Feast apply + materialise; the point-in-time training set from get_historical_features."""
    import json

    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import build_features as step

    rep = step(PipelineParams(experiment=experiment, workspace=workspace), data.path, training_set.path)
    training_set.metadata.update({"rows": rep["rows"], "scenarios": rep["scenarios"]})
    with open(report.path, "w") as f:
        f.write("# Feast training set\n\n```json\n" + json.dumps(rep, indent=2, default=str) + "\n```\n")


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


def evaluate(data: Input[Dataset], model: Input[Model], experiment: dict, milvus_uri: str, index_alias: str,
             inject_fault: str, metrics: Output[Metrics], table: Output[Markdown]):
    """Full-ranking metrics of the candidate, the production model and popularity on one split."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import evaluate as step

    p = PipelineParams(experiment=experiment, milvus_uri=milvus_uri, index_alias=index_alias, inject_fault=inject_fault)
    # the metrics JSON is the artifact's file; the overall numbers also go to the KFP UI
    out = step(p, data.path, model.path, metrics.path, table.path)
    for name, res in out["results"].items():
        for k, v in (res or {}).get("overall", {}).items():
            metrics.log_metric(f"{name}/{k}", float(v))


def gate(metrics: Input[Metrics], gate_metrics: list, gate_margin: float, report: Output[Markdown]) -> bool:
    """True when the candidate beats popularity, and production by gate_margin, on every gate metric."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import gate as step

    return step(PipelineParams(gate_metrics=gate_metrics, gate_margin=gate_margin), metrics.path, report.path).passed


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


def deploy(model: Input[Model], previous_collection: str, dataset: str, workspace: str, milvus_uri: str,
           index_alias: str, deploy_target: str, serving_port: int, inject_fault: str) -> str:
    """Store the model (BentoML), build the bento, roll the serving deployment; returns its URL."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import deploy as step

    p = PipelineParams(dataset=dataset, workspace=workspace, milvus_uri=milvus_uri, index_alias=index_alias,
                       deploy_target=deploy_target, serving_port=serving_port, inject_fault=inject_fault)
    out = step(p, model.path, previous_collection or None)
    return str(out.get("url") or out.get("deployment") or out.get("target"))


def record_reference(data: Input[Dataset], model: Input[Model], metrics: Input[Metrics], dataset: str, experiment: dict,
                     workspace: str) -> str:
    """The training window becomes the drift monitor's reference; returns its path."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import record_reference as step

    p = PipelineParams(dataset=dataset, experiment=experiment, workspace=workspace)
    return step(p, data.path, model.path, metrics.path)["path"]


def check_drift(workspace: str, serving_log_dir: str, scenarios: list, since_hours: float, report: Output[HTML]) -> bool:
    """Per-scenario drift of the serving log against the training reference; True when any
    scenario drifted past its thresholds."""
    from redrec.pipeline.monitor import check_drift as step

    return step(workspace, serving_log_dir, scenarios, since_hours, report.path)


STEP_FUNCTIONS = (prepare_data, build_features, train, evaluate, gate, publish, deploy, record_reference, check_drift)


def build(image: str | None = None) -> SimpleNamespace:
    """The components for ``image`` (each a ``@dsl.component`` with no run-time pip install, not even of kfp: the image has it)."""
    image = image or os.environ.get("REDREC_PIPELINE_IMAGE", DEFAULT_IMAGE)
    return SimpleNamespace(**{f.__name__: dsl.component(base_image=image, packages_to_install=[], install_kfp_package=False)(f) for f in STEP_FUNCTIONS})


DEFAULT = build()
