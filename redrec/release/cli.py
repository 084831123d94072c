"""``redrec release list|promote|rollback|shadow|shadow-report``: move model and index together;
put a candidate in shadow and report on it.

The run config (``--config``, the same file ``redrec pipeline run`` takes) says where the workspace,
the Milvus index, the model store and the deployment are; an empty ``milvus_uri`` means the
workspace's Milvus Lite server, started if needed.
"""

from __future__ import annotations

import json
from pathlib import Path


def _run_config(args):
    from redrec.pipeline.config import RunConfig

    try:
        return RunConfig.from_yaml(args.config, workspace=getattr(args, "workspace", None))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _params(args):
    p = _run_config(args).params
    if not p.milvus_uri:
        from redrec.pipeline.localrun import ensure_milvus

        p = p.model_copy(update={"milvus_uri": ensure_milvus(p.workspace)})
    return p


def cmd_list(args) -> int:
    from redrec.release.releases import list_releases

    rows = list_releases(_params(args))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no releases in the model store yet: run the training pipeline once")
        return 0
    print(f"{'model_version':<22} {'collection':<40} {'index':<8} {'alias':<5} {'serving':<7} {'ndcg@10':>8}")
    for r in rows:
        nd = "-" if r["ndcg@10"] is None else f"{r['ndcg@10']:.4f}"
        print(f"{r['model_version']:<22} {r['collection'] or '-':<40} {r['index_status'] or '-':<8} "
              f"{'yes' if r['alias'] else '':<5} {'yes' if r['deployed'] else '':<7} {nd:>8}")
    return 0


def _report(out: dict) -> int:
    print(f"release {out['version']}: alias -> {out['collection']} (was {out['previous_collection']}), "
          f"serving {out.get('url') or out.get('deployment') or out.get('target')}")
    return 0


def cmd_promote(args) -> int:
    from redrec.release.lease import LeaseHeld
    from redrec.release.releases import ReleaseError, promote

    gate = _run_config(args).release.shadow_gate if args.require_shadow else None
    try:
        return _report(promote(_params(args), args.version, shadow_gate=gate, shadow_report=args.shadow_report))
    except (ReleaseError, LeaseHeld) as e:
        raise SystemExit(f"promote refused: {e}") from None


def cmd_shadow(args) -> int:
    from redrec.release.lease import LeaseHeld
    from redrec.release.releases import ReleaseError
    from redrec.release.shadow import set_shadow

    if bool(args.off) == bool(args.version):
        raise SystemExit("redrec release shadow: give a model version, or --off")
    share = args.share if args.share is not None else _run_config(args).release.shadow_share
    if not 0 < share <= 1:
        raise SystemExit(f"--share: must be in (0, 1], got {share}")
    try:
        out = set_shadow(_params(args), None if args.off else args.version, share)
    except (ReleaseError, LeaseHeld) as e:
        raise SystemExit(f"shadow refused: {e}") from None
    where = out.get("url") or out.get("deployment") or out.get("config")
    print(f"shadow: {'off' if out['shadow'] is None else out['shadow']} ({out['target']}, {where})")
    return 0


def cmd_shadow_report(args) -> int:
    from redrec.experiments.shadow_report import analyse, format_text, write_report

    store, gate, params = None, None, None
    if args.config:
        from redrec.release.releases import store_for

        rc = _run_config(args)
        params, gate = rc.params, rc.release.shadow_gate
        store = store_for(params)
    try:
        rep = analyse(args.log_dir, args.version, store)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    out = args.out
    if out is None:
        if params is None:
            raise SystemExit("--out: give the output directory (or --config: the workspace's shadow/<version>/)")
        from redrec.release.shadow import default_report_dir

        out = default_report_dir(params, rep["candidate_version"])
    paths = write_report(rep, out, gate)
    print(format_text(json.loads(paths["json"].read_text())))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_rollback(args) -> int:
    from redrec.release.lease import LeaseHeld
    from redrec.release.releases import ReleaseError, rollback

    try:
        return _report(rollback(_params(args)))
    except (ReleaseError, LeaseHeld) as e:
        raise SystemExit(f"rollback refused: {e}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("release", help="list, promote or roll back releases (model + index together)")
    sub = p.add_subparsers(dest="release_command", required=True)
    for name, func, hlp in (("list", cmd_list, "releases in the model store, their index and where they serve"),
                            ("promote", cmd_promote, "serve a release: alias and serving deployment move together"),
                            ("rollback", cmd_rollback, "promote the release before the one served"),
                            ("shadow", cmd_shadow, "a candidate scores a mirrored share of requests, seen by no user"),
                            ("shadow-report", cmd_shadow_report, "the shadow candidate vs production: HTML + JSON")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--config", default=None if name == "shadow-report" else "configs/pipeline-ml1m.yaml",
                       help="the pipeline run config" + (" (model store for the offline metrics, the gate's thresholds)"
                                                         if name == "shadow-report" else ""))
        s.add_argument("--workspace", help="override params.workspace")
        if name == "list":
            s.add_argument("--json", action="store_true")
        if name == "promote":
            s.add_argument("version", help="model version (see `redrec release list`)")
            s.add_argument("--require-shadow", action="store_true",
                           help="refuse unless the version's shadow report passes release.shadow_gate of --config")
            s.add_argument("--shadow-report", help="the report's JSON or directory (default <workspace>/shadow/<version>)")
        if name == "shadow":
            s.add_argument("version", nargs="?", help="model version to put in shadow")
            s.add_argument("--share", type=float, help="share of requests mirrored (default release.shadow_share)")
            s.add_argument("--off", action="store_true", help="take the candidate out of shadow")
        if name == "shadow-report":
            s.add_argument("--log-dir", required=True, help="the serving log directory (shadow-*.jsonl and feedback)")
            s.add_argument("--out", type=Path, help="output dir (default with --config: <workspace>/shadow/<version>)")
            s.add_argument("--version", help="candidate (default: the one with the most mirrored requests)")
        s.set_defaults(func=func)
