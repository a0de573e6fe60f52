"""The publisher: turns a trainer's model into a promoted, versioned snapshot.

Every hand-off is written (versions only grow), then a quality gate decides promotion: a
snapshot whose held-out NE is worse than the promoted one's by more than the threshold stays
unpromoted, counted and logged. Promotion moves the pointer readers poll and notifies
subscribers; retention keeps the newest N versions (never the promoted one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field

from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.settings import ServiceSettings
from hsnn.snapshots import Manifest, Pointer, SnapshotStore

log = logging.getLogger("hsnn.publisher")


class PublisherSettings(ServiceSettings):
    section = "publisher"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_PUBLISHER_"}

    store_dir: str = "snapshots"
    keep_versions: int = Field(5, ge=1)
    max_ne_regression: float = Field(0.01, ge=0, description="Relative NE increase that blocks promotion.")
    gate_metric: str = "ne"


@dataclass
class PublishResult:
    manifest: Manifest
    promoted: bool
    reason: str


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        kwargs = {"registry": registry} if registry is not None else {}
        self.published = Counter("hsnn_publisher_snapshots_written", "Snapshots written to the store", **kwargs)
        self.rejected = Counter("hsnn_publisher_snapshots_rejected", "Snapshots held back by the gate", **kwargs)
        self.last_published = Gauge(
            "hsnn_publisher_last_published_timestamp_seconds", "When the newest snapshot was written", **kwargs
        )
        self.last_promoted = Gauge(
            "hsnn_publisher_last_promoted_timestamp_seconds", "When the promoted snapshot was promoted", **kwargs
        )
        self.promoted_version = Gauge("hsnn_publisher_promoted_version", "Promoted snapshot version", **kwargs)


class Publisher:
    def __init__(
        self,
        settings: PublisherSettings,
        metrics: PublisherMetrics | None = None,
        notify: Callable[[Pointer, Manifest], None] | None = None,
    ):
        self.settings = settings
        self.store = SnapshotStore(settings.store_dir)
        self.metrics = metrics or PublisherMetrics(CollectorRegistry())
        self.notify = notify

    def publish(
        self,
        model: HSNN | MoNN,
        *,
        offsets: dict[str, dict[str, int]],
        event_time_watermark: float | None,
        eval_metrics: dict[str, float],
    ) -> PublishResult:
        promoted = self.store.promoted()
        manifest = self.store.write(
            model,
            offsets=offsets,
            event_time_watermark=event_time_watermark,
            eval_metrics=eval_metrics,
            parent=self.store.latest_version(),
        )
        self.metrics.published.inc()
        self.metrics.last_published.set(manifest.created_at)
        ok, reason = self._gate(manifest, promoted)
        if ok:
            pointer = self.store.promote(manifest.version)
            self.metrics.last_promoted.set(pointer.promoted_at)
            self.metrics.promoted_version.set(pointer.version)
            if self.notify is not None:
                self.notify(pointer, manifest)
            log.info("promoted snapshot %d (%s)", manifest.version, reason)
        else:
            self.metrics.rejected.inc()
            log.warning("snapshot %d not promoted: %s", manifest.version, reason)
        self.store.prune(self.settings.keep_versions)
        return PublishResult(manifest=manifest, promoted=ok, reason=reason)

    def _gate(self, candidate: Manifest, promoted: Pointer | None) -> tuple[bool, str]:
        metric = self.settings.gate_metric
        if promoted is None:
            return True, "first snapshot"
        incumbent = self.store.manifest(promoted.version).eval_metrics.get(metric)
        challenger = candidate.eval_metrics.get(metric)
        if incumbent is None or challenger is None:
            return True, f"no {metric} to compare"
        limit = incumbent * (1 + self.settings.max_ne_regression)
        if challenger > limit:
            return False, f"{metric} {challenger:.5f} regresses past {limit:.5f} (promoted {incumbent:.5f})"
        return True, f"{metric} {challenger:.5f} within {limit:.5f}"
