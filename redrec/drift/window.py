"""The drift check's view of the serving log: one streaming pass, memory bounded by caps.

The log of a busy window does not fit in the check's memory as records (the A/B reader holds
every line as a dict, ~5 KB a response). This reader keeps only the columns the checks use, and
above the caps of ``SamplingConfig`` a seeded hash sample of them:

* behaviour events (feedback lines, window and lookback margin) as typed columns, sampled by
  user: a user is kept for scenario ``s`` while ``hash(user) < limit[s]``; a kept user keeps all
  their events, every scenario, so ``seq_len`` is counted exactly. Each item's first appearance
  is tracked over every line (not only the sample), so ``item_age_rank`` is exact too.
* responses in the window, sampled by request id per scenario, with the feedback lines that
  answer them (same hash), so the online hit rate joins on the sample. Feedback files sort (and
  are read) before the responses, so the answers have a cap of their own that lowers the same
  limit.

A limit halves whenever its scenario's kept rows pass the cap, and the rows above it are dropped.
Whatever the order the lines arrive in, the result is every key hashing under the largest
power-of-two fraction whose rows fit the cap: reruns with the same seed keep the same sample.
Below the caps every limit stays full and the window is the one the full reader returns.
"""

from __future__ import annotations

import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from redrec.drift.config import SamplingConfig
from redrec.experiments.log import RECEIVED, LineStats, iter_log

FULL = 1 << 32  # a limit every crc32 is under: nothing sampled
# optional response fields the checks read; a column exists only where some line had the key,
# as in the full reader (the checks tell "the log omits it" from "it is empty")
OPTIONAL = ("arm", "model_version", "cold_start", "fallback", "history_len", "user_embedding")


def _salt(seed: int) -> int:
    return zlib.crc32(f"redrec-drift-sample:{seed}".encode())


def _hash(key: str, salt: int) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass"), salt)


def _vector(x):
    """A logged embedding as float64 (8 bytes a value instead of a 24-byte float object); what
    is not numeric stays as logged, for the embedding check to report."""
    if x is None:
        return None
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return x


class _Codes:
    """Strings interned to dense int codes."""

    def __init__(self):
        self.code: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, s: str) -> int:
        c = self.code.get(s)
        if c is None:
            c = self.code[s] = len(self.names)
            self.names.append(s)
        return c


class _EventStore:
    """Kept behaviour events as typed columns (~30 bytes an event)."""

    COLS = {"user": "I", "item": "I", "scenario": "H", "action": "H", "ts": "q", "in_window": "B", "h": "I"}

    def __init__(self):
        for name, code in self.COLS.items():
            setattr(self, name, array(code))
        self.users = _Codes()

    def __len__(self) -> int:
        return len(self.h)

    def append(self, user: str, item: int, scenario: int, action: int, ts: int, in_window: bool, h: int) -> None:
        self.user.append(self.users(user))
        self.item.append(item)
        self.scenario.append(scenario)
        self.action.append(action)
        self.ts.append(ts)
        self.in_window.append(in_window)
        self.h.append(h)

    def np(self, name: str) -> np.ndarray:
        return np.frombuffer(getattr(self, name), dtype=getattr(self, name).typecode) if len(self) else np.zeros(0, getattr(self, name).typecode)

    def keep(self, mask: np.ndarray) -> None:
        cols = {name: self.np(name)[mask] for name in self.COLS}
        # re-code the users still kept, so the name table shrinks with the rows
        used, inverse = np.unique(cols["user"], return_inverse=True)
        names = [self.users.names[u] for u in used]
        self.users = _Codes()
        for n in names:
            self.users(n)
        cols["user"] = inverse.astype(np.uint32)
        for name, code in self.COLS.items():
            setattr(self, name, array(code, cols[name].astype(np.dtype(code)).tobytes()))


@dataclass
class Window:
    """What the checks read of the serving log for one window."""
    requests: pd.DataFrame  # responses in the window (sampled per scenario above the cap)
    feedback: pd.DataFrame  # in-window feedback answering those responses: request_id, item_id, action, scenario
    events: pd.DataFrame  # behaviour events of the sampled users, window and margin: EVENT_COLUMNS + in_window
    first_seen: pd.Series  # item_id -> first event ts over every feedback line read (not only the sample)
    stats: LineStats
    n_requests: int  # every in-window response line, all scenarios
    n_feedback: int  # every in-window feedback line
    sampling: dict  # per scenario: seen / kept and the fraction; caps, seed, peaks
    _limits: dict = field(repr=False, default_factory=dict)
    _salt: int = 0

    def problems(self) -> list[str]:
        if not self.stats.skipped:
            return []
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.stats.skipped.items()))
        return [f"serving log: skipped malformed lines ({reasons}); first: " + "; ".join(self.stats.examples[:3])]

    def sampled_users(self, users: pd.Series, scenarios: pd.Series) -> np.ndarray:
        """Whether each (user, scenario) row belongs to the user sample (all True unsampled)."""
        if not self._limits or all(v >= FULL for v in self._limits.values()):
            return np.ones(len(users), dtype=bool)
        codes, uniq = pd.factorize(users.astype(str))
        h = np.array([_hash(u, self._salt) for u in uniq], dtype=np.uint64)[codes]
        lim = scenarios.astype(str).map(self._limits).fillna(FULL).to_numpy(dtype=np.uint64)
        return h < lim


class WindowReader:
    """Feed it the log's lines (``read``); ``window()`` builds the frames at the end."""

    def __init__(self, scenarios: list[str], start: float, caps: SamplingConfig, seed: int = 0, keep_top: int | None = None):
        self.start, self.caps, self.seed, self.keep_top = start, caps, seed, keep_top
        self.salt = _salt(seed)
        self.scen = _Codes()
        self.configured = [self.scen(s) for s in scenarios]
        self.items, self.actions = _Codes(), _Codes()
        self.first = array("q")  # per item code: first event ts
        self.store = _EventStore()
        self.ev_limit = {s: FULL for s in self.configured}
        self.hist_limit = FULL
        self.ev_kept = Counter()  # in-window events kept per scenario (hash under its limit)
        self.ev_seen = Counter()
        self.req_limit = {s: FULL for s in self.configured}
        self.req_rows: dict[int, list] = {s: [] for s in self.configured}
        self.req_seen = Counter()
        self.hits: dict[int, list] = {s: [] for s in self.configured}
        self.present: set[str] = set()
        self.n_requests = self.n_feedback = self.seq = 0
        self.peak_events = self.peak_requests = self.peak_answers = 0

    # ---- limits ---------------------------------------------------------------------------------
    def _lim(self, s: int) -> int:
        return min(self.ev_limit[s], self.hist_limit)

    def _store_limit(self) -> int:
        return max(self._lim(s) for s in self.configured)

    def _recount(self) -> None:
        sc, h, inw = self.store.np("scenario"), self.store.np("h"), self.store.np("in_window").astype(bool)
        for s in self.configured:
            self.ev_kept[s] = int(((sc == s) & inw & (h < self._lim(s))).sum())

    def _shrink_events(self) -> None:
        changed = False
        while len(self.store) > self.caps.max_history_events:
            self.hist_limit = self._store_limit() // 2
            self._prune_store()
            changed = True
        for s in self.configured:
            while self.ev_kept[s] > self.caps.max_events_per_scenario:
                self.ev_limit[s] = self._lim(s) // 2
                self._recount()
                changed = True
        if changed:
            self._prune_store()

    def _prune_store(self) -> None:
        self.store.keep(self.store.np("h") < self._store_limit())
        self._recount()

    def _shrink_requests(self, s: int) -> None:
        while len(self.req_rows[s]) > self.caps.max_requests_per_scenario or len(self.hits[s]) > self.caps.max_answers_per_scenario:
            lim = self.req_limit[s] = self.req_limit[s] // 2
            self.req_rows[s] = [r for r in self.req_rows[s] if r[0] < lim]
            self.hits[s] = [r for r in self.hits[s] if r[0] < lim]

    # ---- lines ----------------------------------------------------------------------------------
    def add_feedback(self, rec: dict, when: float) -> None:
        scenario, user = str(rec["scenario"]), str(rec["user_id"])
        item, action, ts = self.items(str(rec["item_id"])), self.actions(str(rec["action"])), int(float(rec["ts"]))
        s = self.scen(scenario)
        if item == len(self.first):
            self.first.append(ts)
        elif ts < self.first[item]:
            self.first[item] = ts
        in_window = when >= self.start
        configured = s in self.ev_limit
        if in_window:
            self.n_feedback += 1
            if configured:
                self.ev_seen[s] += 1
                rid = rec.get("request_id")
                if rid is not None:
                    rid = str(rid)
                    hr = _hash(rid, self.salt)
                    if hr < self.req_limit[s]:
                        self.hits[s].append((hr, rid, self.items.names[item], self.actions.names[action]))
                        if len(self.hits[s]) > self.caps.max_answers_per_scenario:
                            self._shrink_requests(s)
                        self.peak_answers = max(self.peak_answers, sum(len(h) for h in self.hits.values()))
        h = _hash(user, self.salt)
        if h >= self._store_limit():
            return
        self.store.append(user, item, s, action, ts, in_window, h)
        if in_window and configured and h < self._lim(s):
            self.ev_kept[s] += 1
            if self.ev_kept[s] > self.caps.max_events_per_scenario:
                self._shrink_events()
        if len(self.store) > self.caps.max_history_events:
            self._shrink_events()
        self.peak_events = max(self.peak_events, len(self.store))

    def add_response(self, rec: dict) -> None:
        self.n_requests += 1
        s = self.scen.code.get(str(rec["scenario"]))
        if s not in self.req_limit:
            return  # not a judged scenario: counted, not kept
        self.req_seen[s] += 1
        rid = str(rec["request_id"])
        hr = _hash(rid, self.salt)
        if hr >= self.req_limit[s]:
            return
        k = self.keep_top
        row = {"request_id": rid, "ts": float(rec["ts"]), "user_id": str(rec["user_id"]), "scenario": self.scen.names[s],
               "items": rec["items"][:k], "scores": rec["scores"][:k]}
        for f in OPTIONAL:
            if f in rec:
                self.present.add(f)
                row[f] = _vector(rec[f]) if f == "user_embedding" else rec[f]
        self.req_rows[s].append((hr, self.seq, row))
        self.seq += 1
        if len(self.req_rows[s]) > self.caps.max_requests_per_scenario:
            self._shrink_requests(s)
        self.peak_requests = max(self.peak_requests, sum(len(r) for r in self.req_rows.values()))

    def read(self, log_dir: str | Path | None, margin_start: float, end: float, stats: LineStats) -> None:
        spans = {False: (self.start, end), True: (margin_start, end)}
        for is_fb, rec, when in iter_log(log_dir, spans, stats, skip_outside=True):
            if is_fb:
                self.add_feedback(rec, when)
            else:
                self.add_response(rec)

    # ---- result ---------------------------------------------------------------------------------
    def window(self, stats: LineStats) -> Window:
        rows = sorted((r for rs in self.req_rows.values() for r in rs), key=lambda r: r[1])
        cols = ["request_id", "ts", "user_id", "scenario", "items", "scores", *[f for f in OPTIONAL if f in self.present]]
        requests = pd.DataFrame([r[2] for r in rows], columns=cols)
        requests["ts"] = requests["ts"].astype("float64")
        hits = [(rid, item, action, self.scen.names[s]) for s, hs in self.hits.items() for _, rid, item, action in hs]
        feedback = pd.DataFrame(hits, columns=["request_id", "item_id", "action", "scenario"])
        st = self.store
        events = pd.DataFrame({
            "user_id": np.asarray(st.users.names, dtype=object)[st.np("user")] if len(st) else np.zeros(0, object),
            "item_id": np.asarray(self.items.names, dtype=object)[st.np("item")] if len(st) else np.zeros(0, object),
            "scenario": np.asarray(self.scen.names, dtype=object)[st.np("scenario")] if len(st) else np.zeros(0, object),
            "action": np.asarray(self.actions.names, dtype=object)[st.np("action")] if len(st) else np.zeros(0, object),
            "ts": st.np("ts").astype(np.int64),
            "in_window": st.np("in_window").astype(bool),
        })
        first = pd.Series(np.frombuffer(self.first, dtype=np.int64) if len(self.first) else np.zeros(0, np.int64),
                          index=pd.Index(self.items.names, dtype=object), dtype="int64")
        scen = {}
        for s in self.configured:
            name = self.scen.names[s]
            scen[name] = {
                "events_seen": int(self.ev_seen[s]), "events_kept": int(self.ev_kept[s]), "events_fraction": self._lim(s) / FULL,
                "requests_seen": int(self.req_seen[s]), "requests_used": len(self.req_rows[s]), "requests_fraction": self.req_limit[s] / FULL,
            }
        sampled = any(v["events_fraction"] < 1 or v["requests_fraction"] < 1 for v in scen.values())
        sampling = {"sampled": sampled, "seed": self.seed, "caps": self.caps.model_dump(), "scenarios": scen,
                    "kept_events": len(st), "peak_kept_events": self.peak_events, "peak_kept_requests": self.peak_requests,
                    "peak_kept_answers": self.peak_answers}
        limits = {self.scen.names[s]: self._lim(s) for s in self.configured}
        return Window(requests, feedback, events, first, stats, self.n_requests, self.n_feedback, sampling, limits, self.salt)


def read_window(log_dir: str | Path | None, scenarios: list[str], start: float, end: float, margin_start: float,
                caps: SamplingConfig | None = None, seed: int = 0, keep_top: int | None = None) -> Window:
    """Responses with ``start <= ts < end``; feedback that arrived in ``[margin_start, end)``
    (the margin gives sequence lengths their lookback); ``keep_top``: items and scores kept per
    response (the largest k a check reads; None: all)."""
    reader = WindowReader(scenarios, start, caps or SamplingConfig(), seed, keep_top)
    stats = LineStats()
    reader.read(log_dir, margin_start, end, stats)
    return reader.window(stats)
