"""`python -m trainer`: run the online trainer until SIGTERM/SIGINT (then final snapshot, exit 0)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from prometheus_client import start_http_server

from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")


def main(argv: list[str] | None = None) -> int:
    settings = TrainerSettings.from_cli(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("kafka").setLevel(logging.ERROR)  # reconnect chatter while a broker restarts
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then a final snapshot", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    trainer = OnlineTrainer(settings)
    log.info("trainer ready: %s -> %s", settings.impressions_topic, settings.store_dir)
    trainer.run(stop.is_set)
    return 0 if trainer.shutdown() else 1


if __name__ == "__main__":
    sys.exit(main())
