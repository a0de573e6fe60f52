"""The FastAPI application: POST /retrieve, POST /items/events, health probes and Prometheus metrics.

`create_app(settings, state, store=..., index_source=...)` builds an app around a
`ServingState`. With a snapshot store and an index source (or the `store_dir` setting and
`redis_url` or `catalog`) its lifespan runs the `SnapshotWatcher` that hot-swaps each new version;
without them, whoever holds the state calls `state.swap(pair)` (tests, benchmarks). Each app
has its own Prometheus registry, so several apps can live in one process.

This module only wires: the routes are in `retrieval_api.routers` (and `status`, `schema_route`), they
take what they need through `retrieval_api.dependencies`, and `retrieval_api.errors` answers the
domain errors they raise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis as redis_lib
from fastapi import FastAPI

from retrieval_api.batcher import Batcher
from retrieval_api.catalogs import catalog_source
from retrieval_api.errors import install_error_handlers
from retrieval_api.items import ItemForwarder, RecordProducer
from retrieval_api.limits import RequestGate, refuse_when_full
from retrieval_api.metrics import ApiMetrics
from retrieval_api.openapi import exact_integer_bounds
from retrieval_api.redis_index import RedisIndexSource
from retrieval_api.routers import ROUTERS
from retrieval_api.routing import ApiRoute
from retrieval_api.schema_route import schema_router
from retrieval_api.scoring import PairScorer
from retrieval_api.settings import ApiSettings
from retrieval_api.state import CatalogIndexSource, IndexSource, ServingState
from retrieval_api.status import router as status_router
from retrieval_api.watcher import SnapshotWatcher
from streaming.service_metrics import service_registry
from streaming.snapshots import SnapshotStore
from streaming.version import package_version

log = logging.getLogger("hsnn.retrieval_api")


def create_app(
    settings: ApiSettings | None = None,
    state: ServingState | None = None,
    *,
    store: SnapshotStore | None = None,
    index_source: IndexSource | None = None,
    item_producer: RecordProducer | None = None,
) -> FastAPI:
    """Build the API around `state` (an empty one by default: /readyz answers 503 until a pair is swapped in).

    - `store` / `index_source`: where the hot-swap watcher loads snapshots and their index from (default: from
      the `store_dir` setting, and `redis_url` or else `catalog`; the watcher runs only when both are known).
    - `item_producer`: the Kafka producer of POST /items/events (default: one created on first use).
    """
    settings = settings or ApiSettings()
    state = state or ServingState()
    if store is None and settings.store_dir is not None:
        store = SnapshotStore(settings.store_dir)
    batcher = Batcher(
        PairScorer(state, settings.beams, settings.user_limits),
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
    )
    metrics = ApiMetrics(service_registry(), state, batcher)
    batcher.on_batch = metrics.batch_size.observe
    index_source = index_source or default_index_source(settings)
    watcher = None
    if store is not None and index_source is not None:
        watcher = SnapshotWatcher(
            store,
            index_source,
            state,
            device=settings.resolved_device(),
            interval_s=settings.reload_interval_s,
            refresh_interval_s=settings.delta_interval_s,
            backoff_s=settings.reload_backoff_s,
            on_reload=metrics.observe_reload,
            on_adopt=metrics.observe_adoption,
        )
    elif store is not None or index_source is not None:
        log.warning("hot swap is off: it needs both a snapshot store and an index source (catalog or redis_url)")
    forwarder = ItemForwarder(settings, producer=item_producer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
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
    install_error_handlers(app)
    app.state.settings = settings
    app.state.serving = state
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.store = store
    app.state.index_source = index_source
    app.state.watcher = watcher
    app.state.forwarder = forwarder

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(status_router)
    app.include_router(schema_router(state, settings.retry_after_s))

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        return exact_integer_bounds(default_openapi())  # cached by FastAPI, fixed in place (idempotent)

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(
        RequestGate,
        max_body_bytes=settings.max_body_bytes,
        authenticate={
            ("POST", "/items/events"): forwarder.admit,  # the token, then whether Kafka is known down
            ("POST", "/retrieve"): refuse_when_full(batcher),  # 429 unread while the queue is full
        },
        retry_after_s=settings.retry_after_s,
    )
    return app


def default_index_source(settings: ApiSettings) -> IndexSource | None:
    """The indexer's Redis index when `redis_url` is set, else one built in process from `catalog` (else none)."""
    if settings.redis_url is not None:
        # One client for the watcher and /status; a Redis that is away is found out at connect time, in a second.
        client = redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0)
        return RedisIndexSource(client, settings.key_prefix)
    if settings.catalog is not None:
        return CatalogIndexSource(catalog_source(settings.catalog))
    return None
