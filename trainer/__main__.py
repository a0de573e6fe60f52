"""`python -m trainer`: run the online trainer until SIGTERM/SIGINT (then final snapshot, exit 0).

`--ranks N` runs N ranks as one supervised group (trainer/launcher.py); a process started with
WORLD_SIZE > 1 (torchrun or the launcher) is one rank of a group (trainer/distributed.py).

Port `metrics_port` serves /metrics and /livez (503 once the main loop stops beating). Exit codes:
1 final snapshot failed, 2 halted on an out-of-range stored offset (after SIGTERM), 3 another trainer
holds the store's lease, 4 this trainer was fenced off by a newer one.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TypeVar

from streaming.health import Heartbeat, serve_metrics_and_liveness
from streaming.offsets import StoredOffsetOutOfRange
from trainer.fencing import LeaseHeld, LeaseLost
from trainer.metrics import TrainerMetrics
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")
T = TypeVar("T", bound=OnlineTrainer)

EXIT_HALTED = 2  # a stored offset is out of range: needs an operator
EXIT_LEASE_HELD = 3  # another trainer owns the store
EXIT_LEASE_LOST = 4  # another trainer took the store over while this one ran


def main(argv: list[str] | None = None) -> int:
    settings = TrainerSettings.from_cli(argv)
    rank = f" rank {settings.rank}/{settings.world_size}" if settings.world_size > 1 else ""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{rank}: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.ERROR)  # reconnect chatter while a broker restarts
    if settings.ranks > 1 and settings.world_size == 1:
        from trainer.launcher import launch

        return launch(settings, sys.argv[1:] if argv is None else argv)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then a final snapshot", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    heartbeat = Heartbeat(settings.heartbeat_max_age_s)
    metrics = TrainerMetrics()
    if settings.metrics_port:
        serve_metrics_and_liveness(settings.metrics_port + settings.rank, heartbeat)  # a rank: port + rank
    if settings.world_size > 1:
        return _run_rank(settings, stop, heartbeat, metrics)
    trainer = _start(OnlineTrainer, settings, stop, heartbeat, metrics)
    if isinstance(trainer, int):
        return trainer
    log.info("trainer ready: %s -> %s, lease %s", settings.impressions_topic, settings.store_dir, trainer.lease.epoch)
    try:
        trainer.run(stop.is_set)
    except LeaseLost as err:
        return _step_down(trainer, err)
    except StoredOffsetOutOfRange as err:
        trainer.close()
        return _halt(stop, heartbeat, metrics, str(err))
    return 0 if trainer.shutdown() else 1


def _run_rank(settings: TrainerSettings, stop: threading.Event, heartbeat: Heartbeat, metrics: TrainerMetrics) -> int:
    """One rank of a group (trainer/distributed.py): a failed collective ends it with 1, and the launcher
    restarts the whole group from the last snapshot."""
    from trainer.distributed import GroupTrainer

    trainer = _start(GroupTrainer, settings, stop, heartbeat, metrics)
    if isinstance(trainer, int):
        return trainer
    log.info(
        "rank %d of %d ready: %s -> %s",
        settings.rank,
        settings.world_size,
        settings.impressions_topic,
        settings.store_dir,
    )
    try:
        trainer.run(stop.is_set)
    except LeaseLost as err:
        return _step_down(trainer, err)
    except Exception:
        log.exception("rank %d failed; the group restarts from the last snapshot", settings.rank)
        trainer.close()
        return 1
    try:
        return 0 if trainer.shutdown() else 1
    except Exception:
        log.exception("rank %d: final snapshot failed", settings.rank)
        return 1


def _start(
    kind: type[T], settings: TrainerSettings, stop: threading.Event, heartbeat: Heartbeat, metrics: TrainerMetrics
) -> T | int:
    """The trainer, or the exit code when it cannot start: the lease is held elsewhere, or offsets halt it."""
    try:
        return kind(settings, heartbeat=heartbeat, metrics=metrics)
    except LeaseHeld as err:
        log.critical("not starting: %s", err)
        return EXIT_LEASE_HELD
    except StoredOffsetOutOfRange as err:
        return _halt(stop, heartbeat, metrics, str(err))


def _step_down(trainer: OnlineTrainer, err: LeaseLost) -> int:
    """Another trainer took the store's lease: stop without writing anything."""
    log.critical("stepping down without a snapshot: %s", err)
    trainer.close()
    return EXIT_LEASE_LOST


def _halt(stop: threading.Event, heartbeat: Heartbeat, metrics: TrainerMetrics, reason: str) -> int:
    """Stay up, not training, with `hsnn_trainer_halted` = 1 until SIGTERM: an alert, not a crash loop."""
    log.critical("HALTED, an operator must decide: %s", reason)
    metrics.halted.set(1)
    while not stop.wait(5.0):
        heartbeat.beat()  # halted on purpose, not hung: a restart would only halt again
    return EXIT_HALTED


if __name__ == "__main__":
    sys.exit(main())
