"""The indexer's Prometheus series (each app or process passes its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from streaming.service_metrics import Declare, service_registry

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)
_REBUILD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


# Label names, and the values they take.
LEVEL = "level"  # index level, 0 = the top
OUTCOME = "outcome"  # applied, superseded
REASON = "reason"  # start, lost, rolled_back
SYSTEM = "system"  # kafka, redis


class IndexerMetrics:
    """The indexer's series: the index it serves, item events, rebuilds, the catalogue's replays, its loop."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or service_registry()
        declare = Declare(self.registry)
        gauge, counter, histogram = declare.gauge, declare.counter, declare.histogram

        # declared in this order, which is the order of /metrics
        self.event_to_indexed = histogram(
            "hsnn_indexer_item_event_to_indexed_seconds",
            "Item event time to the change being written to Redis",
            _LATENCY_BUCKETS,
        )
        self.index_version = gauge("hsnn_indexer_index_version", "Index version the pointer holds")
        self.model_version = gauge("hsnn_indexer_model_version", "Snapshot version of the current index")
        self.published = gauge(
            "hsnn_indexer_index_published_timestamp_seconds", "When the current index version was flipped in"
        )
        self.node_size = gauge(
            "hsnn_indexer_node_size_max_over_mean", "Largest node / mean node (live items) per level", LEVEL
        )
        self.refused_indexes = counter(
            "hsnn_indexer_refused_indexes", "Built indexes not flipped live: a node past max_node_over_mean"
        )
        self.dead_letters = counter("hsnn_indexer_dead_letters", "Item events sent to the dead-letter topic")
        self.rebuild_seconds = histogram(
            "hsnn_indexer_rebuild_seconds", "Full index rebuild, catalogue scan to flip", _REBUILD_BUCKETS
        )
        self.snapshot_failures = counter(
            "hsnn_indexer_snapshot_failures", "Promoted snapshots refused (corrupt, unreadable, wrong kind)"
        )
        self.item_events = counter("hsnn_indexer_item_events", "Item events by outcome (applied, superseded)", OUTCOME)
        self.skipped_ads = counter(
            "hsnn_indexer_rebuild_skipped_ads", "Catalogue ads left out of a rebuild (do not fit the schema)"
        )
        self.catalogue_replays = counter(
            "hsnn_indexer_catalogue_replays",
            "Replays of the items topic because Redis lost (part of) the catalogue",
            REASON,
        )
        self.replaying = gauge("hsnn_indexer_catalogue_replaying", "1 while the catalogue is being replayed")
        self.deferred_rebuilds = counter(
            "hsnn_indexer_rebuilds_deferred", "Rebuilds not done because the catalogue is incomplete"
        )
        self.pending_dead_letters = gauge(
            "hsnn_indexer_dead_letters_pending", "Dead letters not yet acknowledged (offsets wait for them)"
        )
        self.loop_errors = counter("hsnn_indexer_loop_errors", "Kafka or Redis errors the loop survived", SYSTEM)
