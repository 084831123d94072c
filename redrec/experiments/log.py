"""The append-only serving log (JSONL) and its reader.

Layout (the cross-component contract): under one directory, response lines in ``*.jsonl`` and
feedback lines in ``feedback-*.jsonl``; a shadow candidate's answers (``redrec.serving.shadow``)
in ``shadow-*.jsonl``, which the response and feedback readers never read (no user saw them). Each process writes its own files (named after the pod
and the process id), so replicas never interleave inside a file.

Durability: a line is handed to the kernel with ONE ``write(2)`` on an ``O_APPEND`` descriptor
before the response is returned, so a crash of the serving process (even SIGKILL) cannot lose an
acknowledged line nor leave half of one in the middle of the file. ``fsync=True`` additionally
syncs every line to disk (survives a power loss; costs a disk flush per request). A torn last
line (machine crash mid-write) is skipped by the reader and counted.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


RESPONSE_FIELDS = ("request_id", "ts", "user_id", "scenario", "arm", "model_version", "items", "scores", "cold_start")
FEEDBACK_FIELDS = ("request_id", "user_id", "item_id", "scenario", "action", "ts")
# ``request_id`` only on events that react to a response: most behaviour arrives unprompted
FEEDBACK_REQUIRED = ("user_id", "item_id", "scenario", "action", "ts")
# feedback lines also carry ``received_ts`` (when the server took the event): ``ts`` is the event's
# own time, which a client may send late (an app flushing offline events) or replay from history.
# Windows over feedback select by arrival, so an event is judged once, in the window it arrived in.
RECEIVED = "received_ts"


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
        self._torn = False

    @classmethod
    def for_process(cls, log_dir: str | Path, kind: str = "serving", fsync: bool = False, **rotation) -> "AppendLog":
        """``<dir>/<kind>-<pod>-<pid>.jsonl``: kind serving, feedback or shadow."""
        if kind not in ("serving", "feedback", "shadow"):
            raise ValueError(f"kind must be 'serving', 'feedback' or 'shadow', not {kind!r}")
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
            if self._torn:
                # a fragment we could not cut off ends the file: end it, so this line starts on its own
                data = b"\n" + data
            try:
                n = os.write(self._fd, data)
                while n < len(data):  # short writes happen only on full disks/signals; finish the line
                    n += os.write(self._fd, data[n:])
            except OSError:
                self._cut_back()
                raise
            self._size += len(data)
            self._torn = False
            if self.fsync:
                os.fsync(self._fd)

    def _cut_back(self) -> None:
        """After a failed write (a full disk, EIO) cut the file back to its last whole line: a line
        half on disk would otherwise be read as data (or glue the next line to it)."""
        try:
            if os.fstat(self._fd).st_size > self._size:
                os.ftruncate(self._fd, self._size)
        except OSError:
            # the next line that gets through starts with a newline, ending the fragment as one
            # unparseable line the reader skips and counts
            self._torn = True

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


# The reader: one for every consumer (A/B analysis, drift monitor). A few malformed lines must not
# blind the monitor or stop an analysis, so bad lines are skipped and counted per reason (file and
# line of the first few kept); the caller decides whether what is left is enough to judge.
REQUEST_FIELDS = ("request_id", "ts", "user_id", "scenario", "items", "scores")  # what every response line has


@dataclass
class LogRead:
    requests: pd.DataFrame
    feedback: pd.DataFrame
    files: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def problems(self) -> list[str]:
        if not self.skipped:
            return []
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return [f"serving log: skipped malformed lines ({reasons}); first: " + "; ".join(self.examples[:3])]


def _check(rec, fields: tuple[str, ...]) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    miss = [f for f in fields if rec.get(f) is None]
    if miss:
        return f"missing field(s) {miss}"
    try:
        ts = float(rec["ts"])
    except (TypeError, ValueError):
        return "field 'ts' is not a number"
    if not math.isfinite(ts):  # JSON as Python reads it allows Infinity and NaN
        return "field 'ts' is not a finite number"
    if "items" in fields and (not isinstance(rec["items"], list) or not isinstance(rec["scores"], list) or len(rec["items"]) != len(rec["scores"])):
        return "fields 'items' and 'scores' must be lists of equal length"
    return None


# Lines as AppendLog writes them (compact JSON): the key's first occurrence right after ``{`` or
# ``,`` with no nested object opened before it is the top-level key (a quote inside a string is
# escaped, so ``,"ts":`` cannot occur inside a value).
_TS_KEYS = {False: ('"ts":',), True: ('"received_ts":', '"ts":')}


def _prefilter_when(line: str, is_fb: bool) -> float | None:
    """The line's arrival time read without parsing the JSON, or None where that is not certain
    (a torn line, a nested object before the key, a writer with other separators)."""
    if not line.endswith("}\n") and not line.endswith("}"):
        return None  # a torn line: the full parse counts it
    for key in _TS_KEYS[is_fb]:
        i = line.find(key)
        if i == -1:
            continue  # feedback written before received_ts existed: its ts
        if i == 0 or line[i - 1] not in "{," or line.find("{", 1, i) != -1:
            return None
        j = i + len(key)
        k = j
        while k < len(line) and line[k] not in ",}":
            k += 1
        try:
            return float(line[j:k])
        except ValueError:
            return None
    return None


@dataclass
class LineStats:
    """What a pass over the log read and skipped (shared by every reader of the log)."""
    files: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # lines placed outside the span by the cheap prefilter (never parsed) and whole files not
    # written since before the span (never opened): both are not in the data asked for
    outside_span: int = 0
    old_files: int = 0

    def skip(self, why: str, where: str) -> None:
        self.skipped[why] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where} {why}")


# A file's mtime is when its last line was written; lines are written at (after) their arrival, so
# a file last written before the span holds no line of it. Slack for clock skew between the pods
# and the volume's server.
FILE_AGE_SLACK_S = 3600.0


SHADOW_PREFIX = "shadow-"


def _all_files(log_dir: str | Path | None) -> list[Path]:
    return sorted(Path(log_dir).rglob("*.jsonl")) if log_dir is not None and Path(log_dir).is_dir() else []


def log_files(log_dir: str | Path | None) -> list[Path]:
    """Response and feedback files: a shadow candidate's lines are answers nobody was shown, and
    read as responses they would count in an experiment's arms and in the drift window."""
    return [f for f in _all_files(log_dir) if not f.name.startswith(SHADOW_PREFIX)]


def shadow_files(log_dir: str | Path | None) -> list[Path]:
    return [f for f in _all_files(log_dir) if f.name.startswith(SHADOW_PREFIX)]


def iter_log(log_dir: str | Path | None, spans: dict[bool, tuple[float, float]], stats: LineStats,
             request_fields: tuple[str, ...] = REQUEST_FIELDS, skip_outside: bool = False):
    """Yield ``(is_feedback, record, when)`` for the valid lines whose arrival ``when`` lies in the
    span of their kind (``spans[False]`` responses by ``ts``, ``spans[True]`` feedback by
    ``received_ts``, else ``ts``); malformed lines are skipped and counted in ``stats``.

    ``skip_outside``: files last written before both spans are not opened, and complete lines in
    the writer's format whose arrival falls outside their span are dropped before the JSON parse
    (a torn or odd line is always parsed, so it is still counted)."""
    earliest = min(lo for lo, _ in spans.values())
    for path in log_files(log_dir):
        is_fb = path.name.startswith("feedback-")
        lo, hi = spans[is_fb]
        if skip_outside:
            try:
                old = path.stat().st_mtime < earliest - FILE_AGE_SLACK_S
            except FileNotFoundError:  # pruned by a serving pod since the listing
                continue
            if old:
                stats.old_files += 1
                continue
        fields = FEEDBACK_REQUIRED if is_fb else request_fields
        try:
            fh = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        stats.files += 1
        with fh:
            for n, line in enumerate(fh, 1):
                if skip_outside:
                    when = _prefilter_when(line, is_fb)
                    if when is not None and not lo <= when < hi:
                        stats.outside_span += 1
                        continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # a writer killed mid-line leaves a torn last line: skip it, count it
                    stats.skip("invalid JSON", f"{path.name}:{n}")
                    continue
                why = _check(rec, fields)
                if why:
                    stats.skip(why, f"{path.name}:{n}")
                    continue
                when = rec.get(RECEIVED, rec["ts"]) if is_fb else rec["ts"]
                try:
                    when = float(when)
                except (TypeError, ValueError):
                    stats.skip(f"field '{RECEIVED}' is not a number", f"{path.name}:{n}")
                    continue
                if lo <= when < hi:
                    yield is_fb, rec, when


def read_log(log_dir: str | Path | None, start: float = float("-inf"), end: float = float("inf"),
             request_fields: tuple[str, ...] = REQUEST_FIELDS) -> LogRead:
    """Response lines with ``start <= ts < end`` and feedback lines that arrived in that span
    (``received_ts``, else ``ts`` for lines written before it existed) from every ``*.jsonl`` under
    ``log_dir`` (rotated files and per-pod sub-directories included); a missing directory reads
    as empty (the caller reports it). Every line is held in memory: the A/B analysis reads a whole
    experiment. The drift check streams instead (redrec.drift.window)."""
    req, fb = [], []
    stats = LineStats()
    for is_fb, rec, when in iter_log(log_dir, {False: (start, end), True: (start, end)}, stats, request_fields):
        if is_fb:
            rec[RECEIVED] = when
        (fb if is_fb else req).append(rec)
    out = LogRead(pd.DataFrame(), pd.DataFrame(), stats.files, stats.skipped, stats.examples)
    out.requests = pd.DataFrame(req) if req else pd.DataFrame(columns=list(request_fields))
    out.feedback = pd.DataFrame(fb) if fb else pd.DataFrame(columns=[*FEEDBACK_FIELDS, RECEIVED])
    out.feedback[RECEIVED] = pd.to_numeric(out.feedback[RECEIVED]).astype("float64")
    if "request_id" not in out.feedback:
        out.feedback["request_id"] = None
    for df in (out.requests, out.feedback):
        df["ts"] = pd.to_numeric(df["ts"]).astype("float64")
        for c in ("user_id", "scenario", "request_id"):
            df[c] = df[c].where(df[c].isna(), df[c].astype(str)) if c == "request_id" else df[c].astype(str)
    return out


def _frame(df: pd.DataFrame, lr: LogRead) -> pd.DataFrame:
    df.attrs["torn_lines"] = int(lr.skipped.get("invalid JSON", 0))
    df.attrs["skipped_lines"] = lr.n_skipped
    return df


def read_serving_log(log_dir: str | Path) -> pd.DataFrame:
    """All response lines with every field the A/B analysis needs (others skipped and counted)."""
    d = Path(log_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"serving log dir {d} does not exist")
    lr = read_log(d, request_fields=RESPONSE_FIELDS)
    return _frame(lr.requests, lr)


def read_feedback(log_dir: str | Path) -> pd.DataFrame:
    d = Path(log_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"serving log dir {d} does not exist")
    lr = read_log(d)
    return _frame(lr.feedback, lr)
