"""The model store serving pods read: one directory per model version under a URI.

``<uri>/models/<version>/`` holds an exported serving checkpoint (``export_checkpoint``'s files,
training weights left out) and, written last, ``MANIFEST.json`` with each file's size and SHA-256.
A version without a manifest is incomplete (a writer died part way) and is invisible to readers,
so a store on an object store (``s3://``, ``gs://``: no atomic directory rename there) is as safe as
a local directory. Versions are immutable: putting an existing complete version is refused.

The URI is anything fsspec opens: a local path (the default, ``<workspace>/models``), the
workspace PVC on a cluster, or ``s3://bucket/prefix`` / ``gs://...`` with s3fs / gcsfs installed.
Readers on a remote store fetch a version once into a local cache directory.

Every read checks the files against the manifest (size, then SHA-256) before anything uses them:
``path`` does, on a local store (read in place) and on a remote store's cached copy alike (a
damaged copy is dropped and fetched again), so a model is hashed once per load, never per request.
A file that does not match raises ``CorruptModelError`` naming it and both digests; serving then
keeps the models it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec

MANIFEST = "MANIFEST.json"
SERVED_FILES = ("config.json", "serving.safetensors", "item_ids.json", "item_embeddings.npy")
_VERSION_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_FIX = ("the stored model is damaged or was altered after publication and must not be served: roll back to the "
        "previous release (`redrec release rollback`) or re-publish the model as a new version (versions are "
        "immutable: rerun the pipeline's deploy step)")

log = logging.getLogger(__name__)


class ModelStoreError(LookupError):
    pass


class CorruptModelError(ModelStoreError):
    """A stored file differs from what its manifest (or its name) records."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(d: Path, manifest: dict, where: str) -> None:
    """Every file ``manifest`` lists is in ``d`` with its recorded size and SHA-256; ``where``
    (``<store>: <version>``) names them in the error."""
    for name, want in manifest["files"].items():
        p = d / name
        if not p.is_file():
            raise CorruptModelError(f"{where}/{name} is missing; {_FIX}")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CorruptModelError(f"{where}/{name} does not match its manifest: {size} bytes, the manifest "
                                    f"records {want['bytes']} bytes (SHA-256 {want['sha256']}); {_FIX}")
        got = _sha256(p)
        if got != want["sha256"]:
            raise CorruptModelError(f"{where}/{name} does not match its manifest: SHA-256 {got}, the manifest "
                                    f"records {want['sha256']}; {_FIX}")


def verify_dir(d: str | Path) -> bool:
    """Check a version directory against its own manifest, if it has one (a model store version or
    its cached copy, handed to a reader as a plain directory); False when there is none."""
    d = Path(d)
    if not (d / MANIFEST).is_file():
        return False
    verify_files(d, json.loads((d / MANIFEST).read_text()), str(d))
    return True


def check_version(version: str) -> str:
    if not _VERSION_RE.fullmatch(str(version)):
        raise ValueError(f"model version {version!r}: use 1-64 letters, digits or underscores "
                         "(the same name becomes the Milvus collection suffix)")
    return str(version)


@dataclass
class ModelStore:
    uri: str
    cache_dir: str = ""  # where a remote store's versions are fetched to; default $REDREC_CACHE/model-store

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("model store uri is empty: set model_store.uri (a directory, s3://... or gs://...)")
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/")
        self.local = type(self.fs).__name__ == "LocalFileSystem"

    def _dir(self, version: str) -> str:
        return f"{self.root}/models/{check_version(version)}"

    # ---- write -------------------------------------------------------------------------------
    def put(self, ckpt_dir: str | Path, version: str, meta: dict | None = None) -> str:
        """Copy the serving checkpoint at ``ckpt_dir`` in as ``version``; returns its URI."""
        ckpt_dir = Path(ckpt_dir)
        missing = [f for f in SERVED_FILES if not (ckpt_dir / f).is_file()]
        if missing:
            raise ValueError(f"{ckpt_dir}: not a serving checkpoint, missing {missing} (export it with export_checkpoint)")
        if self.has(version):
            raise ValueError(f"model store {self.uri}: version {version} already exists; versions are immutable, "
                             "publish a new version")
        d = self._dir(version)
        if self.fs.exists(d):  # an earlier writer died before its manifest: start over
            self.fs.rm(d, recursive=True)
        self.fs.makedirs(d, exist_ok=True)
        files = {}
        for name in SERVED_FILES:
            src = ckpt_dir / name
            self.fs.put_file(str(src), f"{d}/{name}")
            files[name] = {"bytes": src.stat().st_size, "sha256": _sha256(src)}
        manifest = {"version": version, "created": time.time(), "files": files, **(meta or {})}
        # the manifest is the commit point: written last, through a temporary name where renames exist
        tmp = f"{d}/.{MANIFEST}.tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=2, default=str))
        self.fs.mv(tmp, f"{d}/{MANIFEST}")
        return f"{self.uri.rstrip('/')}/models/{version}"

    # ---- read --------------------------------------------------------------------------------
    def has(self, version: str) -> bool:
        return self.fs.exists(f"{self._dir(version)}/{MANIFEST}")

    def versions(self) -> list[str]:
        base = f"{self.root}/models"
        if not self.fs.exists(base):
            return []
        out = []
        for p in self.fs.ls(base, detail=False):
            name = str(p).rstrip("/").rsplit("/", 1)[-1]
            if _VERSION_RE.fullmatch(name) and self.fs.exists(f"{base}/{name}/{MANIFEST}"):
                out.append(name)
        return sorted(out)

    def manifest(self, version: str) -> dict:
        if not self.has(version):
            raise ModelStoreError(f"model_version {version!r}: not in the model store {self.uri} "
                                  f"(complete versions: {self.versions()})")
        with self.fs.open(f"{self._dir(version)}/{MANIFEST}") as f:
            return json.loads(f.read())

    def path(self, version: str) -> Path:
        """A local directory holding ``version``'s files, checked against the manifest (the store's
        own directory on a local store, else a copy in the cache). Raises ``CorruptModelError``."""
        man = self.manifest(version)
        where = f"model store {self.uri}: {version}"
        if self.local:
            d = Path(self._dir(version))
            verify_files(d, man, where)
            return d
        cache = Path(self.cache_dir or Path(os.environ.get("REDREC_CACHE", Path.home() / ".cache" / "redrec")) / "model-store")
        dest = cache / hashlib.sha256(self.uri.encode()).hexdigest()[:12] / version
        if (dest / MANIFEST).is_file():
            try:
                verify_files(dest, man, f"{where} (cached copy {dest})")
                return dest
            except CorruptModelError as e:  # the store is the truth: fetch it again
                log.warning("%s; fetching it again", e)
                shutil.rmtree(dest, ignore_errors=True)
        tmp = dest.with_name(f".{version}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name in man["files"]:
                self.fs.get_file(f"{self._dir(version)}/{name}", str(tmp / name))
            verify_files(tmp, man, where)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2))
        try:
            tmp.rename(dest)
        except OSError:  # another process fetched it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def verify(self, version: str) -> None:
        """Every file of ``version`` matches its manifest (size and SHA-256); ``path`` checks the same."""
        self.path(version)
