"""Whether a serving worker should get traffic and what it serves: readiness (the dependencies,
the drain, the serving log) and the release status behind ``/ops/release`` (per arm the pair
served and what its alias names; the config every worker of the pod has loaded). ``Engine``
mixes this in."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_info

from redrec.index import exact
from redrec.index.search import NotPublished, collection_info, paired_collection
from redrec.serving.arms import ArmRuntime


def compute_threads() -> dict:
    """The intra-op threads this process computes with: torch's and each BLAS pool's (an operator
    sees on /ops/release whether ``serving.torch_threads`` took)."""
    return {"torch": torch.get_num_threads(),
            **{f"blas {Path(i['filepath']).name}": i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}}



class HealthMixin:
    # ---- readiness ------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """Models are loaded before the service starts; ready once every arm has an index built
        from its own model (the alias' collection, or its own previous one) and the popularity
        table is loaded. With ``on_dependency_error: popularity`` a Milvus outage leaves the pod
        ready (degraded): the fallback serves. Cached for 2 s: probes must stay cheap."""
        ok, why = self._dependencies_ready()
        if self.draining is not None and self.draining.since is not None:
            # the pod is going away: the Service (or any balancer probing) stops sending here while
            # the requests already on their way are still answered
            return False, f"draining: shutting down ({self.draining.left_s():.0f}s of drain left)"
        lost = self.logs.degraded()
        if lost:  # a full log volume loses analysis, not answers: the pod stays in the Service
            why = f"{why}; degraded, {lost}" if why.startswith("degraded") else (f"degraded, {lost}" if ok else f"{why}; {lost}")
        return ok, why

    def _dependencies_ready(self) -> tuple[bool, str]:
        t, ok, why = self._ready_cache
        if time.monotonic() - t < 2.0:
            return ok, why
        ok, why = True, "ready"
        try:
            self._milvus(self._probe_milvus)
        except NotPublished as e:
            ok, why = False, str(e)
        except TimeoutError:
            ok, why = False, f"milvus timing out: no answer within {self._milvus.timeout_s:g}s (milvus.timeout_s)"
        except Exception as e:
            ok, why = False, f"milvus unreachable: {type(e).__name__}"
        if self._popular is None:
            self.refresh_popularity(raise_errors=False)
        if ok and self._popular is None:
            ok, why = False, "item popularity not loaded (feature store unreachable?)"
        if self._feast.stuck:
            # probe again: an unready pod gets no traffic, so no request would ever clear the state
            self.refresh_popularity(raise_errors=False)
        if ok and self._feast.stuck:
            ok, why = False, f"feast timing out: its last read got no answer within {self._feast.timeout_s:g}s"
        if not ok and self.cfg.serving.on_dependency_error == "popularity" and self._popular is not None:
            # the models are loaded and the fallback answers every request: an outage of a dependency
            # must not take every replica out of the Service (that would defeat the fallback)
            ok, why = True, f"degraded, serving the popularity fallback: {why}"
        self._ready_cache = (time.monotonic(), ok, why)
        return ok, why

    def _probe_milvus(self) -> None:
        from redrec.index.milvus import _alias_target

        for rt in list(self.arms.values()):
            # raises PairMismatch when nothing pairs; starts reading a small collection into this process
            exact.copy_of(rt.index, collection_info(rt.index, paired_collection(rt.index, _alias_target(rt.index), rt.version)))

    def release_status(self) -> dict:
        """Per arm: the model it serves, what its alias names, the collection it searched last
        and whether that was the alias' (``paired_with_alias``); plus the config reload state."""
        from redrec.index.milvus import _alias_target, describe

        def row_of(rt: ArmRuntime) -> dict:
            row = {"model_version": rt.version, "alias": rt.alias}
            target = _alias_target(rt.index)
            row["alias_target"] = target
            row["alias_model_version"] = describe(rt.index, target).version if target else None
            row["collection"] = paired_collection(rt.index, target, rt.version)
            row["paired_with_alias"] = row["collection"] == target
            copy = exact.copy_of(rt.index, collection_info(rt.index, row["collection"]))
            row["searched"] = (f"in process, exactly ({len(copy.ids)} items copied from Milvus)" if copy is not None
                               else "by Milvus")
            if not row["paired_with_alias"]:
                row["note"] = (f"alias '{rt.alias}' serves model {row['alias_model_version']}'s index; this arm "
                               f"keeps the pair ({rt.version}, {row['collection']}) until its config names "
                               f"{row['alias_model_version']}")
            return row

        arms = {}
        for name, rt in list(self.arms.items()):
            try:
                arms[name] = self._milvus(row_of, rt)  # a hung Milvus must not hang the status page
            except Exception as e:  # noqa: BLE001 - reported, not raised: this is a status page
                arms[name] = {"model_version": rt.version, "alias": rt.alias,
                              "error": f"{type(e).__name__}: {str(e)[:300]}"}
        return {"arms": arms, "config": {**self.reload, **self.board.pod()}, "model_source": self.models.name,
                "serving_log": self.logs.stats(), "shadow": self.shadow.status(),
                "readiness": self.ready()[1], "threads": compute_threads()}
