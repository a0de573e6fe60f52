"""The trainer's main loop and its stop: poll -> train -> maybe snapshot, Kafka errors retried with back-off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kafka.errors import KafkaError

if TYPE_CHECKING:
    from trainer.service import OnlineTrainer

log = logging.getLogger("hsnn.trainer")


def run_loop(trainer: OnlineTrainer, should_stop: Callable[[], bool], max_idle_polls: int | None = None) -> None:
    """Poll, train and snapshot until `should_stop()` is true; Kafka errors are logged and retried with back-off.

    `max_idle_polls`: also return after that many empty polls in a row (benchmarks, tests).
    """
    backoff = 0.1
    idle = 0
    while not should_stop():
        trainer.heartbeat.beat()
        trainer.lease.renew()
        try:
            handled = trainer.poll_once()
            trainer.maybe_snapshot()
            backoff = 0.1
        except KafkaError as err:
            trainer.metrics.kafka_errors.inc()
            log.warning("Kafka error, retrying in %.1fs: %s", backoff, err)
            sleep_unless(should_stop, backoff)
            backoff = min(backoff * 2, trainer.settings.retry_backoff_max_seconds)
            continue
        idle = 0 if handled else idle + 1
        if max_idle_polls is not None and idle >= max_idle_polls:
            return


def final_snapshot(trainer: OnlineTrainer, timeout: float) -> bool:
    """Force a snapshot, retried while Kafka is away, up to `timeout` seconds; False if none was written."""
    deadline = time.monotonic() + timeout
    ok = False
    while True:
        try:
            ok = trainer.maybe_snapshot(force=True) is not None
        except KafkaError as err:
            log.warning("final snapshot: Kafka error: %s", err)
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not ok:
        log.error("no final snapshot: the next start resumes from the previous one (nothing is lost)")
    return ok


def sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(min(0.05, seconds))
