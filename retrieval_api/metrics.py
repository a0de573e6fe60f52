"""The API's Prometheus series, registered in the app's own registry (several apps can live in one process).

Freshness is exported as timestamps, never as ages: the gauges carry the served snapshot's manifest
timestamps (`created_at`, when the publisher wrote it; `event_time_watermark`, the newest impression trained
into it), so an age is `time() - gauge` in PromQL. The two freshness histograms are built from the same
timestamps at the moment a new pair is adopted (swapped in): adopted_at - created_at (published -> served)
and adopted_at - event_time_watermark (newest event -> served). A histogram observes only a snapshot newer
than the one served and written after this process started watching: a pod that starts (or a rollback)
onto an old snapshot says nothing about how fast snapshots reach serving.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry

from retrieval_api.batcher import Batcher
from retrieval_api.state import ServingPair, ServingState
from retrieval_api.watcher import FAILURE, SUCCESS
from streaming.service_metrics import Declare

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds from publish (or event) to served: 10 s is the published -> served target, so it is a boundary.
FRESHNESS_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RECENT_ADOPTIONS = 256  # adoptions kept for /status.json (the demo's exact p50/p99)


@dataclass(frozen=True)
class Adoption:
    """One swap to a new snapshot: the manifest's timestamps and when this replica started serving it (epoch s)."""

    model_version: int
    published_at: float | None  # manifest created_at
    newest_event_time: float | None  # manifest event_time_watermark
    adopted_at: float
    observed: bool  # counted in the freshness histograms (see the module docstring)

    @property
    def published_to_served_s(self) -> float | None:
        return None if self.published_at is None else self.adopted_at - self.published_at

    @property
    def event_to_served_s(self) -> float | None:
        return None if self.newest_event_time is None else self.adopted_at - self.newest_event_time

    def as_json(self) -> dict[str, float | int | bool | None]:
        return asdict(self) | {
            "published_to_served_s": self.published_to_served_s,
            "event_to_served_s": self.event_to_served_s,
        }


class ApiMetrics:
    """The service's metrics, registered in `registry` (one per app)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        state: ServingState,
        batcher: Batcher,
        clock: Callable[[], float] = time.time,
    ):
        """`clock` (epoch seconds) stamps adoptions and when this replica started watching (tests inject one)."""
        self.registry = registry
        self.clock = clock
        self.watching_since = clock()
        self.adoptions: deque[Adoption] = deque(maxlen=RECENT_ADOPTIONS)
        declare = Declare(registry)
        # requests
        self.latency = declare.histogram(
            "hsnn_api_request_latency_seconds",
            "Time from arrival to answer of POST /retrieve, by outcome (ok or the error).",
            LATENCY_BUCKETS,
            "outcome",
        )
        self.batch_size = declare.histogram(
            "hsnn_api_batch_size", "Requests scored together in one pass.", BATCH_BUCKETS
        )
        self.errors = declare.counter("hsnn_api_errors", "Failed /retrieve requests", "outcome")
        declare.gauge("hsnn_api_queue_depth", "Requests waiting to be batched.").set_function(lambda: batcher.depth)

        # the served (model, index) pair
        def served(name: str, doc: str, read: Callable[[ServingPair], float | None]) -> None:
            """A gauge of the served pair, read at scrape time; 0 while none (or unknown)."""
            declare.gauge(name, doc).set_function(lambda: (read(pair) or 0) if (pair := state.current()) else 0)

        served("hsnn_api_model_version", "Snapshot version being served (0: none).", lambda p: p.model_version)
        served("hsnn_api_index_version", "Index version being served (0: none).", lambda p: p.index_version)
        served(
            "hsnn_api_model_loaded_timestamp_seconds",
            "When the served model/index pair was loaded (epoch s; 0: none).",
            lambda p: p.loaded_at,
        )
        served(
            "hsnn_api_served_snapshot_timestamp_seconds",
            "When the served snapshot was written by the publisher (manifest created_at, epoch s; 0: none/unknown).",
            lambda p: p.snapshot_created_at,
        )
        served(
            "hsnn_api_served_snapshot_event_time_seconds",
            "Newest impression event time trained into the served snapshot (manifest event_time_watermark, epoch s;"
            " 0: none/unknown).",
            lambda p: p.event_time_watermark,
        )

        # item events posted to the API
        self.item_events = declare.counter(
            "hsnn_api_item_events",
            "Item events received on POST /items/events, by outcome (acknowledged, not_acknowledged).",
            "outcome",
        )
        for outcome in ("acknowledged", "not_acknowledged"):
            self.item_events.labels(outcome=outcome)

        # swaps: loading a promoted snapshot, and how fresh the adopted one is
        self.reloads = declare.counter(
            "hsnn_api_reloads",
            "Attempts to load a newly promoted snapshot, by outcome (a failure keeps the old pair serving).",
            "outcome",
        )
        for outcome in (SUCCESS, FAILURE):
            self.reloads.labels(outcome=outcome)
        self.reload_seconds = declare.histogram(
            "hsnn_api_reload_duration_seconds",
            "Time to load a snapshot and its index, successful or not.",
            RELOAD_BUCKETS,
        )
        self.published_to_served = declare.histogram(
            "hsnn_api_snapshot_published_to_served_seconds",
            "Adoption time minus the adopted snapshot's manifest created_at, per new snapshot swapped in.",
            FRESHNESS_BUCKETS,
        )
        self.event_to_served = declare.histogram(
            "hsnn_api_event_to_served_seconds",
            "Adoption time minus the newest impression event time trained into the adopted snapshot.",
            FRESHNESS_BUCKETS,
        )

    def observe_reload(self, outcome: str, seconds: float) -> None:
        self.reloads.labels(outcome=outcome).inc()
        self.reload_seconds.observe(seconds)

    def observe_adoption(self, pair: ServingPair, previous: ServingPair | None) -> Adoption:
        """The watcher swapped `pair` in (replacing `previous`): record its freshness from the manifest timestamps."""
        adopted_at = self.clock()
        published = pair.snapshot_created_at
        newer = previous is None or pair.model_version > previous.model_version
        observed = newer and published is not None and published >= self.watching_since
        adoption = Adoption(pair.model_version, published, pair.event_time_watermark, adopted_at, observed)
        if observed:
            self.published_to_served.observe(max(0.0, adoption.published_to_served_s or 0.0))
            if adoption.event_to_served_s is not None:
                self.event_to_served.observe(max(0.0, adoption.event_to_served_s))
        self.adoptions.append(adoption)
        return adoption
