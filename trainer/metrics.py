"""The trainer's Prometheus series and its per-stage timings (the throughput bench prints those)."""

from __future__ import annotations

import bisect
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram

from streaming.service_metrics import Declare

# Seconds from an impression's event time to the train step that applied it (online training runs behind
# Kafka by the poll, the catalogue catch-up and the queue of batches before it).
EVENT_TO_TRAINED_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        declare = Declare(registry)
        gauge, counter, histogram = declare.gauge, declare.counter, declare.histogram
        # consumption: what the loop read, routed and survived
        self.events = counter("hsnn_trainer_events", "Impressions consumed, by outcome", "outcome")
        self.events_per_second = gauge("hsnn_trainer_events_per_second", "Impressions consumed per second")
        self.lag_messages = gauge("hsnn_trainer_consumer_lag_messages", "High watermark minus next offset", "partition")
        self.lag_seconds = gauge(
            "hsnn_trainer_consumer_lag_seconds", "Now minus event time of the last consumed record", "partition"
        )
        self.item_events = counter("hsnn_trainer_item_events", "Item records read, by outcome", "outcome")
        self.dead_letters = counter("hsnn_trainer_dead_letters", "Records sent to a dead-letter topic", "reason")
        self.kafka_errors = counter("hsnn_trainer_kafka_errors", "Kafka errors survived by the loop")
        self.offset_out_of_range = counter(
            "hsnn_trainer_offset_out_of_range",
            "Stored offsets found outside the partition's log (the trainer halts unless told how to reset)",
        )
        self.halted = gauge("hsnn_trainer_halted", "1 when the trainer stopped itself and needs an operator")

        # training: how fresh and how healthy the steps are
        self.event_to_trained = histogram(
            "hsnn_trainer_event_to_trained_seconds",
            "Per trained impression: when its train step finished minus its event time",
            EVENT_TO_TRAINED_BUCKETS,
        )
        self.trained_event_time = gauge(
            "hsnn_trainer_trained_event_time_seconds",
            "Newest impression event time trained into the weights (epoch s; 0: nothing trained yet)",
        )
        self.loss = gauge("hsnn_trainer_loss", "Total loss of the last train step")
        self.grad_norm = gauge("hsnn_trainer_grad_norm", "Gradient norm of the last step, before clipping")
        self.clipped_steps = counter("hsnn_trainer_clipped_steps", "Train steps whose gradients were clipped")
        self.skipped_steps = counter(
            "hsnn_trainer_skipped_steps", "Train steps skipped: non-finite loss or gradient (batch not applied)"
        )

        # snapshots: what was published, under which lease
        self.rolling_ne = gauge("hsnn_trainer_rolling_ne", "Click NE on the held-out buffer at the last snapshot")
        self.last_snapshot = gauge(
            "hsnn_trainer_last_snapshot_timestamp_seconds", "When the trainer last published a snapshot"
        )
        self.lease_epoch = gauge("hsnn_trainer_lease_epoch", "Fencing epoch of the store lease held")
        self.non_finite_snapshots = counter(
            "hsnn_trainer_non_finite_snapshots_refused", "Snapshots not written because a weight was NaN/inf"
        )
        for outcome in ("trained", "dead_letter", "eval", "skipped"):  # export zeros: dashboards see every series
            self.events.labels(outcome)
        for reason in ("malformed", "schema_mismatch", "unknown_ad"):
            self.dead_letters.labels(reason)

    def set_lag(self, messages: dict[int, int], event_times: dict[int, float]) -> None:
        """Consumer lag per partition: in messages (high watermark - next offset) and in seconds (now - event time)."""
        now = time.time()
        for partition, lag in messages.items():
            self.lag_messages.labels(str(partition)).set(lag)
        for partition, event_time in event_times.items():
            self.lag_seconds.labels(str(partition)).set(max(0.0, now - event_time))


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, with one increment per bucket touched instead of one per value.

    A train step's batch is hundreds of events; observing each costs about 3 us (lock, loop over the bounds)
    where this costs well under 1. It writes the same bucket and sum values (tested against `observe`), through
    the client's internal `_upper_bounds`, `_buckets` and `_sum`; without them it falls back to `observe`.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    for index, count in Tally(bisect.bisect_left(bounds, value) for value in values).items():
        buckets[index].inc(count)  # bisect_left: the first bound >= value, as `observe` picks (+Inf last)
    total.inc(sum(values))


def reason_label(reason: str) -> str:
    """A bounded label value for the dead-letter counter (the full reason is in the DLQ record)."""
    if reason.startswith("unknown ad"):
        return "unknown_ad"
    if reason.startswith("schema mismatch"):
        return "schema_mismatch"
    return "malformed"


@dataclass
class Timings:
    """Seconds spent per stage since start (the bench prints these)."""

    poll: float = 0.0
    items: float = 0.0
    decode: float = 0.0
    batch: float = 0.0
    train: float = 0.0
    snapshot: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
