"""CLI: ``python -m devservers up --data-dir DIR`` runs Kafka + Redis until Ctrl-C.

For the demo and for poking at services by hand. The connection settings are
printed to stdout as KEY=value lines (progress goes to stderr), so a script
can capture them; SIGINT/SIGTERM stop both servers cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from devservers._proc import ServerStartError, progress
from devservers.kafka import KafkaServer
from devservers.redis import RedisServer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devservers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Kafka and Redis and wait for Ctrl-C/SIGTERM")
    up.add_argument(
        "--data-dir", type=Path, required=True, help="kept between runs: Kafka restarts with its topics, ports and data"
    )
    up.add_argument("--topics", default="", help="comma-separated topics to create (name or name:compact)")
    up.add_argument("--partitions", type=int, default=1, help="partitions for --topics")
    up.add_argument("--redis-appendonly", action="store_true", help="persist Redis with AOF")
    up.add_argument("--no-kafka", action="store_true")
    up.add_argument("--no-redis", action="store_true")
    return parser.parse_args(argv)


def up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        progress(f"got {signal.Signals(signum).name}, stopping servers")
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    data_dir = args.data_dir.resolve()
    with ExitStack() as stack:
        try:
            if not args.no_kafka:
                kafka = stack.enter_context(KafkaServer(data_dir / "kafka"))
                specs = [t.strip() for t in args.topics.split(",") if t.strip()]
                names = [s.split(":", 1)[0] for s in specs]
                compacted = {s.split(":", 1)[0] for s in specs if s.endswith(":compact")}
                if names:
                    kafka.create_topics(names, partitions=args.partitions, compacted=compacted)
                print(f"KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}", flush=True)
            if not args.no_redis:
                redis = stack.enter_context(RedisServer(data_dir / "redis", appendonly=args.redis_appendonly))
                print(f"REDIS_URL={redis.url}", flush=True)
        except ServerStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        progress("servers up; Ctrl-C or SIGTERM to stop")
        while not stop.wait(1.0):
            pass
    progress("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "up":
        return up(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
