"""Typed serving config: the chart's ``config.yaml`` (REDREC_CONFIG) plus ``feast.repo_path``,
with the release overlay (REDREC_RELEASE_OVERLAY) applied on top.

The release overlay is what the pipeline's deploy step and ``redrec release promote|rollback``
write on a cluster (the ConfigMap ``<fullname>-release``, which the chart never renders, so a
``helm upgrade`` cannot revert a promoted release): for each arm named there, the model version it
serves. Absent (a fresh install, or no overlay configured), the config's own versions serve. The
text a server reports as loaded (``/ops/release`` ``config.loaded_sha256``) is the overlay's when
there is one, else config.yaml's: a deployer waits for the SHA-256 of the text it wrote.

Environment variables set by the chart override the file (they carry the same values there, and
let a developer point a local config at other endpoints): ``REDREC_FEATURE_SERVER_URL``,
``REDREC_SERVING_LOG_DIR``, ``REDREC_MODEL_STORE``, ``MILVUS_URI``, ``MILVUS_TOKEN`` (the token is never in the file).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from redrec.experiments.assignment import ExperimentSpec
from redrec.features.eventlog import EventLogConfig


log = logging.getLogger(__name__)

RELEASE_OVERLAY_ENV = "REDREC_RELEASE_OVERLAY"


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServingLogConfig(_Strict):
    dir: str = "data/serving-log"
    per_pod_file: bool = True  # always true here: each process writes its own file
    fsync: bool = False  # fsync every line (power-loss safe) instead of write() only (process-crash safe)
    # a new file once the current one holds this much or is this old (0: never), and files not
    # written for retention_hours deleted at each rotation (0: kept); the drift job reads
    # drift.window_hours back, so retention must cover it (the chart refuses less)
    rotate_mb: float = Field(256.0, ge=0)
    rotate_minutes: float = Field(60.0, ge=0)
    retention_hours: float = Field(72.0, ge=0)

    def writer_args(self) -> dict:
        return {"fsync": self.fsync, "rotate_bytes": int(self.rotate_mb * 2**20), "rotate_s": self.rotate_minutes * 60,
                "retention_s": self.retention_hours * 3600}


class ServingSection(_Strict):
    max_k: int = Field(200, ge=1, le=10_000)
    port: int = Field(3000, ge=1, le=65535)
    feature_server_url: str = ""  # empty: open the embedded Feast repo (feast.repo_path) directly
    serving_log: ServingLogConfig = Field(default_factory=ServingLogConfig)
    max_user_id_len: int = Field(256, ge=1, le=4096)
    max_events_per_call: int = Field(1000, ge=1)
    max_context_bytes: int = Field(4096, ge=0)  # /recommend's context, logged verbatim with the response
    # Milvus or Feast down: "error" answers 503 with the reason; "popularity" serves the
    # scenario's popular items (flagged fallback=true in the response and the log)
    on_dependency_error: Literal["error", "popularity"] = "error"
    # a Feast read (history, popularity) not answered within this is an outage (fallback or 503)
    feast_timeout_s: float = Field(2.0, gt=0, le=60)
    # the whole catalogue's popularity and eligibility, read once as the server starts, before it
    # takes traffic: ML-1M's 3.9k items took 2.05 s cold on 2 idle cores, so under the per-request
    # deadline above every readiness probe started the read again and the reads starved each other
    # (a `make run` deploy waited 3 minutes); later refreshes keep the per-request deadline
    startup_catalogue_timeout_s: float = Field(60.0, gt=0, le=600)
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    # batches of one arm in flight at once, per worker: one waits on Feast or Milvus while the next
    # one computes. Keep workers x this near the cores: 2 workers x 2 batches on 2 cores stretched
    # every tower forward (100 clients: 666 rps, p99 358 ms; 2 x 1: 824 rps, p99 200 ms)
    batch_max_concurrent: int = Field(2, ge=1, le=16)
    # true: one Milvus search per scenario for a whole micro-batch (nq = its query vectors); false:
    # each request searches on its own, concurrently. Measured on 2 cores with Milvus Lite (ML-1M,
    # bench/results/serving.json): the batched search is slower there (Lite's cost is per hit, and
    # one big call serialises what concurrent calls overlap); a Milvus cluster may differ
    batch_search: bool = False
    popularity_refresh_s: float = Field(60.0, ge=1)
    log_user_embedding: bool = True
    # intra-op threads of the user tower, and of the BLAS behind numpy (the in-process exact
    # search's matrix products). 1 by default: the work per micro-batch is small, and more threads
    # oversubscribe the cores shared with the event loop, Feast and Milvus (on 2 shared cores, a
    # 32-user batch took 1.1 s with torch's default of 2 threads, 21 ms with 1; OpenBLAS left at 2
    # threads spent 21% of the server's samples in the search's product at 100 clients)
    torch_threads: int = Field(1, ge=0)  # 0: the libraries' defaults
    # server processes (BentoML workers), each with its own models, micro-batcher and Feast client.
    # One process is held to about one core by the GIL (2 idle cores, ML-1M, 100 clients: 1 worker
    # 416 rps at 113% CPU, 2 workers 586 rps at 164%, wrk on the same cores). With more than
    # one, a config reload reaches each within model_store.config_poll_s of the others;
    # /ops/release reports every worker of the pod (``config.pod_loaded_sha256``: the config all
    # of them serve), which is what a deployer waits on
    workers: int = Field(1, ge=1, le=64)
    # a request body over this is refused (413) before it is read in full or parsed. A full call
    # (max_events_per_call, 1000) of the largest events (user and item ids at max_user_id_len and
    # max_item_id_len, a 64-character action, a 128-character request_id) is 0.81 MB of JSON;
    # ML-1M-like events take 157 bytes each. 2 MiB holds the largest call 2.5 times (room for ids
    # escaped as \uXXXX) and a typical one 13 times (tests/test_auth.py computes both)
    max_body_bytes: int = Field(2 * 2**20, ge=1024)
    max_item_id_len: int = Field(256, ge=1, le=4096)  # item_id in /similar_items and /record_events
    # on SIGTERM a worker keeps answering this long before it stops: /readyz fails at once (no
    # new traffic) and every response asks the client to close its connection, so keep-alive
    # clients reconnect to another pod instead of meeting a closed socket; then in-flight requests
    # finish. The chart's preStop sleep comes first (the endpoints' removal reaching every node)
    drain_s: float = Field(5.0, ge=0, le=300)

    @field_validator("feature_server_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"serving.feature_server_url {v!r} must start with http:// or https://")
        return v


class MilvusSection(_Strict):
    uri: str = ""
    collection_alias: str = "redrec_items"
    token: str = Field("", repr=False)
    timeout_s: float = Field(5.0, gt=0)
    # a search reuses the collection the alias named up to this long ago (0: resolve it per search,
    # two more round trips to Milvus per request); a publication is served within this time
    alias_ttl_s: float = Field(1.0, ge=0)
    # a paired collection of at most this many items is read from Milvus once and then searched in
    # the server's process, exactly, for a whole micro-batch at once (0: every search goes to
    # Milvus). 100k items of dim 64 hold 26 MB; ML-1M's 3.7k are searched in well under a millisecond,
    # where a Milvus Lite round trip took 10 ms alone and most of the latency under load
    exact_search_max_items: int = Field(100_000, ge=0)


class ModelStoreSection(_Strict):
    # the model store the pipeline writes (a directory, the workspace PVC, s3://..., gs://...);
    # empty: models come from the BentoML model store (a bento that bundles its model)
    uri: str = ""
    cache_dir: str = ""  # a remote store's versions are fetched here (default $REDREC_CACHE/model-store)
    # serving re-reads its config file this often and loads the models a changed config names
    # (0: never; the chart's ConfigMap mount updates the file in place)
    config_poll_s: float = Field(5.0, ge=0)


class FeastSection(_Strict):
    # the embedded repo (FeatureRepo data dir); with a feature server, only for its registry file.
    # No relative default: a relative directory breaks a read-only root filesystem
    repo_path: str = ""
    # registry for the remote (feature-server) mode; empty: <repo_path>/feast_registry.db. With
    # registry_type sql, a SQLAlchemy URL whose ${VARS} (the password) come from the environment
    registry: str = ""
    registry_type: Literal["file", "sql"] = "file"
    project: str = "redrec"


class AuthSection(_Strict):
    enabled: bool = False  # the chart turns it on; embedded `make run` stays open on 127.0.0.1
    # bearer tokens, one a line (blank lines and # comments skipped), re-read when the file changes
    # (a mounted Secret is updated in place); env REDREC_API_TOKENS_FILE overrides, and tokens in env
    # REDREC_API_TOKENS (comma separated) are accepted as well
    tokens_file: str = ""
    read_routes: bool = False  # /recommend and /similar_items need a token too


class ShadowSpec(_Strict):
    """``shadow`` section: a candidate model scores a mirrored share of live requests off the
    request path (``redrec.serving.shadow``); its answers go to the shadow log, never to a user.
    Reloaded in place like ``experiment``."""

    model_version: str = Field(min_length=1, max_length=128)
    index_alias: str = Field("", max_length=200)  # empty: milvus.collection_alias (the candidate's own collection
    # is searched while the alias names another model's: redrec.index.search.paired_collection)
    # requests mirrored, chosen by a hash of request_id (the same on every replica)
    share: float = Field(0.1, gt=0, le=1)
    # mirrored requests queued for the candidate at most; beyond it the mirror is dropped (counted):
    # shadow work must never grow into the served requests' memory or CPU
    max_in_flight: int = Field(64, ge=1, le=100_000)
    # a mirrored request not scored within this of its response (queue wait included) is dropped,
    # and it bounds the candidate's index search
    timeout_s: float = Field(2.0, gt=0, le=60)
    # mirrored requests scored in one user-tower forward at most, and how long the first of them
    # waits for others to share it (must stay well under timeout_s)
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_wait_ms: float = Field(250.0, ge=0, le=10_000)


class ServingConfig(_Strict):
    scenarios: list[str] = Field(min_length=1)
    log_level: str = "INFO"
    experiment: ExperimentSpec
    shadow: ShadowSpec | None = None  # no candidate in shadow
    serving: ServingSection = Field(default_factory=ServingSection)
    milvus: MilvusSection = Field(default_factory=MilvusSection)
    feast: FeastSection = Field(default_factory=FeastSection)
    model_store: ModelStoreSection = Field(default_factory=ModelStoreSection)
    drift: dict[str, Any] = Field(default_factory=dict)  # read by the drift monitor, not by serving
    events: EventLogConfig = Field(default_factory=EventLogConfig)
    auth: AuthSection = Field(default_factory=AuthSection)

    @field_validator("scenarios")
    @classmethod
    def _scen(cls, v: list[str]) -> list[str]:
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"scenarios: duplicate(s) {dup}")
        return [str(s) for s in v]

    @model_validator(mode="after")
    def _env(self) -> "ServingConfig":
        env = os.environ
        if env.get("REDREC_FEATURE_SERVER_URL") is not None:
            self.serving.feature_server_url = ServingSection._url(env["REDREC_FEATURE_SERVER_URL"])
        if env.get("REDREC_SERVING_LOG_DIR"):
            self.serving.serving_log.dir = env["REDREC_SERVING_LOG_DIR"]
        if env.get("REDREC_MODEL_STORE"):
            self.model_store.uri = env["REDREC_MODEL_STORE"]
        if env.get("MILVUS_URI"):
            self.milvus.uri = env["MILVUS_URI"]
        if env.get("MILVUS_TOKEN"):
            self.milvus.token = env["MILVUS_TOKEN"]
        if env.get("REDREC_API_TOKENS_FILE"):
            self.auth.tokens_file = env["REDREC_API_TOKENS_FILE"]
        if not self.milvus.uri:
            raise ValueError("milvus.uri is empty: set it in the config or MILVUS_URI")
        return self

    def check_shadow_version(self, known: set[str] | list[str], where: str) -> None:
        if self.shadow is not None and self.shadow.model_version not in set(known):
            raise ValueError(f"shadow.model_version: unknown version {self.shadow.model_version!r} in {where}; "
                             f"known: {sorted(known)} (`redrec release list` shows them; `redrec release shadow --off` "
                             "turns the shadow off)")

    def shadow_alias(self) -> str:
        return (self.shadow.index_alias if self.shadow else "") or self.milvus.collection_alias

    def alias_for(self, arm_name: str) -> str:
        arm = next(a for a in self.experiment.arms if a.name == arm_name)
        return arm.index_alias or self.milvus.collection_alias

    @classmethod
    def from_yaml(cls, path: str | Path, overlay: str | Path | None = None) -> "ServingConfig":
        """``path`` with the release overlay applied (``overlay``, default $REDREC_RELEASE_OVERLAY)."""
        if not Path(path).is_file():
            raise ConfigError(f"serving config {path} does not exist (set REDREC_CONFIG to the config.yaml)")
        return cls.from_source(read_config_source(path, overlay))

    @classmethod
    def from_source(cls, src: "ConfigSource") -> "ServingConfig":
        raw = _parse_yaml(src.text, src.path)
        if src.overlay_text is not None:
            raw = apply_overlay(raw, ReleaseOverlay.parse(src.overlay_text, src.overlay_path))
        return cls.from_dict(raw, source=src.path + (f" + {src.overlay_path}" if src.overlay_text is not None else ""))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ServingConfig":
        return _validated(cls, raw, source, "serving config")

    @classmethod
    def from_env(cls) -> "ServingConfig":
        path = os.environ.get("REDREC_CONFIG")
        if not path:
            raise ConfigError("REDREC_CONFIG is not set: point it at the serving config.yaml")
        return cls.from_yaml(path)


class IngestConfig(BaseModel):
    """What ``redrec features ingest`` reads of the serving config file (the chart mounts the same
    ConfigMap in both): the scenarios, how to reach Feast, and the event log."""

    model_config = ConfigDict(extra="ignore")

    scenarios: list[str] = Field(min_length=1)
    serving: ServingSection = Field(default_factory=ServingSection)
    feast: FeastSection = Field(default_factory=FeastSection)
    events: EventLogConfig = Field(default_factory=EventLogConfig)

    @model_validator(mode="after")
    def _env(self) -> "IngestConfig":
        if os.environ.get("REDREC_FEATURE_SERVER_URL") is not None:
            self.serving.feature_server_url = ServingSection._url(os.environ["REDREC_FEATURE_SERVER_URL"])
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "IngestConfig":
        p, raw = _read_yaml(path, "config", "pass --config or set REDREC_CONFIG to the serving config.yaml")
        return _validated(cls, raw, str(p), "ingest config")


class ReleaseOverlay(_Strict):
    """The release overlay file: ``arms`` maps an arm name to the model version it serves;
    ``release`` says who wrote it (run, time, previous version), for people and ``/ops/release``;
    ``shadow`` (absent: config.yaml's) replaces config.yaml's shadow section, ``{}`` turns it off."""

    arms: dict[str, str] = Field(min_length=1)
    release: dict[str, Any] = Field(default_factory=dict)
    shadow: dict[str, Any] | None = None

    @field_validator("shadow")
    @classmethod
    def _shadow(cls, v: dict | None) -> dict | None:
        if v:
            ShadowSpec.model_validate(v)  # refused here, by the writer, naming the field
        return v

    @classmethod
    def parse(cls, text: str, source: str | None = "release overlay") -> "ReleaseOverlay":
        return _validated(cls, _parse_yaml(text, source or "release overlay"), source or "release overlay",
                          "release overlay")

    def dump(self) -> str:
        out = self.model_dump()
        if out["shadow"] is None:  # an overlay without a shadow reads (and hashes) as it did before shadows
            del out["shadow"]
        return yaml.safe_dump(out, sort_keys=True)


def apply_overlay(raw: dict, overlay: ReleaseOverlay) -> dict:
    """``raw`` (config.yaml) with the overlay's model versions on its arms. An arm the overlay
    names that config.yaml no longer has (renamed by a helm upgrade) is ignored, and logged."""
    arms = ((raw.get("experiment") or {}).get("arms")) or []
    names = {a.get("name") for a in arms if isinstance(a, dict)}
    unknown = sorted(set(overlay.arms) - names)
    if unknown:
        log.warning("release overlay names arm(s) %s that the config does not have (it has %s): ignored",
                    unknown, sorted(n for n in names if n))
    for a in arms:
        if isinstance(a, dict) and a.get("name") in overlay.arms:
            a["model_version"] = overlay.arms[a["name"]]
    if overlay.shadow is not None:
        raw["shadow"] = overlay.shadow or None
    return raw


@dataclass(frozen=True)
class ConfigSource:
    """The texts a server's config is made of; equal sources load the same config."""

    path: str
    text: str
    overlay_path: str | None = None
    overlay_text: str | None = None  # None: no overlay file (not configured, or not written yet)

    @property
    def served_text(self) -> str:
        """The text whose SHA-256 the server reports as loaded: what a deployer wrote last."""
        return self.overlay_text if self.overlay_text is not None else self.text

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.served_text.encode()).hexdigest()


def read_config_source(path: str | Path, overlay: str | Path | None = None) -> ConfigSource:
    """Read config.yaml and the overlay (``overlay``, default $REDREC_RELEASE_OVERLAY; a missing
    overlay file is no overlay: the ConfigMap behind it is optional). Raises OSError."""
    text = Path(path).read_text()
    ov = str(overlay) if overlay is not None else os.environ.get(RELEASE_OVERLAY_ENV, "")
    ov_text = None
    if ov:
        try:
            ov_text = Path(ov).read_text()
        except FileNotFoundError:
            ov_text = None
    return ConfigSource(str(path), text, ov or None, ov_text)


def _parse_yaml(text: str, source: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _read_yaml(path: str | Path, what: str, fix: str) -> tuple[Path, dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist ({fix})")
    try:
        return p, yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def _validated(cls, raw: dict, source: str, what: str):
    """The model, or a ConfigError listing every bad field by its dotted path."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{source}: invalid {what}:\n" + "\n".join(lines)) from None
