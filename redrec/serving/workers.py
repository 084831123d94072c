"""What every worker process of a pod serves, so that ``/ops/release`` answers for the pod.

A request reaches one of the pod's workers; each reloads a changed config on its own poll. A
deployer that waited on whichever worker answered would call a release done while another
worker still served the old model. So each worker writes its reload state to a small file in a
directory its siblings share (named after their common parent, BentoML's supervisor), and any
worker reads all of them: ``pod_loaded_sha256`` is the config every live worker has loaded, or
None while they differ or one has not reported yet.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def board_dir() -> Path:
    root = os.environ.get("REDREC_WORKERS_DIR") or tempfile.gettempdir()
    return Path(root) / f"redrec-workers-{os.getppid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkerBoard:
    def __init__(self, expected: int, directory: str | Path | None = None):
        self.expected = int(expected)
        self.dir = Path(directory) if directory else board_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}.json"

    def publish(self, reload: dict, arms: dict[str, str]) -> None:
        state = {"pid": os.getpid(), "at": time.time(), "arms": arms,
                 **{k: reload.get(k) for k in ("loaded_sha256", "error_sha256", "error", "reloads")}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    def workers(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                state = json.loads(p.read_text())
            except (OSError, ValueError):  # being replaced, or a worker gone mid-write
                continue
            if _alive(int(state.get("pid", -1))):
                out.append(state)
        return out

    def pod(self) -> dict:
        ws = self.workers()
        loaded = {w.get("loaded_sha256") for w in ws}
        complete = len(ws) >= self.expected and len(loaded) == 1
        refused = sorted({w["error_sha256"] for w in ws if w.get("error_sha256")})
        return {"pod_loaded_sha256": next(iter(loaded)) if complete else None,
                "pod_error_sha256": refused[0] if refused else None,
                "workers": {str(w["pid"]): {"loaded_sha256": w.get("loaded_sha256"), "arms": w.get("arms"),
                                            "error": w.get("error")} for w in ws},
                "workers_expected": self.expected}
