"""The indexer's Prometheus series (each app or process passes its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streaming.service_metrics import service_registry

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)
_REBUILD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class IndexerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or service_registry()
        kw = {"registry": self.registry}
        self.event_to_indexed = Histogram(
            "hsnn_indexer_item_event_to_indexed_seconds",
            "Item event time to the change being written to Redis",
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.index_version = Gauge("hsnn_indexer_index_version", "Index version the pointer holds", **kw)
        self.model_version = Gauge("hsnn_indexer_model_version", "Snapshot version of the current index", **kw)
        self.published = Gauge(
            "hsnn_indexer_index_published_timestamp_seconds", "When the current index version was flipped in", **kw
        )
        self.node_size = Gauge(
            "hsnn_indexer_node_size_max_over_mean", "Largest node / mean node (live items) per level", ["level"], **kw
        )
        self.refused_indexes = Counter(
            "hsnn_indexer_refused_indexes", "Built indexes not flipped live: a node past max_node_over_mean", **kw
        )
        self.dead_letters = Counter("hsnn_indexer_dead_letters", "Item events sent to the dead-letter topic", **kw)
        self.rebuild_seconds = Histogram(
            "hsnn_indexer_rebuild_seconds", "Full index rebuild, catalogue scan to flip", buckets=_REBUILD_BUCKETS, **kw
        )
        self.snapshot_failures = Counter(
            "hsnn_indexer_snapshot_failures", "Promoted snapshots refused (corrupt, unreadable, wrong kind)", **kw
        )
        self.item_events = Counter(
            "hsnn_indexer_item_events", "Item events by outcome (applied, superseded)", ["outcome"], **kw
        )
        self.skipped_ads = Counter(
            "hsnn_indexer_rebuild_skipped_ads", "Catalogue ads left out of a rebuild (do not fit the schema)", **kw
        )
        self.catalogue_replays = Counter(
            "hsnn_indexer_catalogue_replays",
            "Replays of the items topic because Redis lost (part of) the catalogue",
            ["reason"],
            **kw,
        )
        self.replaying = Gauge("hsnn_indexer_catalogue_replaying", "1 while the catalogue is being replayed", **kw)
        self.deferred_rebuilds = Counter(
            "hsnn_indexer_rebuilds_deferred", "Rebuilds not done because the catalogue is incomplete", **kw
        )
        self.pending_dead_letters = Gauge(
            "hsnn_indexer_dead_letters_pending", "Dead letters not yet acknowledged (offsets wait for them)", **kw
        )
        self.loop_errors = Counter(
            "hsnn_indexer_loop_errors", "Kafka or Redis errors the loop survived", ["system"], **kw
        )
