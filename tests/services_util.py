"""Real servers the tests start on 127.0.0.1 from Debian's packages (`make test` installs them):
PostgreSQL with TLS and Redis."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with TLS (self-signed: the k8s yaml asks for
    sslmode=require), to run the Postgres variant of the repo for real."""

    def __init__(self):
        bins = [Path(b).parent for b in (shutil.which("postgres"),) if b] + sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = next((b for b in bins if (b / "initdb").exists() and (b / "postgres").exists()), None)
        # the server refuses to run as root, and its folders must be reachable by its own user
        self.as_user: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="redrec-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        from redrec.index import free_port

        self.port = free_port()
        self.proc = None

    def _run(self, *cmd):
        subprocess.run(self.as_user + [str(c) for c in cmd], check=True, capture_output=True, timeout=120,
                       env={**os.environ, "LC_ALL": "C"})

    def start(self):
        data = self.root / "data"
        self._run(self.bin / "initdb", "-D", data, "-U", "feast", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        self._run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                  "-keyout", data / "server.key", "-out", data / "server.crt")
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            self.as_user + [str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                            "-k", str(self.root), "-c", "ssl=on", "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user="feast", dbname="postgres", sslmode="require").close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.root / "server.log").read_text()[-2000:])
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        return {"FEAST_REGISTRY_URL": f"postgresql+psycopg://feast:unused@127.0.0.1:{self.port}/postgres?sslmode=require",
                "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(self.port), "POSTGRES_DB": "postgres",
                "POSTGRES_USER": "feast", "POSTGRES_PASSWORD": "unused:trust auth"}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)



class Redis:
    """A real redis-server on 127.0.0.1 (Debian's package; `make test` installs it)."""

    def __init__(self):
        from redrec.index import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs Debian's redis-server package")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redrec-redis-"))
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def readme_event_log_acl(password: str) -> list[str]:
    """The operator's ``ACL SETUSER`` for the event log's Redis user, as README's install step 4
    writes it (continuation lines joined, the password's SHA-256 computed as its $(...) does)."""
    import hashlib
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmd = re.search(r"^redis-cli .*? (ACL SETUSER redrec-events .*?)\n```", readme, re.M | re.S).group(1)
    words = shlex.split(cmd.replace("\\\n", " "))
    return ["#" + hashlib.sha256(password.encode()).hexdigest() if w.startswith("#$(") else w for w in words]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path``: a disk that fills up for real (ENOSPC, short
    writes). Needs root (CI and this machine run as root); skips the test otherwise."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and this machine run as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
