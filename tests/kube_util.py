"""kmock's Kubernetes emulator with the server fields and the optimistic concurrency of a real API
server, which kmock (an in-memory store that merges what it is sent) leaves out:

- every create and write sets ``metadata.resourceVersion`` (a new value each time), and a create
  sets ``uid``, ``creationTimestamp`` and ``namespace``;
- PUT (replace_*) replaces the object; kmock does not serve PUT at all;
- a PUT or PATCH that carries ``metadata.resourceVersion``, or a DELETE whose ``preconditions``
  carry one, answers 409 Conflict when the object's is another, as the API server does;
- a LIST with an equality-based ``labelSelector`` returns only the matching objects.

Like test_trainjob's controller, this fills in what the server does; the code under test talks
to it over HTTP with the official client.
"""

from __future__ import annotations

import copy
import datetime
import itertools

import aiohttp.web
import kmock
import yaml

_rv = itertools.count(1000)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _conflict(kind: str, name: str) -> aiohttp.web.Response:
    # the real server's wording (StatusReasonConflict)
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 409, "reason": "Conflict",
        "message": f'Operation cannot be fulfilled on {kind} "{name}": the object has been modified; please apply '
                   "your changes to the latest version and try again",
        "details": {"name": name, "kind": kind}}, status=409)


def _not_found(kind: str, name: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 404, "reason": "NotFound",
        "message": f'{kind} "{name}" not found', "details": {"name": name, "kind": kind}}, status=404)


class ApiServer(kmock.KubernetesEmulator):
    async def _handle(self, request):
        res = request.resource
        if res is None:
            return await super()._handle(request)
        key = (res, request.namespace, request.name)
        plural = res.plural or "objects"
        method = request.method
        data = request.data if isinstance(request.data, dict) else None
        if method == kmock.method.POST and request.name is None and data is not None:
            meta = data.setdefault("metadata", {})
            meta.update(resourceVersion=str(next(_rv)), uid=f"uid-{meta.get('name')}-{next(_rv)}",
                        creationTimestamp=_now())
            meta.setdefault("namespace", request.namespace)
            meta.pop("deletionTimestamp", None)
            return await super()._handle(request)
        if method == kmock.method.GET and request.name is None and request.params.get("labelSelector") \
                and request.params.get("watch") != "true":
            return await self._list_selected(request)
        if request.name is None or method not in (kmock.method.PUT, kmock.method.PATCH, kmock.method.DELETE):
            return await super()._handle(request)
        async with self._lock:
            obj = self.objects[key] if key in self.objects else None
            if obj is None or obj.deleted:
                return _not_found(plural, request.name)
            have = (obj.get("metadata") or {}).get("resourceVersion")
            if method == kmock.method.DELETE:
                want = ((data or {}).get("preconditions") or {}).get("resourceVersion")
            else:
                want = ((data or {}).get("metadata") or {}).get("resourceVersion")
            if want and want != have:
                return _conflict(plural, request.name)
            if method == kmock.method.PUT:
                new = copy.deepcopy(data)
                old_meta = obj.get("metadata") or {}
                new.setdefault("metadata", {}).update(
                    resourceVersion=str(next(_rv)), uid=old_meta.get("uid"), namespace=request.namespace,
                    creationTimestamp=old_meta.get("creationTimestamp"))
                obj.delete()
                obj.create(new)
                return aiohttp.web.json_response(new)
        if method == kmock.method.PATCH:
            data.setdefault("metadata", {})["resourceVersion"] = str(next(_rv))
        return await super()._handle(request)


    async def _list_selected(self, request):
        """LIST with an equality-based ``labelSelector`` (``k=v,k2=v2``); kmock ignores selectors."""
        want = {}
        for term in request.params["labelSelector"].split(","):
            k, sep, v = term.partition("==") if "==" in term else term.partition("=")
            if not sep or "!" in k:
                return aiohttp.web.json_response({"kind": "Status", "code": 400, "status": "Failure",
                                                  "message": f"selector term {term!r} not emulated"}, status=400)
            want[k.strip()] = v.strip()
        async with self._lock:
            items = [obj.raw for (res, ns, _), obj in self.objects.items()
                     if res == request.resource and (request.namespace is None or ns == request.namespace)
                     and not obj.deleted and all(((obj.get("metadata") or {}).get("labels") or {}).get(k) == v
                                                 for k, v in want.items())]
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "0"},
                                          "items": items})


def kubeconfig(path, api, namespace: str) -> str:
    """A kubeconfig file pointing the official client at the emulator."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(api.url).rstrip("/")}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": namespace}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return str(path)


def client_config(api):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = str(api.url).rstrip("/")
    return client.ApiClient(cfg)
