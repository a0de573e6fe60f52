"""The FastAPI application: POST /retrieve, health probes and Prometheus metrics.

`create_app(settings, state)` builds an app around a `ServingState`; whoever loads snapshots
(a test, the service entry point, later the store watcher) calls `state.swap(pair)`. Each app
has its own Prometheus registry, so several apps can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, status
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from retrieval_api.batcher import Batcher, ConfigurationError, DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from retrieval_api.schemas import Cost, Problem, RetrieveRequest, RetrieveResponse, ScoredAd, schema_errors
from retrieval_api.settings import ApiSettings
from retrieval_api.state import ServingState

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ApiMetrics:
    """The service's metrics, registered in `registry` (one per app)."""

    def __init__(self, registry: CollectorRegistry, state: ServingState, batcher: Batcher):
        self.registry = registry
        self.latency = Histogram(
            "hsnn_api_request_latency_seconds",
            "Time from arrival to answer of POST /retrieve.",
            ["status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "hsnn_api_batch_size", "Requests scored together in one pass.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.errors = Counter("hsnn_api_errors", "Failed /retrieve requests by kind.", ["kind"], registry=registry)
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


def _problem(code: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=code, content={"detail": detail})


def create_app(settings: ApiSettings | None = None, state: ServingState | None = None) -> FastAPI:
    """Build the API around `state` (an empty one by default: /readyz answers 503 until a pair is swapped in)."""
    settings = settings or ApiSettings()
    state = state or ServingState()
    batcher = Batcher(
        state,
        beams=settings.beams,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        max_history=settings.max_history,
    )
    metrics = ApiMetrics(CollectorRegistry(), state, batcher)
    batcher.on_batch = metrics.batch_size.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="HSNN retrieval API",
        summary="Top-k ads for a user by layer-wise HSNN scoring over a learned hierarchical index.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.serving = state
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.post(
        "/retrieve",
        response_model=RetrieveResponse,
        responses={
            422: {"description": "The request is malformed or does not fit the served model's features."},
            429: {"model": Problem, "description": "Too many requests are waiting; retry later."},
            503: {"model": Problem, "description": "No model is loaded yet."},
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
            if errors := schema_errors(pair.schema, request.user, settings.max_history):
                raise InvalidRequest(errors)
            answer = await batcher.submit(request.user, request.k, request.exclude_ad_ids, request.deadline_ms)
        except InvalidRequest as exc:
            outcome = "invalid"
            return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": exc.errors})
        except Overloaded as exc:
            outcome = "overloaded"
            return _problem(status.HTTP_429_TOO_MANY_REQUESTS, str(exc))
        except NotReady as exc:
            outcome = "not_ready"
            return _problem(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))
        except DeadlineExceeded as exc:
            outcome = "deadline"
            return _problem(status.HTTP_504_GATEWAY_TIMEOUT, str(exc))
        except ConfigurationError as exc:
            outcome = "configuration"
            return _problem(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
        except Exception:
            outcome = "internal"
            raise
        finally:
            if outcome != "ok":
                metrics.errors.labels(kind=outcome).inc()
            metrics.latency.labels(status=outcome).observe(time.perf_counter() - started)
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

    @app.get("/livez", response_model=Problem)
    async def livez() -> Problem:
        """The process is up (always 200)."""
        return Problem(detail="alive")

    @app.get("/readyz", response_model=Problem, responses={503: {"model": Problem, "description": "Not ready."}})
    async def readyz() -> Problem | JSONResponse:
        """200 once a model/index pair is loaded, 503 with the reason before."""
        pair = state.current()
        if pair is None:
            return _problem(status.HTTP_503_SERVICE_UNAVAILABLE, "no model/index pair is loaded yet")
        return Problem(detail=f"serving model {pair.model_version} with index {pair.index_version}")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition of this app's registry."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
