"""Share one Milvus Lite data file between processes through ``milvus-lite server``.

Milvus Lite (milvus-lite 3.x, a pure-Python engine over faiss) lets one process open a data
path (it holds a LOCK file). Opening ``MilvusClient("x.db")`` starts a gRPC server inside the
calling process; a second process opening the same path fails. To let serving and publishing
share it, run the package's own server (``milvus-lite server --data-dir x.db``) bound to
127.0.0.1 and point every process at ``http://127.0.0.1:<port>``: the same URI scheme, and the
same pymilvus code, as a Milvus server on Kubernetes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LiteServer:
    """``with LiteServer("data/milvus.db") as uri: ...`` runs ``milvus-lite server`` on loopback."""

    def __init__(self, data_path: str | Path, port: int | None = None, host: str = "127.0.0.1", max_workers: int = 8):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LiteServer binds to loopback only, not {host!r}")
        self.data_path = Path(data_path)
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port or free_port(self.host)
        self.max_workers = max_workers
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> str:
        if self.proc is not None:
            return self.uri
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.data_path.parent / f"{self.data_path.name}.server.log"
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_path),
               "--host", self.host, "--port", str(self.port), "--max-workers", str(self.max_workers)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                tail = log_path.read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"milvus-lite server for {self.data_path} exited at start (is the file open "
                                   f"in another process?):\n{tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if self._healthy():
                    return self.uri
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"milvus-lite server on {self.uri} not ready after {timeout_s:.0f}s (log: {log_path})")

    def _healthy(self) -> bool:
        from pymilvus import MilvusClient

        try:
            c = MilvusClient(uri=self.uri, timeout=5)
            c.list_collections()
            c.close()
            return True
        except Exception:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT first: the server drains requests and closes the data file (releasing its lock)."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
