"""python -m feed: stream the marketplace simulator into Kafka (see feed/feed.py and docs/simulator.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feed.feed import FeedConfig, missing_topics, run_feed
from streaming.events import IMPRESSIONS_TOPIC, ITEMS_TOPIC
from worlds.simulator import MarketplaceConfig


def parse_args(argv: list[str] | None = None) -> FeedConfig:
    parser = argparse.ArgumentParser(prog="python -m feed", description="Stream simulated ad events into Kafka.")
    parser.add_argument(
        "--kafka-bootstrap-servers",
        "--bootstrap",
        dest="bootstrap",
        default="127.0.0.1:9092",
        help="Kafka brokers, comma separated (the services\x27 kafka_bootstrap_servers; --bootstrap is the old name)",
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="records per second (0: unlimited)")
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=10_000, help="live ads (simulator slots)")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malformed-rate", type=float, default=0.0, help="extra malformed records per record")
    parser.add_argument("--items-topic", default=ITEMS_TOPIC)
    parser.add_argument("--impressions-topic", default=IMPRESSIONS_TOPIC)
    parser.add_argument("--partitions", type=int, default=1, help="partitions of topics the feed creates")
    parser.add_argument("--no-create-topics", action="store_true", help="fail if a topic is missing")
    parser.add_argument("--config", type=Path, help="MarketplaceConfig JSON (replaces the --ads/--users sizing)")
    parser.add_argument("--no-progress", action="store_true")
    options = vars(parser.parse_args(argv))  # the option names are FeedConfig's, but for these three:
    config_path = options.pop("config")
    create_topics = not options.pop("no_create_topics")
    progress = not options.pop("no_progress")
    marketplace = None
    if config_path is not None:
        marketplace = MarketplaceConfig.model_validate(json.loads(config_path.read_text()))
    return FeedConfig(**options, create_topics=create_topics, progress=progress, marketplace=marketplace)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if not config.create_topics:
        missing = missing_topics(config)
        if missing:
            print(f"topics missing and --no-create-topics given: {', '.join(missing)}", file=sys.stderr)
            return 2
    stats = run_feed(config)
    print(stats.summary(), file=sys.stderr)
    for error in stats.errors:
        print(f"  {error}", file=sys.stderr)
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
