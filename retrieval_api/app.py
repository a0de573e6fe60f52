"""The FastAPI application: POST /retrieve, POST /items/events, health probes and Prometheus metrics.

`create_app(settings, state, store=..., index_source=...)` builds an app around a
`ServingState`. With a snapshot store and an index source (or the `store_dir` and `catalog`
settings) its lifespan runs a `SnapshotWatcher` that hot-swaps each newly promoted version;
without them, whoever holds the state calls `state.swap(pair)` (tests, benchmarks). Each app
has its own Prometheus registry, so several apps can live in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis as redis_lib
from fastapi import Depends, FastAPI, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from retrieval_api.batcher import (
    Batcher,
    ConfigurationError,
    DeadlineExceeded,
    InvalidRequest,
    NotReady,
    Overloaded,
    QueryFailed,
)
from retrieval_api.catalogs import catalog_source
from retrieval_api.items import ItemForwarder, RecordProducer, check_authorization_header, check_token
from retrieval_api.limits import RequestGate
from retrieval_api.redis_index import RedisIndexFollower
from retrieval_api.routing import ApiRoute
from retrieval_api.schema_route import schema_router
from retrieval_api.schemas import (
    Cost,
    ItemEventsAccepted,
    ItemEventsFailed,
    ItemEventsRequest,
    Problem,
    RetrieveRequest,
    RetrieveResponse,
    ScoredAd,
    schema_errors,
)
from retrieval_api.settings import ApiSettings
from retrieval_api.state import CatalogIndexSource, IndexSource, ServingState, load_pair_from_store
from retrieval_api.status import status_router
from retrieval_api.watcher import FAILURE, SUCCESS, SnapshotWatcher
from streaming.events import MAX_ID
from streaming.service_metrics import service_registry
from streaming.snapshots import SnapshotStore
from streaming.version import package_version

log = logging.getLogger("hsnn.retrieval_api")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BEARER = HTTPBearer(auto_error=False, description="The token in HSNN_API_ITEMS_TOKEN.")


class ApiMetrics:
    """The service's metrics, registered in `registry` (one per app)."""

    def __init__(self, registry: CollectorRegistry, state: ServingState, batcher: Batcher):
        self.registry = registry
        self.latency = Histogram(
            "hsnn_api_request_latency_seconds",
            "Time from arrival to answer of POST /retrieve, by outcome (ok or the error).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "hsnn_api_batch_size", "Requests scored together in one pass.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.errors = Counter("hsnn_api_errors", "Failed /retrieve requests", ["outcome"], registry=registry)
        queue_depth = Gauge("hsnn_api_queue_depth", "Requests waiting to be batched.", registry=registry)
        queue_depth.set_function(lambda: batcher.depth)
        model_version = Gauge("hsnn_api_model_version", "Snapshot version being served (0: none).", registry=registry)
        model_version.set_function(lambda: pair.model_version if (pair := state.current()) else 0)
        index_version = Gauge("hsnn_api_index_version", "Index version being served (0: none).", registry=registry)
        index_version.set_function(lambda: pair.index_version if (pair := state.current()) else 0)
        loaded = Gauge(
            "hsnn_api_model_loaded_timestamp_seconds",
            "When the served model/index pair was loaded (epoch s; 0: none).",
            registry=registry,
        )
        loaded.set_function(lambda: pair.loaded_at if (pair := state.current()) else 0)
        served = Gauge(
            "hsnn_api_served_snapshot_timestamp_seconds",
            "When the served snapshot was written by the publisher (manifest created_at, epoch s; 0: none/unknown).",
            registry=registry,
        )
        served.set_function(lambda: (pair.snapshot_created_at or 0) if (pair := state.current()) else 0)
        self.reloads = Counter(
            "hsnn_api_reloads",
            "Attempts to load a newly promoted snapshot, by outcome (a failure keeps the old pair serving).",
            ["outcome"],
            registry=registry,
        )
        self.reload_seconds = Histogram(
            "hsnn_api_reload_duration_seconds",
            "Time to load a snapshot and its index, successful or not.",
            buckets=RELOAD_BUCKETS,
            registry=registry,
        )
        self.item_events = Counter(
            "hsnn_api_item_events",
            "Item events received on POST /items/events, by outcome (acknowledged, not_acknowledged).",
            ["outcome"],
            registry=registry,
        )
        for outcome in (SUCCESS, FAILURE):
            self.reloads.labels(outcome=outcome)
        for outcome in ("acknowledged", "not_acknowledged"):
            self.item_events.labels(outcome=outcome)

    def observe_reload(self, outcome: str, seconds: float) -> None:
        self.reloads.labels(outcome=outcome).inc()
        self.reload_seconds.observe(seconds)


def _exact_integer_bounds(node: Any) -> Any:
    """FastAPI's OpenAPI model stores bounds as floats, so the id bound 2^63-1 would be published as 2^63
    (which the API refuses). Integer schemas get their bounds back as exact integers."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = MAX_ID if value == float(MAX_ID) else int(value)
        for value in node.values():
            _exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integer_bounds(value)
    return node


def _problem(code: int, detail: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return JSONResponse(status_code=code, content={"detail": detail}, headers=headers)


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
NOT_JSON = {"model": Problem, "description": "The body is not UTF-8 text."}
TOO_LARGE = {
    "model": Problem,
    "description": "The body is over `max_body_bytes` (declared or streamed); refused before it is buffered.",
}


def create_app(
    settings: ApiSettings | None = None,
    state: ServingState | None = None,
    *,
    store: SnapshotStore | None = None,
    index_source: IndexSource | None = None,
    item_producer: RecordProducer | None = None,
) -> FastAPI:
    """Build the API around `state` (an empty one by default: /readyz answers 503 until a pair is swapped in).

    - `store` / `index_source`: where the hot-swap watcher loads snapshots and their index from
      (default: from the `store_dir` and `catalog` settings; the watcher runs only when both are known).
    - `item_producer`: the Kafka producer of POST /items/events (default: one created on first use).
    """
    settings = settings or ApiSettings()
    state = state or ServingState()
    if store is None and settings.store_dir is not None:
        store = SnapshotStore(settings.store_dir)
    if index_source is None and settings.catalog is not None:
        index_source = CatalogIndexSource(catalog_source(settings.catalog))
    batcher = Batcher(
        state,
        beams=settings.beams,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        max_history=settings.max_history,
        max_dense_magnitude=settings.max_dense_magnitude,
    )
    metrics = ApiMetrics(service_registry(), state, batcher)
    batcher.on_batch = metrics.batch_size.observe
    watcher = None
    follower = None
    if store is not None and settings.redis_url is not None:
        follower = RedisIndexFollower(
            redis_lib.Redis.from_url(settings.redis_url),
            store,
            settings.key_prefix,
            settings.resolved_device(),
        )
        watcher = SnapshotWatcher(
            follower,
            state,
            load=follower.load,
            interval_s=settings.reload_interval_s,
            backoff_s=settings.reload_backoff_s,
            on_reload=metrics.observe_reload,
        )
    elif store is not None and index_source is not None:
        device = settings.resolved_device()
        source = index_source
        watcher = SnapshotWatcher(
            store,
            state,
            load=lambda version: load_pair_from_store(store, version, source, device=device),
            interval_s=settings.reload_interval_s,
            backoff_s=settings.reload_backoff_s,
            on_reload=metrics.observe_reload,
        )
    elif store is not None or index_source is not None:
        log.warning("hot swap is off: it needs both a snapshot store and an index source (catalog)")
    forwarder = ItemForwarder(settings, producer=item_producer)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # The request gate has already checked the token before reading the body; this documents the
        # scheme in the OpenAPI and guards the route should the gate ever be bypassed.
        check_token(settings, credentials)

    async def follow_deltas() -> None:
        while True:
            try:
                await asyncio.to_thread(follower.refresh, state)
            except Exception:  # a Redis hiccup must not stop the loop; the next poll retries
                log.exception("reading index deltas from Redis failed")
            await asyncio.sleep(settings.delta_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if watcher is not None:
            watcher.start()
        deltas = asyncio.get_running_loop().create_task(follow_deltas()) if follower is not None else None
        try:
            yield
        finally:
            if deltas is not None:
                deltas.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deltas
            if watcher is not None:
                await watcher.stop()
            await batcher.stop()
            await asyncio.to_thread(forwarder.close)

    app = FastAPI(
        title="HSNN retrieval API",
        summary="Top-k ads for a user by layer-wise HSNN scoring over a learned hierarchical index.",
        version=package_version(),
        lifespan=lifespan,
    )
    app.router.route_class = ApiRoute  # bodies read with JSON Schema's integers (5.0 is 5); set before any route
    app.state.settings = settings
    app.state.serving = state
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.forwarder = forwarder

    @app.post(
        "/retrieve",
        response_model=RetrieveResponse,
        responses={
            400: NOT_JSON,
            413: TOO_LARGE,
            422: {"description": "The request is malformed or does not fit the served model's features."},
            429: {"model": Problem, "description": "Too many requests wait; retry later.", "headers": RETRY_AFTER},
            503: {"model": Problem, "description": "No model is loaded yet.", "headers": RETRY_AFTER},
            504: {"model": Problem, "description": "The deadline passed before scoring started."},
        },
    )
    async def retrieve_ads(request: RetrieveRequest) -> RetrieveResponse | JSONResponse:
        """Retrieve the top-k ads for one user.

        The user tower and the layer-wise search run on the model and index that are current
        when the request's batch starts; both versions are returned, and they always belong together.
        """
        started = time.perf_counter()
        outcome = "ok"
        try:
            pair = state.current()
            if pair is None:
                raise NotReady("no model/index pair is loaded yet")
            if errors := schema_errors(pair.schema, request.user, settings.max_history, settings.max_dense_magnitude):
                raise InvalidRequest(errors)
            answer = await batcher.submit(request.user, request.k, request.exclude_ad_ids, request.deadline_ms)
        except InvalidRequest as exc:
            outcome = "invalid"
            return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": exc.errors})
        except Overloaded as exc:
            outcome = "overloaded"
            return _problem(status.HTTP_429_TOO_MANY_REQUESTS, str(exc), settings.retry_after_s)
        except NotReady as exc:
            outcome = "not_ready"
            return _problem(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), settings.retry_after_s)
        except DeadlineExceeded as exc:
            outcome = "deadline"
            return _problem(status.HTTP_504_GATEWAY_TIMEOUT, str(exc))
        except ConfigurationError as exc:
            outcome = "configuration"
            return _problem(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
        except QueryFailed as exc:  # this request alone; the rest of its batch was answered
            outcome = "internal"
            return _problem(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
        except Exception:
            outcome = "internal"
            raise
        finally:
            if outcome != "ok":
                metrics.errors.labels(outcome=outcome).inc()
            metrics.latency.labels(outcome=outcome).observe(time.perf_counter() - started)
        result = answer.result
        return RetrieveResponse(
            ads=[
                ScoredAd(ad_id=ad_id, score=score)
                for ad_id, score in zip(result.item_ids.tolist(), result.scores.tolist(), strict=True)
            ],
            model_version=answer.pair.model_version,
            index_version=answer.pair.index_version,
            cost=Cost(
                nodes_scored=result.cost.nodes_scored, items_scored=result.cost.items_scored, flops=result.cost.flops
            ),
        )

    @app.post(
        "/items/events",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=ItemEventsAccepted,
        dependencies=[Depends(authorize)],
        responses={
            401: {"model": Problem, "description": "No bearer token was sent (checked before the body is read)."},
            403: {"model": Problem, "description": "The bearer token is wrong (checked before the body is read)."},
            400: NOT_JSON,
            413: TOO_LARGE,
            422: {"description": "An event breaks the contract of docs/events.md (the error names the field)."},
            503: {
                "model": ItemEventsFailed | Problem,
                "description": "Item events are disabled (no token configured), or the broker did not acknowledge "
                "every event within `kafka_ack_timeout_s` (`not_acknowledged` lists them; retrying the batch is "
                "safe).",
                "headers": RETRY_AFTER,
            },
        },
    )
    async def item_events(body: ItemEventsRequest) -> ItemEventsAccepted | JSONResponse:
        """Forward ad create/update/expire events to the items topic.

        Answers 202 only after the broker acknowledged every event (acks=all). Events are keyed by
        ad id, so one ad's events keep their order; the indexer applies them by `sequence`.
        """
        acknowledged, failed = await forwarder.forward_async(body.events)
        metrics.item_events.labels(outcome="acknowledged").inc(len(acknowledged))
        if failed:
            metrics.item_events.labels(outcome="not_acknowledged").inc(len(failed))
            log.warning("%d of %d item events not acknowledged: %s", len(failed), len(body.events), failed[0].error)
            problem = ItemEventsFailed(
                detail=f"{len(failed)} of {len(body.events)} events were not acknowledged by Kafka; "
                "retry the batch (events are idempotent by sequence)",
                not_acknowledged=failed,
            )
            return JSONResponse(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                content=problem.model_dump(),
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        return ItemEventsAccepted(accepted=len(acknowledged), topic=forwarder.topic, records=acknowledged)

    @app.get("/livez", response_model=Problem)
    async def livez() -> Problem:
        """The process is up (always 200)."""
        return Problem(detail="alive")

    @app.get(
        "/readyz",
        response_model=Problem,
        responses={503: {"model": Problem, "description": "Not ready.", "headers": RETRY_AFTER}},
    )
    async def readyz() -> Problem | JSONResponse:
        """200 once a model/index pair is loaded, 503 with the reason before."""
        pair = state.current()
        if pair is None:
            return _problem(
                status.HTTP_503_SERVICE_UNAVAILABLE, "no model/index pair is loaded yet", settings.retry_after_s
            )
        return Problem(detail=f"serving model {pair.model_version} with index {pair.index_version}")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition of this app's registry."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(status_router(state, metrics, settings))
    app.include_router(schema_router(state, settings.retry_after_s))

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        return _exact_integer_bounds(default_openapi())  # cached by FastAPI, fixed in place (idempotent)

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(
        RequestGate,
        max_body_bytes=settings.max_body_bytes,
        authenticate={("POST", "/items/events"): lambda header: check_authorization_header(settings, header)},
        retry_after_s=settings.retry_after_s,
    )
    return app
