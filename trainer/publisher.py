"""The trainer's publisher: turns its model into a promoted, versioned snapshot (and a notice of it).

Every hand-off is written (versions only grow), then a quality gate decides promotion:

- a snapshot is promoted only with a finite held-out NE (`gate_metric`) no worse than the
  promoted one's by more than `max_ne_regression`; a NaN, infinite or missing NE is never
  promoted (a diverged model, or a trainer that restarted with an empty eval buffer);
- the one exception is the very first snapshot of a store (nothing promoted, nothing written
  before it), and only when `promote_first_without_ne` is set: a fresh deployment then serves
  something before enough held-out events exist. Off by default.

A held-back snapshot is counted and logged. Promotion moves the pointer readers poll and
notifies subscribers. Retention keeps the newest `keep_versions`, the promoted version, and
the snapshots behind the current and previous Redis index versions (read from `redis_url`
when set: a rollback or a new API pod needs them); if Redis cannot be read, nothing is pruned.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from hsnn.model import HSNN
from hsnn.monn import MoNN
from streaming.settings import ServiceSettings
from streaming.snapshots import CorruptSnapshot, Manifest, Pointer, SnapshotStore

log = logging.getLogger("hsnn.publisher")


class PublisherSettings(ServiceSettings):
    section = "publisher"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_PUBLISHER_"}

    store_dir: str = "snapshots"
    keep_versions: int = Field(5, ge=1)
    max_ne_regression: float = Field(0.01, ge=0, description="Relative NE increase that blocks promotion.")
    gate_metric: str = "ne"
    promote_first_without_ne: bool = Field(
        False, description="Promote a store's very first snapshot even without a finite NE (fresh deployments)."
    )
    redis_url: str | None = Field(
        None, description="The indexer's Redis: retention keeps the snapshots its current and previous index use."
    )
    index_key_prefix: str = Field("hsnn:", min_length=1, description="Key prefix of the indexer's Redis layout.")


@dataclass
class PublishResult:
    manifest: Manifest
    promoted: bool
    reason: str


def snapshot_notice(pointer: Pointer, manifest: Manifest) -> bytes:
    """The JSON notice sent for a promoted snapshot: enough for a reader to decide whether to load it."""
    return json.dumps(
        {
            "version": pointer.version,
            "promoted_at": pointer.promoted_at,
            "created_at": manifest.created_at,
            "event_time_watermark": manifest.event_time_watermark,
            "eval_metrics": manifest.eval_metrics,
        },
        sort_keys=True,
    ).encode()


def notice_sender(producer: Any, topic: str) -> Callable[[Pointer, Manifest], None]:
    """A `Publisher.notify` that sends `snapshot_notice` to `topic`: best effort, as the pointer file is the truth."""

    def send(pointer: Pointer, manifest: Manifest) -> None:
        try:
            producer.send(topic, key=str(pointer.version).encode(), value=snapshot_notice(pointer, manifest))
        except Exception as exc:
            log.warning("could not send the notice for snapshot %d: %s", pointer.version, exc)

    return send


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def index_snapshot_versions(redis, prefix: str) -> set[int]:
    """Snapshot versions behind the current and previous Redis index versions (what the API and a rollback use)."""
    from streaming import index_store

    versions = set()
    for index_version in (index_store.current_version(redis, prefix), index_store.previous_version(redis, prefix)):
        if index_version is None:
            continue
        try:
            versions.add(int(index_store.read_meta(redis, index_version, prefix)["model_version"]))
        except KeyError:  # that index version's keys are gone: nothing of it to protect
            continue
    return versions


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
        self.published_event_time = Gauge(
            "hsnn_publisher_published_event_time_seconds",
            "Newest impression event time in the newest snapshot written (manifest event_time_watermark, epoch s)",
            **kwargs,
        )
        self.event_to_published = Histogram(
            "hsnn_publisher_event_to_published_seconds",
            "Per snapshot written: manifest created_at minus its event_time_watermark (newest event -> published)",
            buckets=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
            **kwargs,
        )


class Publisher:
    def __init__(
        self,
        settings: PublisherSettings,
        metrics: PublisherMetrics | None = None,
        notify: Callable[[Pointer, Manifest], None] | None = None,
        in_use: Callable[[], set[int]] | None = None,
    ):
        """`in_use()` returns snapshot versions retention must keep (default: read from `redis_url`, if set)."""
        self.settings = settings
        self.store = SnapshotStore(settings.store_dir)
        self.metrics = metrics or PublisherMetrics(CollectorRegistry())
        self.notify = notify
        self.in_use: Callable[[], set[int]] | None = in_use
        if in_use is None and settings.redis_url is not None:
            import redis as redis_lib

            client = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
            self.in_use = lambda: index_snapshot_versions(client, settings.index_key_prefix)

    def publish(
        self,
        model: HSNN | MoNN,
        *,
        offsets: dict[str, dict[str, int]],
        event_time_watermark: float | None,
        eval_metrics: dict[str, float],
        extra_files: dict[str, bytes] | None = None,
    ) -> PublishResult:
        earlier = self.store.versions()
        try:
            promoted = self.store.read_pointer()
        except CorruptSnapshot as err:  # gate against the newest earlier snapshot; a promotion rewrites the pointer
            log.error("%s; gating against snapshot %s instead", err, earlier[-1] if earlier else None)
            promoted = Pointer(version=earlier[-1], promoted_at=0.0) if earlier else None
        manifest = self.store.write(
            model,
            offsets=offsets,
            event_time_watermark=event_time_watermark,
            eval_metrics=eval_metrics,
            parent=self.store.latest_version(),
            extra_files=extra_files,
        )
        self.metrics.published.inc()
        self.metrics.last_published.set(manifest.created_at)
        if manifest.event_time_watermark is not None:
            self.metrics.published_event_time.set(manifest.event_time_watermark)
            self.metrics.event_to_published.observe(max(0.0, manifest.created_at - manifest.event_time_watermark))
        ok, reason = self._gate(manifest, promoted, first=not earlier)
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
        self.prune()
        return PublishResult(manifest=manifest, promoted=ok, reason=reason)

    def prune(self) -> list[int]:
        """Retention: see the module docstring. Returns the versions deleted."""
        protect: set[int] = set()
        if self.in_use is not None:
            try:
                protect = self.in_use()
            except Exception as err:  # unknown use: deleting could strand a new API pod or a rollback
                log.warning("not pruning snapshots: cannot tell which ones the index uses: %s", err)
                return []
        return self.store.prune(self.settings.keep_versions, protect=protect)

    def _gate(self, candidate: Manifest, promoted: Pointer | None, first: bool) -> tuple[bool, str]:
        metric = self.settings.gate_metric
        challenger = candidate.eval_metrics.get(metric)
        if not finite(challenger):
            if first and promoted is None and self.settings.promote_first_without_ne:
                return True, f"first snapshot of the store, no {metric} yet (promote_first_without_ne)"
            return False, f"no finite {metric} ({challenger}): only a measured snapshot is promoted"
        assert challenger is not None
        if promoted is None:
            return True, f"first promotion, {metric} {challenger:.5f}"
        try:
            incumbent = self.store.manifest(promoted.version).eval_metrics.get(metric)
        except CorruptSnapshot as err:
            log.error("the promoted snapshot's manifest is unusable (%s); the candidate replaces it", err)
            incumbent = None
        if not finite(incumbent):
            return True, f"{metric} {challenger:.5f}; the promoted snapshot has no finite {metric} to compare"
        assert incumbent is not None
        limit = incumbent * (1 + self.settings.max_ne_regression)
        if challenger > limit:
            return False, f"{metric} {challenger:.5f} regresses past {limit:.5f} (promoted {incumbent:.5f})"
        return True, f"{metric} {challenger:.5f} within {limit:.5f}"
