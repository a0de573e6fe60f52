"""The FastAPI application: POST /retrieve, POST /items/events, health probes and Prometheus metrics.

`create_app(settings, state, store=..., index_source=...)` builds an app around a
`ServingState`. With a snapshot store and an index source (or the `store_dir` and `catalog`
settings) its lifespan runs a `SnapshotWatcher` that hot-swaps each newly promoted version;
without them, whoever holds the state calls `state.swap(pair)` (tests, benchmarks). Each app
has its own Prometheus registry, so several apps can live in one process.

This module only wires: the routes are in `retrieval_api.routers` (and `status`, `schema_route`), they
take what they need through `retrieval_api.dependencies`, and `retrieval_api.errors` answers the
domain errors they raise.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from retrieval_api.redis_index import RedisIndexFollower
from retrieval_api.routers import ROUTERS
from retrieval_api.routing import ApiRoute
from retrieval_api.schema_route import schema_router
from retrieval_api.settings import ApiSettings
from retrieval_api.state import CatalogIndexSource, IndexSource, ServingState, load_pair_from_store
from retrieval_api.status import status_router
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
            on_adopt=metrics.observe_adoption,
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
            on_adopt=metrics.observe_adoption,
        )
    elif store is not None or index_source is not None:
        log.warning("hot swap is off: it needs both a snapshot store and an index source (catalog)")
    forwarder = ItemForwarder(settings, producer=item_producer)

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
    install_error_handlers(app)
    app.state.settings = settings
    app.state.serving = state
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.forwarder = forwarder

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(status_router(state, metrics, settings))
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
