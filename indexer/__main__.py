"""`python -m indexer`: run the indexer loop; serve /metrics and /livez (the main loop's heartbeat)."""

from __future__ import annotations

import logging
import signal
import threading

from indexer.service import Indexer
from indexer.settings import IndexerSettings
from streaming.health import serve_metrics_and_liveness


def main(argv: list[str] | None = None) -> None:
    settings = IndexerSettings.from_cli(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    indexer = Indexer(settings)
    if settings.metrics_port:
        serve_metrics_and_liveness(settings.metrics_port, indexer.heartbeat, registry=indexer.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        indexer.run(stop)
    finally:
        indexer.close()


if __name__ == "__main__":
    main()
