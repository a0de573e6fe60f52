"""The API's Prometheus series, registered in the app's own registry (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retrieval_api.batcher import Batcher
from retrieval_api.state import ServingState
from retrieval_api.watcher import FAILURE, SUCCESS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


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
