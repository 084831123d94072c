"""``redrec release list|promote|rollback``: move model and index together.

The run config (``--config``, the same file ``redrec pipeline run`` takes) says where the workspace,
the Milvus index, the model store and the deployment are; an empty ``milvus_uri`` means the
workspace's Milvus Lite server, started if needed.
"""

from __future__ import annotations

import json


def _params(args):
    from redrec.pipeline.config import RunConfig

    try:
        p = RunConfig.from_yaml(args.config, workspace=args.workspace).params
    except ValueError as e:
        raise SystemExit(str(e)) from None
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

    try:
        return _report(promote(_params(args), args.version))
    except (ReleaseError, LeaseHeld) as e:
        raise SystemExit(f"promote refused: {e}") from None


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
                            ("rollback", cmd_rollback, "promote the release before the one served")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--config", default="configs/pipeline-ml1m.yaml", help="the pipeline run config")
        s.add_argument("--workspace", help="override params.workspace")
        if name == "list":
            s.add_argument("--json", action="store_true")
        if name == "promote":
            s.add_argument("version", help="model version (see `redrec release list`)")
        s.set_defaults(func=func)
