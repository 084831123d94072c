"""``redrec features build|apply|materialize|history``: the Feast repo from the command line.

The store is the embedded default under ``--data-dir`` (default ``$REDREC_DATA`` or ``data``, the
folder ``feature_repo/feature_store.yaml`` points at), or the one ``--fs-yaml`` describes (a
cluster's Redis/Postgres config, see ``feature_repo/k8s/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import datetime, timezone



def _repo(args):
    from redrec.features.store import FeatureRepo

    engine = getattr(args, "engine", "pandas")
    return FeatureRepo(args.data_dir, fs_yaml=args.fs_yaml, source_dir=args.source_dir,
                       offline_store="spark" if engine == "spark" else "duckdb")


def cmd_build(args) -> tuple[int, dict]:
    from redrec.data import load_dataset, parse_dataset_args

    data = load_dataset(args.dataset, **parse_dataset_args(args.dataset_arg))
    repo = _repo(args)
    if args.engine == "spark":
        from redrec.features.spark_training import build_repo_sources_spark

        if repo.engine != "spark":
            raise ValueError(f"--engine spark: {args.fs_yaml} names offline_store {repo.store.config.offline_store.type!r}; "
                             "give a feature_store.yaml with offline_store type: spark, or no --fs-yaml")
        repo.seq_len = args.seq_len or repo.seq_len
        rep = build_repo_sources_spark(repo, data)
    else:
        rep = repo.build_sources(data, seq_len=args.seq_len)
    out = {"sources": str(rep.root), "scenarios": rep.scenarios, "seq_len": rep.seq_len, "rows": rep.rows}
    if not args.no_apply:
        repo.apply()
        out["applied"] = True
        if not args.no_materialize:
            repo.materialize()
            out["materialized"] = True
    return 0, out


def cmd_apply(args) -> tuple[int, dict]:
    repo = _repo(args)
    repo.apply()
    return 0, {"project": repo.store.project, "scenarios": repo.scenarios,
               "feature_views": sorted(fv.name for fv in repo.store.list_feature_views()),
               "feature_services": sorted(s.name for s in repo.store.list_feature_services())}


def cmd_materialize(args) -> tuple[int, dict]:
    end = datetime.fromtimestamp(args.end, timezone.utc) if args.end is not None else None
    repo = _repo(args)
    repo.materialize(end=end, views=args.views or None)
    return 0, {"materialized": args.views or "all views", "end": (end or datetime.now(timezone.utc)).isoformat()}


def cmd_history(args) -> tuple[int, dict]:
    repo = _repo(args)
    hist = repo.online_histories(args.user_ids, args.scenario or None)
    return 0, {u: [h._asdict() for h in hs] for u, hs in hist.items()}


def cmd_ingest(args) -> int:
    """Run an ingest worker until SIGTERM (or, with --until-idle, until the log is drained)."""
    import logging
    import signal
    import threading

    from redrec.features.ingest import IngestWorker, serve_health
    from redrec.serving.config import ConfigError, IngestConfig
    from redrec.serving.features import open_repo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = IngestConfig.from_yaml(args.config)
        worker = IngestWorker(cfg.events, open_repo(cfg), args.worker_id)
    except (ConfigError, ValueError) as e:
        print(f"redrec features ingest: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.health_port:
        serve_health(worker, args.health_port, args.health_host)
    if args.until_idle:
        idle = 0
        while idle < 3 and not stop.is_set():  # three empty passes: nothing pending, nothing arriving
            idle = idle + 1 if worker.step() == 0 and not worker.backlog else 0
        while worker.flush_popularity():
            pass
        worker.release_all()
    else:
        worker.run(stop)
    print(json.dumps({"worker": worker.id, **worker.stats.__dict__}))
    return 0


def _guard(fn):
    """Runs a command returning (exit code, JSON document); bad input ends with its message and
    exit code 2, not a traceback."""

    def run(args) -> int:
        try:
            # Feast reports progress on stdout; keep stdout for this command's JSON
            with contextlib.redirect_stdout(sys.stderr):
                out = fn(args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"redrec features {args.features_command}: {e}", file=sys.stderr)
            return 2
        code, doc = out
        print(json.dumps(doc, indent=2))
        return code

    return run


def register(sub) -> None:
    p = sub.add_parser("features", help="build, apply and materialise the Feast feature repo; read histories")
    fsub = p.add_subparsers(dest="features_command", required=True)

    def common(q):
        q.add_argument("--data-dir", dest="data_dir", help="embedded store folder (default $REDREC_DATA or ./data)")
        q.add_argument("--fs-yaml", dest="fs_yaml", help="use this feature_store.yaml instead (e.g. feature_repo/k8s/…)")
        q.add_argument("--source-dir", dest="source_dir", help="parquet sources (default <data-dir>/feast_sources)")

    q = fsub.add_parser("build", help="write the parquet sources from a dataset, then apply and materialise")
    common(q)
    q.add_argument("--dataset", default="movielens-1m", help="movielens-1m, synthetic or parquet")
    q.add_argument("--dataset-arg", action="append", help="key=value passed to the dataset loader (repeatable)")
    q.add_argument("--seq-len", dest="seq_len", type=int, help="events kept per user and scenario (default 50)")
    q.add_argument("--engine", choices=["pandas", "spark"], default="pandas",
                   help="pandas in this process, or the Spark job (local[2]; Feast's Spark offline store)")
    q.add_argument("--no-apply", action="store_true")
    q.add_argument("--no-materialize", action="store_true")
    q.set_defaults(func=_guard(cmd_build))

    q = fsub.add_parser("apply", help="register entities, sources, views and services (what `feast apply` does)")
    common(q)
    q.set_defaults(func=_guard(cmd_apply))

    q = fsub.add_parser("materialize", help="load the latest feature rows into the online store")
    common(q)
    q.add_argument("--views", nargs="*", help="only these feature views")
    q.add_argument("--end", type=int, help="unix seconds (default now)")
    q.set_defaults(func=_guard(cmd_materialize))

    q = fsub.add_parser("ingest", help="apply the Redis event log to the online store (one worker; run N of them)")
    q.add_argument("--config", default=os.environ.get("REDREC_CONFIG"), required=not os.environ.get("REDREC_CONFIG"),
                   help="the serving config.yaml (default $REDREC_CONFIG): its scenarios, feast and events sections")
    q.add_argument("--worker-id", dest="worker_id", help="consumer name in the log (default host-pid; the pod name)")
    q.add_argument("--health-port", dest="health_port", type=int, default=0, help="serve GET /healthz on this port")
    q.add_argument("--health-host", dest="health_host", default="0.0.0.0")
    q.add_argument("--until-idle", dest="until_idle", action="store_true", help="stop once the log is drained")
    q.set_defaults(func=cmd_ingest)

    q = fsub.add_parser("history", help="a user's merged online history (empty for an unknown user)")
    common(q)
    q.add_argument("user_ids", nargs="+")
    q.add_argument("--scenario", action="append", help="only these scenarios (repeatable)")
    q.set_defaults(func=_guard(cmd_history))
