"""``redrec pipeline run|compile|submit|stop``."""

from __future__ import annotations

import json
from pathlib import Path


def _config(args):
    from redrec.pipeline.config import RunConfig

    over = {"dataset": args.dataset, "workspace": getattr(args, "workspace", None)}
    try:
        return RunConfig.from_yaml(args.config, **over)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def cmd_run(args) -> int:
    from redrec.pipeline.localrun import run_local

    rc = _config(args)
    extra = {"serving_log_dir": args.serving_log_dir or "", "since_hours": args.since_hours} if args.pipeline == "monitoring" else None
    res = run_local(rc.params, pipeline=args.pipeline, extra=extra, image=args.image)
    print("\nstep times (wall, this machine):\n" + res.table())
    s = res.summary
    print("\nwhere things are (<run> = the run's directory):")
    print(f"  {'run':<18} {_short(res.run_dir)}")
    for key in ("evaluation_table", "metrics", "model", "gate_report", "candidate_version", "gate_passed",
                "index_alias", "milvus_uri", "deployed_version", "service"):
        print(f"  {key:<18} {_short(s.get(key), res.run_dir)}")
    if s.get("metrics"):
        from redrec.reports.evaluation import write_evaluation_html

        page = Path(rc.params.workspace) / "reports" / f"evaluation-{s.get('candidate_version') or 'run'}.html"
        try:
            print(f"  {'evaluation_page':<18} {_short(write_evaluation_html(json.loads(Path(s['metrics']).read_text()), page))}")
        except (OSError, ValueError, KeyError) as e:  # the run itself succeeded: say so, do not fail it
            print(f"  {'evaluation_page':<18} not written: {type(e).__name__}: {e}")
    if s.get("evaluation_table"):
        print("\n" + Path(s["evaluation_table"]).read_text())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"ok": res.ok, "seconds": res.seconds, "steps": res.steps,
                                                 "error": res.error, "summary": s}, indent=2, default=str))
    if not res.ok:
        print(f"\npipeline FAILED: {res.error}")
        return 1
    if s.get("service"):
        print(f"\nthe service keeps running at {s['service']};\n  stop it with `redrec pipeline stop --config {args.config}`")
        example = _example_request(res.run_dir, rc.params)
        if example:
            print("ask it (a real user of this data; an unknown id gets the popular items, cold_start true):\n"
                  f"  curl -s {s['service']}/recommend -H 'content-type: application/json' \\\n    -d '{example}'")
    return 0


def _short(value, run_dir=None):
    """A path as ``<run>/...`` under the run's directory, else relative to the working directory:
    the summary fits a 100-column terminal."""
    if not isinstance(value, (str, Path)) or not Path(value).is_absolute():
        return value
    for base, label in ((run_dir, "<run>"), (Path.cwd(), None)):
        if base is None:
            continue
        try:
            rel = Path(value).relative_to(Path(base).resolve())
        except ValueError:
            continue
        return f"{label}/{rel}" if label else str(rel)
    return str(value)


def _example_request(run_dir, params) -> str | None:
    """A request body for a user the data really has (ML-1M ids are 1m_<n>, not <n>)."""
    try:
        from redrec.pipeline.steps import load_prepared

        data = load_prepared(Path(run_dir) / "prepare-data" / "data")
        user, scenario = str(data.events["user_id"].iloc[0]), data.scenarios[0]
    except Exception:  # the run's data is not readable here: no example rather than a wrong one
        return None
    return json.dumps({"user_id": user, "scenario": scenario, "k": 5})


def cmd_compile(args) -> int:
    from redrec.pipeline.cluster import compile_pipelines

    rc = _config(args)
    for p in compile_pipelines(rc.params, rc.cluster, args.output):
        print(p)
    return 0


def cmd_submit(args) -> int:
    from redrec.pipeline.cluster import submit

    rc = _config(args)
    if args.deploy_target:  # "none" for the first release: no serving Deployment exists yet to roll
        rc.params = rc.params.model_copy(update={"deploy_target": args.deploy_target})
    out = submit(rc.params, rc.cluster, args.host, pipeline=args.pipeline, schedule=args.schedule,
                 experiment=args.experiment, work_dir=args.work_dir)
    print(json.dumps(out, indent=2))
    return 0


def cmd_stop(args) -> int:
    from redrec.pipeline.deploy import stop_local
    from redrec.pipeline.localrun import stop_milvus

    ws = _config(args).params.workspace
    stop_local(ws)
    stop_milvus(ws)
    print(f"stopped the local service and Milvus Lite server of {ws}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="run the training/monitoring pipelines locally, compile or submit them")
    sub = p.add_subparsers(dest="pipeline_command", required=True)

    def common(q):
        q.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/pipeline-ml1m.yaml)")
        q.add_argument("--dataset", help="override params.dataset")

    r = sub.add_parser("run", help="run a pipeline with kfp.local (SubprocessRunner) on this machine")
    common(r)
    r.add_argument("--pipeline", choices=("training", "monitoring"), default="training")
    r.add_argument("--workspace", help="override params.workspace")
    r.add_argument("--serving-log-dir", dest="serving_log_dir", help="monitoring: the serving log (default <workspace>/serving-log)")
    r.add_argument("--since-hours", dest="since_hours", type=float, default=24.0, help="monitoring: window of the log")
    r.add_argument("--output", help="write the run summary JSON here")
    r.add_argument("--image", help="run every step in a container of this image (kfp.local.DockerRunner, host "
                                   "network; `make image` builds redrec:dev) instead of this interpreter")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compile", help="write one KFP YAML per pipeline, with the cluster settings")
    common(c)
    c.add_argument("--output", required=True,
                   help="directory for redrec-training.yaml, redrec-monitoring.yaml and redrec-onboarding.yaml")
    c.set_defaults(func=cmd_compile)

    s = sub.add_parser("submit", help="submit a run (or, with --schedule, a recurring run) to a KFP backend")
    common(s)
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    s.add_argument("--pipeline", choices=("training", "monitoring"), default="training")
    s.add_argument("--schedule", help="6-field cron for a recurring run, e.g. '0 0 */6 * * *'")
    s.add_argument("--experiment", default="redrec")
    s.add_argument("--deploy-target", dest="deploy_target", choices=("kubernetes", "none"),
                   help="none: publish the release (model store + Milvus alias) without touching a serving "
                        "Deployment, for the first run before `helm install`; default kubernetes")
    s.add_argument("--work-dir", dest="work_dir", default="build/pipelines", help="where the submitted YAML is compiled")
    s.set_defaults(func=cmd_submit)

    t = sub.add_parser("stop", help="stop the local service and Milvus Lite server a run left running")
    common(t)
    t.set_defaults(func=cmd_stop)
