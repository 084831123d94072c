"""``feast serve`` for the embedded repo on 127.0.0.1: the local stand-in for the chart's feature
server, so local serving reaches Feast over HTTP exactly as it does on Kubernetes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from redrec.index.lite import free_port
from redrec.serving.procs import stop_process_group


class FeatureServer:
    def __init__(self, repo_dir: str | Path, port: int | None = None, host: str = "127.0.0.1", max_requests: int = 0):
        """``max_requests``: requests a worker serves before gunicorn restarts it (feast's default is
        1000); 0 never restarts it: with the single worker here, every restart stalls all reads for
        the seconds the new worker takes to boot (the p99 of a load test)."""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FeatureServer binds to loopback only, not {host!r}")
        self.repo_dir = Path(repo_dir).resolve()
        self.fs_yaml = self.repo_dir / "feast_store.yaml"
        if not self.fs_yaml.is_file():
            raise FileNotFoundError(f"{self.fs_yaml} missing: build the repo with FeatureRepo first")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port or free_port(self.host)
        self.max_requests = max_requests
        self.proc: subprocess.Popen | None = None
        self.log_path = self.repo_dir / f"feast-serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 90.0) -> str:
        import httpx

        feast = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [feast, "-c", str(self.repo_dir), "-f", str(self.fs_yaml), "serve", "-h", self.host, "-p", str(self.port),
             "--no-access-log", "-r", "5", "--max-requests", str(self.max_requests)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"feast serve exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"feast serve on {self.url} not healthy after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 15.0) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        stop_process_group(p, timeout_s)
        self._log.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def with_online_store(repo_dir: str | Path, dest: str | Path, online_store: dict) -> Path:
    """A copy of the embedded repo's config at ``dest`` with another online store (e.g. the
    production ``{"type": "redis", "connection_string": "127.0.0.1:6379"}``), the same registry and
    sources, materialised into that store: ``FeatureServer(dest)`` then serves it."""
    import yaml

    from redrec.features.store import FeatureRepo

    repo_dir, dest = Path(repo_dir).resolve(), Path(dest).resolve()
    cfg = yaml.safe_load((repo_dir / "feast_store.yaml").read_text())
    cfg["online_store"] = online_store
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "feast_store.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    FeatureRepo(dest, fs_yaml=dest / "feast_store.yaml", source_dir=repo_dir / "feast_sources").materialize()
    return dest
