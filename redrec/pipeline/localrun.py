"""Run a pipeline on one machine with ``kfp.local.SubprocessRunner`` (the embedded default).

Each step runs as its own process with the current Python (``use_venv=False``: nothing is
installed at run time). The workspace holds the state that outlives a run: the Feast repo, a
Milvus Lite server (started here, detached, on 127.0.0.1, reused by later runs and by the
service), the serving config and the local BentoML server the deploy step leaves running, the
drift reference, and ``runs/`` (KFP's pipeline root: every step's artifacts).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from redrec.pipeline.config import PipelineParams


def _alive(pid: int) -> bool:
    try:  # our own child that exited is a zombie until reaped: reap it, it is not alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: its parent reaps it
        pass
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def release_milvus_connections() -> None:
    """Close every pymilvus channel of this process. pymilvus 3 keeps a closed client's shared
    channel open and keep-alive pinging; left idle for minutes (while the steps run in their own
    processes) the Lite server answers GOAWAY "too many pings" and the channel cannot recover."""
    from pymilvus.client.connection_manager import ConnectionManager

    from redrec.index.milvus import close_clients

    close_clients()
    ConnectionManager.get_instance().close_all()


def ensure_milvus(workspace: str | Path, timeout_s: float = 120.0) -> str:
    """The URI of the workspace's Milvus Lite server, starting it (detached) when not running."""
    from redrec.index.lite import LiteServer

    ws = Path(workspace)
    state = ws / "milvus.json"
    if state.exists():
        s = json.loads(state.read_text())
        if _alive(s["pid"]):
            srv = LiteServer(ws / "milvus.db", port=s["port"])
            if srv._healthy():
                release_milvus_connections()
                return srv.uri
    ws.mkdir(parents=True, exist_ok=True)
    srv = LiteServer(ws / "milvus.db")
    uri = srv.start(timeout_s)
    state.write_text(json.dumps({"pid": srv.proc.pid, "port": srv.port, "uri": uri}))
    srv.proc = None  # keep it running after this process: serving and later runs share it
    srv._close_log()
    release_milvus_connections()
    return uri


def stop_milvus(workspace: str | Path) -> None:
    import signal

    state = Path(workspace) / "milvus.json"
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        state.unlink()
        if _alive(pid):
            os.kill(pid, signal.SIGINT)  # the server closes its data file on SIGINT
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.2)
            else:  # a server that ignores SIGINT for 20 s is hung: do not leave it running
                os.kill(pid, signal.SIGKILL)


@dataclass
class RunResult:
    ok: bool
    seconds: float
    run_dir: Path | None
    steps: list[dict] = field(default_factory=list)
    error: str | None = None
    summary: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'step':<20}{'seconds':>10}"]
        lines += [f"{s['step']:<20}{s['seconds']:>10.1f}" for s in self.steps]
        inside = sum(s["seconds"] for s in self.steps)
        lines.append(f"{'(process start, KFP)':<20}{self.seconds - inside:>10.1f}")
        lines.append(f"{'total':<20}{self.seconds:>10.1f}")
        return "\n".join(lines)


def _latest_run(root: Path, before: set[str]) -> Path | None:
    runs = [p for p in root.glob("redrec-*") if p.is_dir() and p.name not in before]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_local(params: PipelineParams, pipeline: str = "training", extra: dict | None = None, log=print,
              image: str | None = None) -> RunResult:
    """Run ``pipeline`` ("training" or "monitoring") locally; never raises for a failed step
    (the result says which and why), raises for bad parameters.

    With ``image``, every step runs in a container of that image (``kfp.local.DockerRunner`` on
    the host network: the code and image a cluster runs), the workspace mounted at its own path.
    Else the steps run with this interpreter (``SubprocessRunner``).
    """
    import warnings

    from kfp import local

    import pipelines

    # kfp.local warns that the components' (cluster) image is not a Python image; locally they
    # run with this interpreter, which is the point of use_venv=False
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)

    ws = Path(params.workspace).resolve()
    params = params.model_copy(update={"workspace": str(ws)})
    if not params.milvus_uri:
        params = params.model_copy(update={"milvus_uri": ensure_milvus(ws)})
    # DockerRunner mounts the pipeline root, at its own path, into every container: with the
    # workspace as the root, steps in containers see the workspace where the host does
    root = ws if image else ws / "runs"
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    (ws / "runs").mkdir(exist_ok=True)
    timings = ws / "runs" / f"timings-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
    args = params.model_dump()
    args.update(extra or {})
    if image:
        runner = local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}", environment={
            "REDREC_PIPELINE_TIMINGS": str(timings), "REDREC_CACHE": str(ws / "cache")})
        # kfp.local deletes its workspace_root after a run: a scratch one, not ours
        local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
        fn = {"training": pipelines.make_training_pipeline, "monitoring": pipelines.make_monitoring_pipeline}[pipeline](
            image=image)
    else:
        os.environ["REDREC_PIPELINE_TIMINGS"] = str(timings)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        fn = {"training": pipelines.training_pipeline, "monitoring": pipelines.monitoring_pipeline}[pipeline]
    t0 = time.perf_counter()
    err = None
    try:
        fn(**args)
    except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        err = str(e)
    finally:
        os.environ.pop("REDREC_PIPELINE_TIMINGS", None)
    seconds = time.perf_counter() - t0
    steps = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    res = RunResult(ok=err is None, seconds=seconds, run_dir=_latest_run(root, before), steps=steps, error=err)
    res.summary = summarize(params, res.run_dir)
    return res


def task_output(run_dir: Path, task: str, name: str = "Output"):
    """A task's output parameter, as kfp.local recorded it (None when the task did not run)."""
    p = run_dir / task / "executor_output.json"
    return json.loads(p.read_text()).get("parameterValues", {}).get(name) if p.exists() else None


def summarize(params: PipelineParams, run_dir: Path | None) -> dict:
    """Where things are after a run: evaluation table, model, gate, index alias, service."""
    from redrec.index.config import IndexConfig
    from redrec.index.milvus import current_collection

    out: dict = {"run_dir": str(run_dir) if run_dir else None}
    if run_dir is not None:
        for key, rel in (("evaluation_table", "evaluate/table"), ("metrics", "evaluate/metrics"),
                         ("model", "train/model"), ("gate_report", "gate/report")):
            p = run_dir / rel
            out[key] = str(p) if p.exists() else None
        out["candidate_version"] = task_output(run_dir, "train")
        out["gate_passed"] = task_output(run_dir, "gate")
    cfg = IndexConfig(uri=params.milvus_uri, name=params.index_alias)
    out["milvus_uri"] = params.milvus_uri
    release_milvus_connections()
    try:
        out["index_alias"] = f"{params.index_alias} -> {current_collection(cfg)}"
    finally:
        release_milvus_connections()
    from redrec.pipeline.deploy import deployed_version, serving_dir

    st = serving_dir(params.workspace) / "server.json"
    out["deployed_version"] = deployed_version(params.workspace)
    out["service"] = json.loads(st.read_text()).get("url") if st.exists() else None
    return out
