"""The durable event log between ``/record_events`` and the online store.

An accepted event is never lost and never applied out of order for its user. Two logs, one
contract (``append`` returns once the log holds the events):

- ``embedded`` (laptop, tests, ``make run``): no server; ``append`` applies the events to Feast
  at once (``FeatureRepo.push_events``), so the next request sees them. Writers are the processes
  of one host, serialised by the repo's lock file.
- ``redis`` (Kubernetes): Redis Streams, already in the production stack as Feast's online store.
  Events are partitioned by user (``crc32(user_id) % partitions``, one stream per partition), so
  one partition holds every event of a user, in append order. ``append`` answers once ``XADD``
  has returned (durable as Redis's AOF is: ``appendfsync everysec`` loses at most a second on a
  power cut, ``always`` nothing). Ingest workers (``redrec.features.ingest``) lease partitions, so
  a user has one writer at a time, and apply each partition's entries in order through a consumer
  group, acknowledging only after the online write.

Why Redis Streams rather than Kafka or a Postgres table: the chart's online store is already a
Redis, consumer groups give at-least-once delivery with a pending list to reclaim a dead
worker's entries, and per-user order only needs a partition per key, not a global order.
"""

from __future__ import annotations

import os
import zlib
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from redrec.schema import EVENT_COLUMNS

class EventLogConfig(BaseModel):
    """The serving config's ``events:`` section (also read by ``redrec features ingest``).

    Environment overrides (the chart sets them from values and a Secret): ``REDREC_EVENTS_REDIS_URL``,
    ``REDREC_EVENTS_REDIS_USERNAME``, ``REDREC_EVENTS_REDIS_PASSWORD`` (never in the file)."""

    model_config = ConfigDict(extra="forbid")

    log: Literal["embedded", "redis"] = "embedded"
    redis_url: str = ""  # redis://host:6379/0 or rediss:// for TLS
    redis_username: str = ""  # the ACL user (docs/install-kubernetes.md)
    redis_password: str = Field("", repr=False, exclude=True)
    stream_prefix: str = Field("redrec:events", min_length=1, pattern=r"^[\w:.-]+$")
    # streams a user id hashes into; the most ingest workers that can share the work. Fixed for
    # the life of the log: changing it moves users between partitions (drain the log first)
    partitions: int = Field(16, ge=1, le=4096)
    # a ts further ahead of the server's clock than this is refused (400 naming ts): it would
    # sort after every real event of the user for good
    max_future_skew_s: float = Field(300.0, ge=0, le=86_400)
    append_timeout_s: float = Field(2.0, gt=0, le=60)
    # an ingest worker's partitions are its own while it renews them; a dead worker's are taken
    # over (and its unacknowledged entries reclaimed) this long after its last renewal
    lease_ttl_s: float = Field(10.0, gt=0, le=600)
    batch_size: int = Field(500, ge=1, le=100_000)
    # the exact popularity counters are copied to Feast at most this often: serving reads the
    # popularity table every serving.popularity_refresh_s (60 s), and a copy on every pass took a
    # fifth of an ingest worker's time at 1,000 events/s
    popularity_copy_s: float = Field(1.0, ge=0, le=600)
    block_ms: int = Field(200, ge=1, le=10_000)

    @model_validator(mode="after")
    def _env(self) -> "EventLogConfig":
        env = os.environ
        self.redis_url = env.get("REDREC_EVENTS_REDIS_URL") or self.redis_url
        self.redis_username = env.get("REDREC_EVENTS_REDIS_USERNAME") or self.redis_username
        self.redis_password = env.get("REDREC_EVENTS_REDIS_PASSWORD") or self.redis_password
        if self.log == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"events.redis_url {self.redis_url[:80]!r} must be redis://host:port/db (or rediss://) "
                             "with events.log: redis; set it or REDREC_EVENTS_REDIS_URL")
        return self

    # the key layout, in one place (the Redis ACL grants ~<stream_prefix>:*)
    def stream(self, partition: int) -> str:
        return f"{self.stream_prefix}:p{partition}"

    def key(self, name: str) -> str:
        return f"{self.stream_prefix}:{name}"

    def partition_of(self, user_id: str) -> int:
        return zlib.crc32(str(user_id).encode()) % self.partitions

    def client(self):
        import redis

        return redis.Redis.from_url(self.redis_url, username=self.redis_username or None,
                                    password=self.redis_password or None, socket_timeout=self.append_timeout_s,
                                    socket_connect_timeout=self.append_timeout_s, health_check_interval=30,
                                    decode_responses=True)


GROUP = "ingest"


class EmbeddedLog:
    """Applies at once: the log is the online store itself (one host)."""

    kind = "embedded"

    def __init__(self, repo):
        self.repo = repo

    def append(self, events: pd.DataFrame) -> dict:
        rep = self.repo.push_events(events)
        return {"accepted": rep.events, "skipped_duplicates": rep.skipped_duplicates}

    def ping(self) -> None:
        return None


class RedisStreamLog:
    """Appends to the user's partition stream; applied later by the ingest workers."""

    kind = "redis"

    def __init__(self, cfg: EventLogConfig, client=None):
        self.cfg = cfg
        self.r = client or cfg.client()

    def append(self, events: pd.DataFrame) -> dict:
        # one round trip for the whole call; a user's events keep their order within its stream
        pipe = self.r.pipeline(transaction=False)
        for e in events[list(EVENT_COLUMNS)].itertuples(index=False):
            pipe.xadd(self.cfg.stream(self.cfg.partition_of(e.user_id)),
                      {"u": e.user_id, "i": e.item_id, "s": e.scenario, "a": e.action, "t": int(e.ts)})
        pipe.execute()
        # duplicates are found when the events are applied (their windows are not read here)
        return {"accepted": len(events), "skipped_duplicates": 0}

    def ping(self) -> None:
        self.r.ping()


def open_log(cfg: EventLogConfig, repo):
    return RedisStreamLog(cfg) if cfg.log == "redis" else EmbeddedLog(repo)


def entries_frame(entries: list[tuple[str, dict]]) -> pd.DataFrame:
    """Stream entries ``[(id, fields)]`` as an events frame with their ids (``entry_id``)."""
    return pd.DataFrame({
        "entry_id": [eid for eid, _ in entries],
        "user_id": [f["u"] for _, f in entries], "item_id": [f["i"] for _, f in entries],
        "scenario": [f["s"] for _, f in entries], "action": [f["a"] for _, f in entries],
        "ts": [int(f["t"]) for _, f in entries],
    })
