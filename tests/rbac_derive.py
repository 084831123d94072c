"""What each workload's code may ask of the Kubernetes and KFP APIs, read from the code itself.

Used by tests/test_rbac.py to hold the chart's RBAC to exactly what the code calls.

* A workload is a set of entry modules; every first-party module they import (at any depth, any
  ``import`` statement, also inside functions, and ``importlib.import_module("literal")``) is in
  reach. A call added anywhere in reach counts.
* Kubernetes: every method of the official client's API classes (``kubernetes.client.*Api``) is
  mapped to (apiGroup, resource[/subresource], verb) from the client's own generated code: the
  resource path and HTTP method each ``*_with_http_info`` passes to ``call_api``. A method used
  anywhere in reach (called, or handed to ``watch.Watch().stream``) is a need; the names are
  distinctive (``patch_namespaced_deployment``), so the receiver's type is not needed.
  ``CustomObjectsApi`` takes group and plural as arguments: they must be literals or module-level
  string constants, else the derivation fails and says where.
* KFP: the API server authorizes each call by a SubjectAccessReview on pipelines.kubeflow.org
  (runs, experiments, pipelines, jobs). Each ``kfp.Client`` method is followed through the
  client's own source to the ``kfp_server_api`` operations it calls (``run_service_create_run`` ->
  runs create), plus the checks the server adds (``_KFP_SERVER_CHECKS``).
* SDKs that call Kubernetes on their own (``kubeflow.trainer``, ``kubernetes.dynamic``) cannot be
  read this way: ``Needs.sdks`` lists the modules in reach that import one, for the test to hold
  against a documented list.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("redrec", "components", "pipelines", "bentos")
KFP_GROUP = "pipelines.kubeflow.org"
# Python SDKs that reach the Kubernetes API by their own means: a module importing one is reported
OPAQUE_SDKS = ("kubeflow.trainer", "kubernetes.dynamic")
_HTTP_VERB = {"POST": "create", "PUT": "update", "PATCH": "patch"}


@dataclass(frozen=True, order=True)
class Perm:
    group: str
    resource: str  # "pods" or "pods/log"
    verb: str
    cluster: bool = False  # a cluster-scoped path (needs a ClusterRole), else namespaced

    def __str__(self) -> str:
        scope = " (cluster-wide)" if self.cluster else ""
        return f"{self.group or 'core'}/{self.resource}: {self.verb}{scope}"


@dataclass
class Needs:
    perms: dict[Perm, list[str]] = field(default_factory=dict)  # perm -> where (module:line method)
    sdks: dict[str, list[str]] = field(default_factory=dict)  # module -> opaque SDKs it imports
    modules: set[str] = field(default_factory=set)

    def add(self, perm: Perm, where: str) -> None:
        self.perms.setdefault(perm, []).append(where)


# ---- the Kubernetes client ---------------------------------------------------------------------


def _perm_from_path(path: str, http: str) -> tuple[str, str, str | None, bool] | None:
    """(group, resource, verb, cluster) of an API path such as
    ``/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status``; None for discovery paths.
    ``{group}``/``{plural}`` stay placeholders (CustomObjectsApi)."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    cluster = True
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[1] == "{namespace}":
        rest, cluster = rest[2:], False
    if not rest or rest[0] == "watch":  # discovery, or the deprecated watch paths
        return None
    resource, named = rest[0], len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    if http in ("GET", "HEAD", "OPTIONS"):
        verb = "get" if named else "list"
    elif http == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = _HTTP_VERB[http]
    return group, resource, verb, cluster


@functools.cache
def k8s_methods() -> dict[str, dict[str, tuple]]:
    """method name -> {API class name: (group, resource, verb, cluster, positional arg names)}, read
    from the generated modules' text (one regex pass per file: inspect would take seconds)."""
    import kubernetes.client.api as kapi

    out: dict[str, dict[str, tuple]] = {}
    for path in sorted(Path(kapi.__file__).parent.glob("*_api.py")):
        text = path.read_text()
        cname = re.search(r"^class (\w+)\(object\):", text, re.M).group(1)
        sigs = dict(re.findall(r"^    def (\w+)\(self, ([^)]*)\):", text, re.M))
        for name, body in re.findall(r"^    def (\w+)_with_http_info\(self, [^)]*\):(.*?)(?=^    def |\Z)", text, re.M | re.S):
            m = re.search(r"call_api\(\s*'([^']+)',\s*'(\w+)'", body)
            if not m or name not in sigs:
                raise AssertionError(f"kubernetes.client.{cname}.{name}: no call_api(path, method) in its generated "
                                     "code; the client's layout changed, update tests/rbac_derive.py")
            perm = _perm_from_path(m.group(1), m.group(2))
            if perm is not None:
                args = tuple(a.strip() for a in sigs[name].split(",") if a.strip() and not a.strip().startswith("**"))
                out.setdefault(name, {})[cname] = (*perm, args)
    if len(out) < 100:
        raise AssertionError(f"only {len(out)} Kubernetes API methods found in {kapi.__file__}: the client's layout changed")
    return out


# ---- the KFP client ----------------------------------------------------------------------------

_KFP_SERVICES = {"experiment_service": "experiments", "run_service": "runs", "pipeline_service": "pipelines",
                 "recurring_run_service": "jobs", "healthz_service": None}
# Checks the KFP API server makes beyond the operation's own (backend/src/apiserver/server):
# CreateRun also authorizes a get on the pipeline it references (canAccessReferencedPipeline).
_KFP_SERVER_CHECKS = {("runs", "create"): {("pipelines", "get")}}


def _kfp_op(op: str) -> set[tuple[str, str]]:
    if op in ("upload_pipeline", "upload_pipeline_version"):  # PipelineUploadService
        return {("pipelines", "create")}
    for svc, resource in _KFP_SERVICES.items():
        if op.startswith(svc + "_"):
            if resource is None:
                return set()  # healthz: not authorized
            verb = op[len(svc) + 1:].split("_")[0]
            verb = {"read": "readArtifact", "report": "reportMetrics"}.get(verb, verb)
            return {(resource, verb)} | _KFP_SERVER_CHECKS.get((resource, verb), set())
    raise AssertionError(f"kfp_server_api operation {op!r}: which pipelines.kubeflow.org resource it authorizes "
                         "is unknown; add it to tests/rbac_derive.py")


@functools.cache
def kfp_client_methods() -> dict[str, frozenset[tuple[str, str]]]:
    """kfp.Client method name -> {(resource, verb)}, following the client's own calls."""
    import kfp.client.client as kcm

    tree = ast.parse(Path(kcm.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Client")
    defs = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}

    @functools.cache
    def walk(name: str) -> frozenset:
        out: set = set()
        for n in ast.walk(defs[name]):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                continue
            recv = n.func.value
            if isinstance(recv, ast.Name) and recv.id == "self" and n.func.attr in defs and n.func.attr != name:
                out |= walk(n.func.attr)
            elif (isinstance(recv, ast.Attribute) and isinstance(recv.value, ast.Name) and recv.value.id == "self"
                  and recv.attr.startswith("_") and recv.attr.endswith("_api")):
                out |= _kfp_op(n.func.attr)
        return frozenset(out)

    return {name: walk(name) for name in defs if not name.startswith("_") or name == "__init__"}


# ---- reach -------------------------------------------------------------------------------------


def module_file(name: str, root: Path = REPO) -> Path | None:
    p = root.joinpath(*name.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.add(n.module)
            names |= {f"{n.module}.{a.name}" for a in n.names}
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "import_module"
              and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)):
            names.add(n.args[0].value)
    return names


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def reach(entries: list[str], sources: dict[str, str] | None = None) -> dict[str, ast.Module]:
    """Every first-party module the entries import, transitively: name -> parsed source.
    ``sources`` replaces (or adds) modules' text, for tests of the derivation itself."""
    sources = sources or {}
    seen: dict[str, ast.Module] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if name not in sources and path is None:
            raise AssertionError(f"entry module {name} does not exist")
        seen[name] = tree = ast.parse(sources[name], filename=name) if name in sources else _parse(path)
        for imp in _imported(tree):
            parts = imp.split(".")
            if parts[0] not in FIRST_PARTY:
                continue
            for i in range(1, len(parts) + 1):  # a package and its parents run their __init__
                sub = ".".join(parts[:i])
                if sub not in seen and (sub in sources or module_file(sub)):
                    todo.append(sub)
    return seen


# ---- calls -------------------------------------------------------------------------------------


def _constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
            out |= {t.id: n.value.value for t in n.targets if isinstance(t, ast.Name)}
    return out


def _arg(call: ast.Call, name: str, argnames: tuple, consts: dict[str, str]) -> str | None:
    node = next((k.value for k in call.keywords if k.arg == name), None)
    if node is None and name in argnames and argnames.index(name) < len(call.args):
        node = call.args[argnames.index(name)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    return None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}


def derive(entries: list[str], sources: dict[str, str] | None = None) -> Needs:
    """The (apiGroup, resource, verb) needs of the code reachable from ``entries``."""
    table, kfp = k8s_methods(), kfp_client_methods()
    needs = Needs()
    modules = reach(entries, sources)
    needs.modules = set(modules)
    for mod, tree in sorted(modules.items()):
        sdks = sorted({s for s in OPAQUE_SDKS for i in _imported(tree) if i == s or i.startswith(s + ".")})
        if sdks:
            needs.sdks[mod] = sdks
        consts, parents = _constants(tree), _parents(tree)
        # kfp.Client's method names are common words (TrainerClient has delete_job too): only a
        # module that imports kfp's client can hold one
        kfp_here = any(i in ("kfp", "kfp.Client", "kfp.client") or i.startswith("kfp.client.") for i in _imported(tree))
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)):
                continue
            where = f"{mod}:{n.lineno} {n.attr}"
            parent = parents.get(n)
            call = parent if isinstance(parent, ast.Call) and parent.func is n else None
            if n.attr in table:
                streamed = (isinstance(parent, ast.Call) and n in parent.args and isinstance(parent.func, ast.Attribute)
                            and parent.func.attr == "stream")
                watched = call is not None and any(k.arg == "watch" and isinstance(k.value, ast.Constant)
                                                   and k.value.value is True for k in call.keywords)
                perms = set()
                for api, (group, resource, verb, cluster, argnames) in table[n.attr].items():
                    if "{group}" in group or "{plural}" in resource:
                        g = _arg(call, "group", argnames, consts) if call is not None else None
                        plural = _arg(call, "plural", argnames, consts) if call is not None else None
                        if g is None or plural is None:
                            raise AssertionError(f"{where}: CustomObjectsApi call whose group/plural are not string "
                                                 "literals or module constants; the RBAC it needs cannot be derived")
                        group, resource = g, resource.replace("{plural}", plural)
                    if verb == "list" and (streamed or watched):
                        verb = "watch"
                    perms.add(Perm(group, resource, verb, cluster))
                if len({(p.group, p.resource) for p in perms}) > 1:
                    raise AssertionError(f"{where}: {n.attr} exists on several API classes with different resources "
                                         f"({sorted(map(str, perms))}); the derivation cannot tell which is called")
                for p in perms:
                    needs.add(p, where)
            elif kfp_here and n.attr in kfp and call is not None:
                for resource, verb in kfp[n.attr]:
                    needs.add(Perm(KFP_GROUP, resource, verb), where)
        for n in ast.walk(tree):  # kfp.Client(...) itself: its constructor's calls
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "Client"
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "kfp"):
                for resource, verb in kfp["__init__"]:
                    needs.add(Perm(KFP_GROUP, resource, verb), f"{mod}:{n.lineno} kfp.Client()")
    return needs


# ---- what the chart grants ----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    perm: Perm
    namespace: str | None  # None: every namespace (a ClusterRoleBinding)
    resource_names: tuple[str, ...]
    role: str


def grants(docs: list[dict], sa: str, sa_namespace: str) -> list[Grant]:
    """Every rule the rendered objects bind to ServiceAccount ``sa_namespace/sa``."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s["name"] == sa and s.get("namespace") == sa_namespace
                   for s in b.get("subjects") or []):
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
        if key not in roles:
            raise AssertionError(f"{b['kind']} {b['metadata']['name']} binds {sa_namespace}/{sa} to {ref['kind']} "
                                 f"{ref['name']}, which the chart does not render: its rules cannot be checked")
        role = roles[key]
        for rule in role.get("rules") or []:
            for g in rule.get("apiGroups") or [""]:
                for r in rule.get("resources") or []:
                    for v in rule.get("verbs") or []:
                        cluster = ns is None and ref["kind"] == "ClusterRole"
                        out.append(Grant(Perm(g, r, v, cluster), ns, tuple(rule.get("resourceNames") or ()),
                                         f"{role['kind']}/{role['metadata']['name']}"))
    return out


def compare(needs: Needs, granted: list[Grant]) -> tuple[list[str], list[str]]:
    """(needed but not granted, granted but not needed), each line naming where."""
    have = {g.perm for g in granted}
    missing = [f"{p}  <- {', '.join(needs.perms[p][:3])}" for p in sorted(set(needs.perms) - have)]
    extra = [f"{p}  ({', '.join(sorted({g.role for g in granted if g.perm == p}))})"
             for p in sorted(have - set(needs.perms))]
    return missing, extra
