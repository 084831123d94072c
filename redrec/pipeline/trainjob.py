"""Distributed training on Kubernetes: a Kubeflow Trainer v2 ``TrainJob`` on the
``deepspeed-distributed`` runtime, created, watched and cleaned up with the ``kubeflow`` SDK's
``TrainerClient``.

The train step calls ``run_trainjob``: it creates the job (``redrec train`` on every node, nodes
and GPUs per node from the pipeline parameters), streams the node-0 log into the step's log,
and returns the exported checkpoint; it raises when the job fails or runs past its deadline
(the job is deleted then, so no orphaned GPUs keep running). The nodes read the prepared data
and write the checkpoint under the shared workspace (the pipeline's RWX volume, which the
runtime mounts at the same path).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field

COMPLETE, FAILED = "Complete", "Failed"


class TrainJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", description="TrainJob name (DNS label)")
    runtime: str = "deepspeed-distributed"
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    image: str = Field("", description="node image; empty = the runtime's trainer image")
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    export_dir: Path = Field(description="where node 0 writes the serving checkpoint")
    version: str = Field("", description="the model version the checkpoint must record (empty: not checked)")
    namespace: str | None = None
    timeout_s: int = Field(6 * 3600, ge=1)
    poll_s: float = Field(10.0, gt=0)

    @classmethod
    def from_params(cls, params, exp_cfg, data_dir: str | Path, scratch: str | Path, version: str,
                    meta: dict | None = None) -> "TrainJobSpec":
        """Write the job's inputs under ``scratch`` (shared workspace): the prepared data, an
        experiment YAML reading it with the parquet adapter, and the checkpoint metadata (version
        and lineage) node 0 writes into the checkpoint, as the in-process launcher does."""
        scratch = Path(scratch)
        data = scratch / "data"
        if Path(data_dir).resolve() != data.resolve():  # the train step writes its data there already
            shutil.copytree(data_dir, data, dirs_exist_ok=True)
        cfg = exp_cfg.model_copy(update={"dataset": "parquet", "out_dir": scratch / "out",
                                         "dataset_args": {"events": str(data / "events.parquet"),
                                                          "items": str(data / "items.parquet")}})
        cfg_path = scratch / "experiment.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        meta_path = scratch / "checkpoint-meta.json"
        meta_path.write_text(json.dumps({**(meta or {}), "version": version}, indent=2, default=str))
        env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return cls(name=f"redrec-{version.replace('_', '-').lower()}"[:63].rstrip("-"), runtime=params.trainer_runtime,
                   num_nodes=params.nodes, gpus_per_node=params.gpus_per_node, image=params.trainer_image,
                   command=["python", "-m", "redrec.cli", "train", "--config", str(cfg_path), "--meta", str(meta_path)],
                   env=env, export_dir=scratch / "out" / "redrec" / "model", version=version)


def trainer_client(namespace: str | None = None, client_configuration=None):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=client_configuration))


class _LogTail:
    """Prints node-0's log lines not printed yet (the SDK returns the whole log on each call)."""

    def __init__(self, client, name: str, log: Callable[[str], None]):
        self.client, self.name, self.log, self.seen = client, name, log, 0

    def __call__(self, job=None) -> None:
        try:
            lines = list(self.client.get_job_logs(self.name))
        except RuntimeError:  # the pod is not scheduled yet
            return
        for line in lines[self.seen:]:
            self.log(f"[{self.name}/node-0] {line}")
        self.seen = max(self.seen, len(lines))


def run_trainjob(spec: TrainJobSpec, client=None, log: Callable[[str], None] = print) -> Path:
    """Create the TrainJob, wait for it with log streaming, return ``spec.export_dir``."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import ActiveDeadlineSeconds, Labels, Name, TrainerCommand

    client = client or trainer_client(spec.namespace)
    image = spec.image or client.get_runtime(spec.runtime).trainer.image
    resources = {"gpu": spec.gpus_per_node} if spec.gpus_per_node else None
    trainer = CustomTrainerContainer(image=image, num_nodes=spec.num_nodes, resources_per_node=resources, env=spec.env)
    # the deadline makes Kubernetes stop the pods even if this step dies while waiting
    opts = [Name(spec.name), TrainerCommand(spec.command), Labels({"app.kubernetes.io/part-of": "redrec"}),
            ActiveDeadlineSeconds(spec.timeout_s)]
    t0 = time.time()
    name = client.train(runtime=spec.runtime, trainer=trainer, options=opts)
    log(f"TrainJob {name}: {spec.num_nodes} node(s) x {spec.gpus_per_node} GPU(s) on runtime {spec.runtime}")
    tail = _LogTail(client, name, log)
    try:
        client.wait_for_job_status(name, status={COMPLETE}, timeout=spec.timeout_s,
                                   polling_interval=min(spec.poll_s, max(spec.timeout_s / 2, 0.01)), callbacks=[tail])
    except TimeoutError:
        tail()
        client.delete_job(name)
        raise TimeoutError(f"TrainJob {name} did not complete within {spec.timeout_s}s; it was deleted") from None
    except RuntimeError as e:
        tail()
        why = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        raise RuntimeError(f"TrainJob {name} failed ({why}); its node-0 log is above") from e
    tail()
    log(f"TrainJob {name}: complete in {time.time() - t0:.0f}s")
    if not (spec.export_dir / "config.json").exists():
        raise RuntimeError(f"TrainJob {name} completed but wrote no checkpoint at {spec.export_dir}: "
                           "is the workspace volume mounted in the runtime's nodes at the same path?")
    got = json.loads((spec.export_dir / "config.json").read_text()).get("version")
    if spec.version and got != spec.version:
        raise RuntimeError(f"TrainJob {name} wrote a checkpoint of version {got!r}, expected {spec.version!r}: the nodes "
                           "ran another redrec (image) than the step, or another job wrote the same directory")
    return spec.export_dir
