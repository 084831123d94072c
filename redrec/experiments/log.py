"""The append-only serving log (JSONL) and its reader.

Layout (the cross-component contract): under one directory, response lines in ``*.jsonl`` and
feedback lines in ``feedback-*.jsonl``. Each process writes its own files (named after the pod
and the process id), so replicas never interleave inside a file.

Durability: a line is handed to the kernel with ONE ``write(2)`` on an ``O_APPEND`` descriptor
before the response is returned, so a crash of the serving process (even SIGKILL) cannot lose an
acknowledged line nor leave half of one in the middle of the file. ``fsync=True`` additionally
syncs every line to disk (survives a power loss; costs a disk flush per request). A torn last
line (machine crash mid-write) is skipped by the reader and counted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

RESPONSE_FIELDS = ("request_id", "ts", "user_id", "scenario", "arm", "model_version", "items", "scores", "cold_start")
FEEDBACK_FIELDS = ("request_id", "user_id", "item_id", "scenario", "action", "ts")


def _process_tag() -> str:
    pod = os.environ.get("POD_NAME") or socket.gethostname() or "local"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pod)
    return f"{safe}-{os.getpid()}"


class AppendLog:
    """A JSONL log appended line by line; thread-safe.

    Rotation (``rotate_bytes`` / ``rotate_s``, 0 = never): once the current file reaches that size
    or age, the next line starts a new file ``<stem>.<n>.jsonl`` beside it, so a reader of a
    window never has to scan one unbounded file. Retention (``retention_s``, 0 = keep all): at
    each rotation, log files in the directory last written longer ago than that are deleted (any
    writer's: on a shared claim every pod prunes the same directory; a file still being written
    was written recently, so it is never old enough)."""

    def __init__(self, path: str | Path, fsync: bool = False, rotate_bytes: int = 0, rotate_s: float = 0.0,
                 retention_s: float = 0.0):
        self.base = Path(path)
        self.base.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.rotate_bytes, self.rotate_s, self.retention_s = int(rotate_bytes), float(rotate_s), float(retention_s)
        self._lock = threading.Lock()
        self._seq = 0
        self._fd = -1
        self._open(self.base)

    def _open(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._opened = time.time()
        self._size = os.fstat(self._fd).st_size

    @classmethod
    def for_process(cls, log_dir: str | Path, kind: str = "serving", fsync: bool = False, **rotation) -> "AppendLog":
        """``<dir>/serving-<pod>-<pid>.jsonl`` or ``<dir>/feedback-<pod>-<pid>.jsonl``."""
        if kind not in ("serving", "feedback"):
            raise ValueError(f"kind must be 'serving' or 'feedback', not {kind!r}")
        return cls(Path(log_dir) / f"{kind}-{_process_tag()}.jsonl", fsync=fsync, **rotation)

    def _maybe_rotate(self, incoming: int) -> None:
        full = self.rotate_bytes and self._size and self._size + incoming > self.rotate_bytes
        old = self.rotate_s and time.time() - self._opened >= self.rotate_s
        if not (full or old):
            return
        os.close(self._fd)
        while True:
            self._seq += 1
            nxt = self.base.with_name(f"{self.base.stem}.{self._seq}{self.base.suffix}")
            if not nxt.exists():  # a restarted process with the same pid keeps what it wrote before
                break
        self._open(nxt)
        if self.retention_s:
            self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - self.retention_s
        for f in self.base.parent.glob("*.jsonl"):
            try:
                if f != self.path and f.stat().st_mtime < cutoff:
                    f.unlink()
            except FileNotFoundError:  # another pod pruned it first
                pass

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self.path}: the log is closed")
            self._maybe_rotate(len(data))
            n = os.write(self._fd, data)
            while n < len(data):  # short writes happen only on full disks/signals; finish the line
                n += os.write(self._fd, data[n:])
            self._size += len(data)
            if self.fsync:
                os.fsync(self._fd)

    def append(self, record: dict) -> None:
        self._write((json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode())

    def append_many(self, records: list[dict]) -> None:
        if records:
            self._write("".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode())

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _read_lines(files: list[Path], required: tuple[str, ...]) -> tuple[list[dict], int]:
    rows, torn = [], 0
    for f in files:
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    torn += 1
                    log.warning("%s line %d: not valid JSON (torn write?); skipped", f, n)
                    continue
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ValueError(f"{f} line {n}: missing field(s) {missing}")
                rows.append(rec)
    return rows, torn


def _files(log_dir: str | Path, feedback: bool) -> list[Path]:
    d = Path(log_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"serving log dir {d} does not exist")
    return sorted(p for p in d.glob("*.jsonl") if p.name.startswith("feedback-") == feedback)


def read_serving_log(log_dir: str | Path) -> pd.DataFrame:
    """All response lines under ``log_dir`` (``*.jsonl`` except ``feedback-*``)."""
    rows, torn = _read_lines(_files(log_dir, False), RESPONSE_FIELDS)
    df = pd.DataFrame(rows, columns=list(dict.fromkeys([*RESPONSE_FIELDS, *(k for r in rows[:1] for k in r)])))
    df.attrs["torn_lines"] = torn
    return df


def read_feedback(log_dir: str | Path) -> pd.DataFrame:
    rows, torn = _read_lines(_files(log_dir, True), FEEDBACK_FIELDS)
    df = pd.DataFrame(rows, columns=list(FEEDBACK_FIELDS))
    df.attrs["torn_lines"] = torn
    return df
