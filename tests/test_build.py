"""The build is reproducible: every package the code imports is declared in pyproject.toml, and the
hash-pinned lock files under lock/ (what `make install` and `make image` install from) agree with
what pyproject.toml declares. Static checks: no network, no install, well under a second each."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
LOCK = ROOT / "lock"

# What each part of the tree may import: the code that ships (the wheel, the image's service and
# feature repo, the scripts) only the runtime set; the tests and benchmarks their extras on top.
RUNTIME_EXTRAS = ("image",)  # = platform, models, objectstore
# The Spark path's modules (redrec.features.spark*) import pyspark only inside its functions: they
# run in a Spark driver with the `spark` extra (the dev venv; a Spark image), never in the serving image.
SCOPES = {
    "redrec": (*RUNTIME_EXTRAS, "spark"),
    "components": RUNTIME_EXTRAS,
    "pipelines": RUNTIME_EXTRAS,
    "bentos": RUNTIME_EXTRAS,
    "feature_repo": RUNTIME_EXTRAS,
    "monitoring": RUNTIME_EXTRAS,
    "scripts": RUNTIME_EXTRAS,
    "tests": (*RUNTIME_EXTRAS, "spark", "test"),
    "bench": (*RUNTIME_EXTRAS, "spark", "test", "bench"),
}
# lock file -> the extras it installs (besides the base dependencies)
LOCKS = {
    "requirements.txt": ("all", "test", "bench"),
    "image-cpu.txt": ("image",),
    "image-cuda.txt": ("image",),
}


# --------------------------------------------------------------------------------------------
# what pyproject.toml declares


def declared(extras: tuple[str, ...], project: dict = PYPROJECT["project"]) -> dict[str, Requirement]:
    """The requirements of the base dependencies plus ``extras`` (self-references expanded)."""
    optional = project.get("optional-dependencies", {})
    out: dict[str, Requirement] = {}
    todo, seen = list(extras), set()
    reqs = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no optional-dependencies group {extra!r}")
        for r in map(Requirement, optional[extra]):
            if canonicalize_name(r.name) == PROJECT:
                todo.extend(r.extras)
            else:
                reqs.append(r)
    for r in reqs:
        out.setdefault(canonicalize_name(r.name), r)
    return out


# --------------------------------------------------------------------------------------------
# what the code imports


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _is_local(module: str, importer: Path, root: Path) -> bool:
    """The project's own packages and the helper modules beside the importer or in tests/ (which
    the benchmarks import too)."""
    for d in (root, importer.parent, root / "tests"):
        if (d / f"{module}.py").is_file() or (d / module / "__init__.py").is_file():
            return True
    return False


def undeclared_imports(tree: Path, allowed: set[str], distributions: dict[str, list[str]],
                       root: Path = ROOT) -> dict[str, list[str]]:
    """{module: [files importing it]} for each third-party module under ``tree`` that no allowed
    distribution provides."""
    bad: dict[str, list[str]] = {}
    for path in sorted(tree.rglob("*.py")):
        for module in _top_level_imports(path):
            if module in sys.stdlib_module_names or module == "__future__" or _is_local(module, path, root):
                continue
            providers = {canonicalize_name(d) for d in distributions.get(module, [])}
            if providers - {PROJECT} and providers & allowed:
                continue
            bad.setdefault(module, []).append(str(path.relative_to(root)))
    return bad


def _problems(bad: dict[str, list[str]], distributions: dict[str, list[str]], extras: tuple[str, ...]) -> str:
    return "\n".join(
        f"  {m} (distribution {', '.join(distributions.get(m, ['not installed']))}), imported by {', '.join(files[:3])}"
        for m, files in sorted(bad.items())) + (
        f"\ndeclare them in pyproject.toml (dependencies or one of the extras {', '.join(extras)}), then `make lock`")


@pytest.mark.parametrize("tree", sorted(SCOPES))
def test_every_imported_package_is_declared(tree):
    extras = SCOPES[tree]
    allowed = set(declared(extras))
    distributions = importlib.metadata.packages_distributions()
    bad = undeclared_imports(ROOT / tree, allowed, distributions)
    assert not bad, f"{tree}/ imports packages pyproject.toml does not declare for it:\n" \
                    + _problems(bad, distributions, extras)


def test_the_import_check_names_a_package_that_only_arrives_through_another(tmp_path):
    """The check itself: jinja2 comes with bentoml and feast, but a tree that imports it while the
    declarations lack it is refused, naming the module, its distribution and the file."""
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "render.py").write_text("import json\nimport jinja2\nfrom . import render\nimport yaml\n")
    distributions = importlib.metadata.packages_distributions()
    project = {**PYPROJECT["project"],
               "dependencies": [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("jinja2")],
               "optional-dependencies": {"image": []}}
    allowed = set(declared(("image",), project))
    assert "jinja2" not in allowed and "pyyaml" in allowed
    bad = undeclared_imports(code, allowed, distributions, root=tmp_path)
    assert bad == {"jinja2": ["pkg/render.py"]}
    assert "jinja2 (distribution Jinja2), imported by pkg/render.py" in _problems(bad, distributions, ("image",))


# --------------------------------------------------------------------------------------------
# the lock files


def parse_lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (pinned version, sha256 hashes)} of a `--generate-hashes` requirements file."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *opts = line.split(" --")
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", spec.strip())
        assert m, f"{path.name}: {spec.strip()!r} is not pinned with == (regenerate with `make lock`)"
        hashes = [o.split(":", 1)[1] for o in (x.strip() for x in opts) if o.startswith("hash=sha256:")]
        out[canonicalize_name(m[1])] = (Version(m[2]), hashes)
    return out


def lock_problems(lock: dict[str, tuple[Version, list[str]]], wanted: dict[str, Requirement]) -> list[str]:
    problems = []
    for name, req in sorted(wanted.items()):
        if name not in lock:
            problems.append(f"{req} is declared but not in the lock")
            continue
        version, hashes = lock[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} is declared but the lock pins {name}=={version}")
        if not hashes:
            problems.append(f"{name}=={version} has no --hash=sha256: in the lock")
    problems += [f"{name}=={v} has no --hash=sha256: in the lock" for name, (v, h) in sorted(lock.items())
                 if not h and name not in wanted]
    return problems


@pytest.mark.parametrize("lock_file", sorted(LOCKS))
def test_the_lock_pins_every_declared_dependency_with_hashes(lock_file):
    problems = lock_problems(parse_lock(LOCK / lock_file), declared(LOCKS[lock_file]))
    assert not problems, f"lock/{lock_file} is out of date with pyproject.toml; run `make lock`:\n  " \
                         + "\n  ".join(problems)


@pytest.mark.parametrize("name", ["nodeps-data", "nodeps-dev"])
def test_the_no_deps_packages_are_locked_with_hashes(name):
    wanted = {canonicalize_name(r.name): r for r in
              (Requirement(line) for line in (LOCK / f"{name}.in").read_text().splitlines()
               if line.strip() and not line.startswith("#"))}
    lock = parse_lock(LOCK / f"{name}.txt")
    problems = lock_problems(lock, wanted) + [f"{n} is locked but not in lock/{name}.in" for n in set(lock) - set(wanted)]
    assert not problems, f"lock/{name}.txt is out of date with lock/{name}.in; run `make lock`:\n  " + "\n  ".join(problems)


def test_cpu_locks_pin_the_cpu_torch_and_none_of_what_cuda_torch_brings():
    """A bare torch from PyPI is the multi-GB CUDA build: the dev venv and the CPU image never get
    it, nor the CUDA libraries it pulls in (what the GPU image's lock has beyond the CPU image's)."""
    cuda = parse_lock(LOCK / "image-cuda.txt")
    assert cuda["torch"][0].local is None
    cuda_only = set(cuda) - set(parse_lock(LOCK / "image-cpu.txt"))
    assert {"triton", "nvidia-cublas"} <= cuda_only
    for lock_file in ("requirements.txt", "image-cpu.txt"):
        lock = parse_lock(LOCK / lock_file)
        assert lock["torch"][0].local == "cpu", f"lock/{lock_file} pins torch=={lock['torch'][0]}, not a +cpu build"
        assert not cuda_only & set(lock), f"lock/{lock_file} has CUDA packages: {sorted(cuda_only & set(lock))}"


def test_the_lock_check_refuses_a_stale_or_unhashed_lock(tmp_path):
    lock = tmp_path / "requirements.txt"
    lock.write_text("jinja2==3.1.6 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via redrec\n"
                    "pyyaml==5.4 \\\n    --hash=sha256:" + "b" * 64 + "\nnumpy==2.4.6\n")
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, ["jinja2>=3.1", "pyyaml>=6", "numpy", "scipy"])}
    assert lock_problems(parse_lock(lock), wanted) == [
        "numpy==2.4.6 has no --hash=sha256: in the lock",
        "pyyaml>=6 is declared but the lock pins pyyaml==5.4",
        "scipy is declared but not in the lock",
    ]
    lock.write_text("jinja2>=3.1\n")
    with pytest.raises(AssertionError, match="is not pinned with =="):
        parse_lock(lock)
