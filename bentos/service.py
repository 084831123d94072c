"""The RED-Rec BentoML service: routes, typed I/O and status codes over ``redrec.serving.engine``.

Config: the YAML at ``$REDREC_CONFIG`` (the chart mounts it at /etc/redrec/config.yaml).
Errors: bad input -> 4xx with ``{"error", "field"}``; Milvus/Feast down -> 503 with the reason
(or the popularity fallback when ``serving.on_dependency_error: popularity``); the process keeps
running. ``/readyz`` fails until the models, the index aliases and the popularity table are loaded.
Auth (``auth.*``): the write and ops routes need a bearer token, the read routes too with
``auth.read_routes`` (``redrec.serving.auth``); a body over ``serving.max_body_bytes`` is a 413
before it is parsed (``redrec.serving.limits``).
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Annotated, Any, Literal, Optional

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from redrec.serving.auth import BearerAuth, needs_token, require_tokens  # noqa: E402
from redrec.serving.config import AuthSection, ServingConfig, ServingSection  # noqa: E402
from redrec.serving.drain import CloseWhileDraining, Drain  # noqa: E402
from redrec.serving.engine import Engine, ServingError  # noqa: E402
from redrec.serving.http import ErrorContract, ReadyzReason  # noqa: E402
from redrec.serving.limits import BodyLimit  # noqa: E402

log = logging.getLogger("redrec.serving")


def _contract() -> tuple[tuple[str, ...], int, int, int]:
    """The scenarios and the largest k of the config the process starts with, for the request
    types (and so the OpenAPI document): a generated client knows the valid values. The engine
    still checks both against the config it serves (a reload may change them). Also the number
    of worker processes, which BentoML takes at import."""
    try:
        cfg = ServingConfig.from_env()
        return tuple(cfg.scenarios), cfg.serving.max_k, cfg.serving.max_user_id_len, cfg.serving.workers
    except Exception:  # no config yet (a bento build, docs): plain types; __init__ reports the error
        return (), 10_000, 4096, 1


def _limits() -> tuple[int, int, AuthSection]:
    """The bounds on item ids and bodies and the auth settings the process starts with (auth.* and
    these are read once: a change needs a restart; the tokens file is re-read as it changes)."""
    try:
        cfg = ServingConfig.from_env()
    except Exception:  # no config: __init__ refuses to start anyway; fail closed meanwhile
        return ServingSection().max_item_id_len, ServingSection().max_body_bytes, AuthSection(enabled=True)
    # auth on and no token: refuse to start rather than lock every client out. Here, at import,
    # not in __init__: `bentoml serve` imports the service before it starts any worker and exits
    # on an error there, where a worker failing its start is only restarted, forever
    require_tokens(cfg.auth)
    return cfg.serving.max_item_id_len, cfg.serving.max_body_bytes, cfg.auth


SCENARIOS, MAX_K, MAX_USER_ID, WORKERS = _contract()
MAX_ITEM_ID, MAX_BODY, AUTH = _limits()
MAX_ACTION = 64  # actions are the model's small vocabulary (click, like, ...): anything longer is a typo or abuse
Scenario = Literal[SCENARIOS] if SCENARIOS else Annotated[str, Field(max_length=256)]  # type: ignore[valid-type]
# a user id: not blank (the pattern needs one non-space character), bounded as the config says
UserId = Annotated[str, Field(min_length=1, max_length=MAX_USER_ID, pattern=r"\S")]
# OpenAPI 3.0 spells "or null" as nullable: BentoML's schema drops pydantic's anyOf-null
NULLABLE = {"nullable": True}

# what answered each request, for the fallback-rate alert (the chart's PrometheusRule):
# model, cold_start, fallback or holdout
RESPONSES = bentoml.metrics.Counter(name="redrec_responses", documentation="recommendations by what ranked them",
                                    labelnames=["scenario", "kind"])
# log lines the disk refused (full volume, I/O error): the response was still sent, the line lost
LOG_FAILURES = bentoml.metrics.Counter(name="redrec_log_write_failures",
                                       documentation="serving/feedback log lines not written (the responses were served)",
                                       labelnames=["log"])
# mirrored requests a shadow candidate scored, failed on or dropped (redrec.serving.shadow): none reached a caller
SHADOW = bentoml.metrics.Counter(name="redrec_shadow_requests", documentation="requests mirrored to the shadow candidate, "
                                 "by outcome (mirrored, scored, error, dropped, log_failed)", labelnames=["outcome"])
# this worker's engine, for the middlewares (added to the class before any instance exists)
_ENGINE: dict[str, Engine] = {}


def _draining() -> bool:
    e = _ENGINE.get("engine")
    return e is not None and e.draining is not None and e.draining.active


def _readiness() -> str | None:
    e = _ENGINE.get("engine")
    return e.ready()[1] if e is not None else None


def _kind(r: dict) -> str:
    if r.get("fallback"):
        return "fallback"
    if r.get("cold_start"):
        return "cold_start"
    return "holdout" if r.get("arm") == "holdout" else "model"


class Recommendation(BaseModel):
    request_id: str
    experiment: str
    user_id: str
    scenario: str
    arm: str = Field(description="experiment arm, or 'holdout'")
    model_version: str = Field(description="model that ranked the items ('popularity' for holdout/fallback)")
    index_version: Optional[str] = Field(None, json_schema_extra=NULLABLE, description="model version recorded by the index collection searched "
                                         "(always model_version; null when no index was searched)")
    items: list[str]
    scores: list[float]
    cold_start: bool = Field(description="no usable history: the scenario's popular items")
    fallback: bool = Field(description="a dependency was down: popularity served instead")


class SimilarItems(BaseModel):
    item_id: str
    scenario: str
    model_version: str
    index_version: str
    items: list[str]
    scores: list[float]


ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID)]


class Event(BaseModel):
    user_id: UserId
    item_id: ItemId
    scenario: Scenario
    action: Annotated[str, Field(min_length=1, max_length=MAX_ACTION)]
    # bounded: a ts in the far future is bad input (400), not a store outage, and never wraps int64
    ts: Optional[int] = Field(None, ge=0, le=253402300799, json_schema_extra=NULLABLE,
                              description="unix seconds (up to year 9999); default: now")
    request_id: Optional[str] = Field(None, max_length=128, json_schema_extra=NULLABLE,
                                      description="the response this event reacts to")


class Recorded(BaseModel):
    accepted: int
    skipped_duplicates: int


def _error(e: ServingError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


ops = FastAPI(title="redrec operations")


@bentoml.service(name="redrec", workers=WORKERS, traffic={"timeout": 30, "max_concurrency": 512})
@bentoml.asgi_app(ops, path="/ops")
class RedRec:
    def __init__(self) -> None:
        self.cfg = ServingConfig.from_env()
        logging.getLogger("redrec").setLevel(self.cfg.log_level.upper())
        self.engine = Engine(self.cfg, config_path=os.environ["REDREC_CONFIG"])
        self.engine.logs.on_failure = lambda kind: LOG_FAILURES.labels(log=kind).inc()
        self.engine.shadow.on_event = lambda outcome: SHADOW.labels(outcome=outcome).inc()
        # built inside uvicorn's startup, after it took SIGTERM: the drain goes in front of it
        drain = Drain(self.cfg.serving.drain_s)
        if drain.install():
            self.engine.draining = drain
        _ENGINE["engine"] = self.engine
        # the collector's full passes walked the libraries' objects loaded above (torch, Feast,
        # pydantic) again and again, stalling whole micro-batches: frozen out of its reach, the p99
        # at 100 clients went from 545 to 310 ms, and young collections 30x rarer took the
        # throughput from 654 to 685 rps (2 workers, 2 idle cores, ML-1M)
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)

    def __is_ready__(self) -> bool:
        ok, why = self.engine.ready()
        if not ok:
            log.warning("not ready: %s", why)
            raise HTTPException(status_code=503, detail=f"not ready: {why}")  # the probe's body says why
        return ok

    @ops.get("/release")
    def release(self) -> dict:
        """GET /ops/release: per arm, the (model, index) pair served and what the alias names; the config reload state."""
        return self.engine.release_status()

    @bentoml.api(route="/recommend")
    async def recommend(
        self,
        user_id: UserId,
        scenario: Scenario,
        k: Annotated[int, Field(ge=1, le=MAX_K, strict=True)] = 10,
        exclude_seen: Annotated[bool, Field(strict=True)] = True,
        context: Annotated[Optional[dict[str, Any]], Field(json_schema_extra=NULLABLE,
                                                            description="logged with the response; finite JSON, at most "
                                                                        "serving.max_context_bytes")] = None,
    ) -> Recommendation:
        """Top-k items for a user in one scenario, read from their behaviour in every scenario."""
        try:
            out = await self.engine.recommend(user_id, scenario, k, exclude_seen, context)
        except ServingError as e:
            return _error(e)
        RESPONSES.labels(scenario=out["scenario"], kind=_kind(out)).inc()
        return Recommendation(**out)

    @bentoml.api(route="/similar_items")
    async def similar_items(
        self,
        item_id: ItemId,
        scenario: Scenario,
        k: Annotated[int, Field(ge=1, le=MAX_K, strict=True)] = 10,
        user_id: Annotated[Optional[UserId], Field(json_schema_extra=NULLABLE)] = None,
    ) -> SimilarItems:
        """Items eligible in the scenario closest to ``item_id`` (the arm of ``user_id``, else control)."""
        try:
            return SimilarItems(**await self.engine.similar_items(item_id, scenario, k, user_id))
        except ServingError as e:
            return _error(e)

    @bentoml.api(route="/record_events")
    async def record_events(self, events: list[Event]) -> Recorded:
        """Push fresh behaviour to Feast (the next request sees it) and log it as feedback."""
        try:
            return Recorded(**await self.engine.record_events([e.model_dump() for e in events]))
        except ServingError as e:
            return _error(e)

    @bentoml.api(route="/batching_stats")
    def batching_stats(self) -> dict:
        """Micro-batching counters per arm (batches, items, largest, mean size)."""
        return self.engine.stats()


API_ROUTES = ("/recommend", "/similar_items", "/record_events", "/batching_stats")
# outermost first: while draining every response says Connection: close; /readyz's 200 says why
# it is ready (degraded or not); a request without a valid token is refused before anything else, then a body
# over the cap before any of it is parsed; then one error contract on the API routes: JSON bodies
# only (415), BentoML's validation errors as {error, field}, and the OpenAPI document declaring
# exactly that, the bearer scheme included
RedRec.add_asgi_middleware(CloseWhileDraining, draining=_draining)
RedRec.add_asgi_middleware(ReadyzReason, reason=_readiness)
RedRec.add_asgi_middleware(BearerAuth, auth=AUTH)
RedRec.add_asgi_middleware(BodyLimit, max_bytes=MAX_BODY)
RedRec.add_asgi_middleware(ErrorContract, routes=API_ROUTES,
                           secured=lambda path: AUTH.enabled and needs_token(path, AUTH.read_routes))
