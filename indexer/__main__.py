"""`python -m indexer`: run the indexer loop and serve its Prometheus metrics."""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import start_http_server

from indexer.service import Indexer
from indexer.settings import IndexerSettings


def main(argv: list[str] | None = None) -> None:
    settings = IndexerSettings.from_cli(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    indexer = Indexer(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=indexer.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        indexer.run(stop)
    finally:
        indexer.close()


if __name__ == "__main__":
    main()
