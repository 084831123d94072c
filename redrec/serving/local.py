"""Run the service locally: ``bentoml serve`` on 127.0.0.1 (tests, benchmark, ``redrec serving
serve``), and ``bentoml build`` offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from redrec.index.lite import free_port
from redrec.serving.procs import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "bentos.service:RedRec"
BENTOFILE = ROOT / "bentos" / "bentofile.yaml"


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class LocalServer:
    """``with LocalServer("config.yaml") as srv: httpx.get(srv.url + "/readyz")``."""

    def __init__(self, config_path: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 target: str = SERVICE, env: dict | None = None, log_path: str | Path | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LocalServer binds to loopback only, not {host!r}")
        self.config_path = Path(config_path).resolve()
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port or free_port(self.host)
        self.target = target
        self.env = env or {}
        self.log_path = Path(log_path) if log_path else self.config_path.parent / f"bentoml-serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 180.0) -> "LocalServer":
        import httpx

        if self.proc is not None:
            return self
        cmd = [sys.executable, "-m", "bentoml", "serve", self.target, "--host", self.host, "--port", str(self.port)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=_env({"REDREC_CONFIG": str(self.config_path), **self.env}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                self.proc = None
                raise RuntimeError(f"bentoml serve exited at start:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.url}/readyz not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the process group (bentoml's supervisor and its workers)."""
        p, self.proc = self.proc, None
        if p is None:
            return
        stop_process_group(p, timeout_s)
        self._log.close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def build_bento(models: list[str] | None = None, version: str | None = None, timeout_s: float = 600) -> str:
    """``bentoml build`` of ``bentos/bentofile.yaml`` from the repository root, offline; ``models``
    (BentoML tags like ``redrec:v1``) are packed into the bento. Returns the bento tag."""
    spec = yaml.safe_load(BENTOFILE.read_text())
    if models:
        spec["models"] = list(models)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / "bentos", prefix=".bentofile-", delete=False) as f:
        yaml.safe_dump(spec, f, sort_keys=False)
        tmp = Path(f.name)
    try:
        cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(tmp), "--output", "tag"]
        if version:
            cmd += ["--version", version]
        out = subprocess.run(cmd + [str(ROOT)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    finally:
        tmp.unlink(missing_ok=True)
    if out.returncode != 0:
        raise RuntimeError(f"bentoml build failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    m = re.search(r"__tag__:(\S+)", out.stdout) or re.search(r"(redrec:[a-z0-9]+)", out.stdout)
    if not m:
        raise RuntimeError(f"bentoml build gave no tag:\n{out.stdout[-2000:]}")
    return m.group(1)
