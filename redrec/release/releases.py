"""A release is one object: (model version, item-index collection, metrics, data digest).

The model store holds the model and, in its manifest, the release record; the Milvus collection
records the model version it was built from; the alias names the released collection and the
serving config names the released model. ``promote`` moves both pointers (alias first, then the
serving deployment; a failed deployment moves the alias back), ``rollback`` promotes the release
before the one served. Serving never pairs a model with another model's collection
(``redrec.index.search.paired_collection``), so every intermediate state serves a matching pair.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from redrec.pipeline.config import PipelineParams
from redrec.release.model_store import ModelStore


class ReleaseError(RuntimeError):
    pass


@dataclass
class Release:
    model_version: str
    collection: str
    index_alias: str
    metrics: dict | None = None  # the candidate's offline results when it was promoted
    data_digest: dict = field(default_factory=dict)
    created: float = 0.0

    def as_meta(self) -> dict:
        return {"release": asdict(self)}

    @classmethod
    def from_manifest(cls, man: dict) -> "Release | None":
        r = man.get("release")
        return None if r is None else cls(**r)


def store_for(params: PipelineParams) -> ModelStore:
    return ModelStore(params.model_store_uri())


def _index(params: PipelineParams):
    from redrec.pipeline.steps import _index_cfg

    return _index_cfg(params)


def list_releases(params: PipelineParams) -> list[dict]:
    """Every model in the store with its collection (if still kept), metrics and where it serves."""
    from redrec.index.milvus import _alias_target, list_versions
    from redrec.pipeline.deploy import deployed_versions

    store = store_for(params)
    cfg = _index(params)
    collections = {v.version: v for v in list_versions(cfg)}
    served = _alias_target(cfg)
    deployed = deployed_versions(params)
    rows = []
    for v in store.versions():
        man = store.manifest(v)
        rel = Release.from_manifest(man)
        col = collections.get(v)
        ndcg = ((rel.metrics or {}).get("overall") or {}).get("ndcg@10") if rel else None
        rows.append({"model_version": v, "collection": col.name if col else None,
                     "index_status": col.status if col else "dropped", "alias": served is not None and col is not None
                     and col.name == served, "deployed": v in deployed, "ndcg@10": ndcg,
                     "data": (rel.data_digest or {}).get("training_set_sha256") if rel else None,
                     "created": man.get("created")})
    return rows


def _check_promotable(params: PipelineParams, version: str):
    from redrec.index.milvus import describe

    store = store_for(params)
    if not store.has(version):
        raise ReleaseError(f"model version {version}: not in the model store {store.uri} (known: {store.versions()})")
    cfg = _index(params)
    name = cfg.collection(version)
    from redrec.index.milvus import client

    if not client(cfg).has_collection(name):
        raise ReleaseError(f"model version {version}: its index collection {name} is not kept any more "
                           f"(keep_versions={cfg.keep_versions}); retrain or re-publish it")
    info = describe(cfg, name)
    if info.status != "ready" or info.version != version:
        raise ReleaseError(f"collection {name} is {info.status!r} and records model {info.version!r}, not a ready "
                           f"index of model {version}")
    return cfg, name


def promote(params: PipelineParams, version: str, shadow_gate=None, shadow_report=None) -> dict:
    """Serve release ``version``: the alias to its collection, then the serving deployment to its
    model; if the deployment fails the alias is moved back and the previous pair keeps serving.
    Holds the release lease throughout (``redrec.release.lease``): one release at a time.
    ``shadow_gate`` (``ShadowGate``): refuse, before anything moves, unless the candidate's shadow
    report (``shadow_report``, default ``redrec.release.shadow.default_report_dir``) passes it."""
    from redrec.release.lease import release_lease

    with release_lease(params).hold():
        if shadow_gate is not None:
            from redrec.release.shadow import require_shadow

            require_shadow(params, version, shadow_gate, shadow_report)
        return _promote(params, version)


def _promote(params: PipelineParams, version: str) -> dict:
    from redrec.index.milvus import _alias_target, client
    from redrec.pipeline.deploy import switch_serving

    cfg, name = _check_promotable(params, version)
    previous = _alias_target(cfg)
    c = client(cfg)
    if previous is None:
        c.create_alias(name, cfg.name)
    elif previous != name:
        c.alter_alias(name, cfg.name)
    _alias_target(cfg)  # refresh this process' view
    try:
        out = switch_serving(params, version)
    except BaseException:
        from redrec.pipeline.steps import _restore_alias

        _restore_alias(params, previous)
        raise
    return {"version": version, "collection": name, "previous_collection": previous, **out}


def rollback(params: PipelineParams) -> dict:
    """Promote the newest release older than the one the alias serves (under the release lease)."""
    from redrec.release.lease import release_lease

    with release_lease(params).hold():
        return _rollback(params)


def _rollback(params: PipelineParams) -> dict:
    from redrec.index.milvus import _alias_target, describe

    cfg = _index(params)
    served = _alias_target(cfg)
    if served is None:
        raise ReleaseError(f"nothing is released under alias '{cfg.name}': nothing to roll back")
    current = describe(cfg, served).version
    older = [r["model_version"] for r in list_releases(params)
             if r["model_version"] < current and r["index_status"] == "ready"]
    if not older:
        raise ReleaseError(f"no release older than {current} has both its model in the store and its collection kept")
    return _promote(params, older[-1])
