"""E6: 900 KB malformed records on both topics while the trainer and the indexer run.

    python -m chaos e6                       # 10 huge records per topic among 5,000 impressions
    python -m chaos e6 --huge 3 --impressions 1500   # the scaled run

Pass: every huge record is dead-lettered (a letter far below the broker's limit, keeping the
original's length and sha256), the trainer writes a snapshot past them before any shutdown, the
indexer never restarts and indexes the ads created after them, and every good impression is
trained or held out exactly once.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.trainer_throughput import make_events
from chaos.harness import (
    Service,
    create_topics,
    end_offsets,
    indexer_service,
    kafka_bootstrap,
    produce,
    read_topic,
    wait_for,
)
from chaos.report import ExperimentResult, experiment_parser, loop_result, parse_loop_args
from indexer.catalogue_offsets import read_catalogue_offsets
from streaming.events import encode, event_key, read_dead_letter
from streaming.index_store import catalog_entry
from streaming.snapshots import SnapshotStore
from trainer.bookkeeping import consumed_ids, is_held_out
from worlds.planted import tiny_hsnn_config

HOLDOUT = 20
HUGE_BYTES = 900 * 1024


def huge_record(i: int) -> bytes:
    """900 KB that is JSON-shaped but no valid event (an unknown field padded out)."""
    head = b'{"schema_version": 1, "padding_' + str(i).encode() + b'": "'
    return head + b"x" * (HUGE_BYTES - len(head) - 2) + b'"}'


def run(args: argparse.Namespace) -> ExperimentResult:
    from devservers import RedisServer

    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e6-"))
    started = time.monotonic()
    items, impressions = make_events(args.impressions, args.ads, seed=args.seed)
    late_items, _ = make_events(0, args.ads + args.late_ads, seed=args.seed + 1)
    late_items = late_items[args.ads :]  # ads created after the huge records
    tag = uuid.uuid4().hex[:6]
    topics = {k: f"e6-{k}-{tag}" for k in ("impressions", "items", "impressions-dlq", "items-dlq")}
    prefix = f"e6-{tag}:"
    config = work / "hsnn.json"
    config.write_text(tiny_hsnn_config().model_dump_json())
    store = SnapshotStore(work / "store")
    ids_path = work / "trained-ids.txt"
    redis_server = RedisServer(work / "redis").start()
    client = redis_server.client(socket_timeout=5)
    services: list[Service] = []
    try:
        with kafka_bootstrap(work, args.bootstrap) as bootstrap:
            create_topics(bootstrap, list(topics.values()), args.partitions, compacted=[topics["items"]])
            produce(bootstrap, topics["items"], [(event_key(e), encode(e)) for e in items])
            half = len(impressions) // 2
            produce(bootstrap, topics["impressions"], [(event_key(e), encode(e)) for e in impressions[:half]])
            trainer = Service(
                "trainer",
                "HSNN_TRAINER_",
                {
                    "kafka_bootstrap_servers": bootstrap,
                    "group_id": f"e6-{tag}",
                    "impressions_topic": topics["impressions"],
                    "items_topic": topics["items"],
                    "impressions_dlq_topic": topics["impressions-dlq"],
                    "items_dlq_topic": topics["items-dlq"],
                    "store_dir": store.root,
                    "model_config_path": config,
                    "batch_size": 256,
                    "max_poll_records": 256,
                    "holdout_one_in": HOLDOUT,
                    "eval_min_events": 20,
                    "metrics_port": 0,
                    "trained_ids_path": ids_path,
                    "snapshot_every_events": max(100, args.impressions // 6),
                    "snapshot_every_seconds": 2,
                },
                work / "logs",
            )
            pair = (topics["items"], topics["items-dlq"])
            logs = work / "logs"
            indexer = indexer_service(redis_server.url, bootstrap, pair, f"e6-{tag}", store, prefix, logs)
            services = [trainer, indexer]
            trainer.start()
            indexer.start()
            wait_for(lambda: store.promoted() is not None, args.timeout, "a promoted snapshot", 0.2)

            huge = [huge_record(i) for i in range(args.huge)]
            keyed = [(f"huge-{i}".encode(), v) for i, v in enumerate(huge)]
            huge_imp = produce(bootstrap, topics["impressions"], keyed)
            huge_items = produce(bootstrap, topics["items"], keyed)
            produce(bootstrap, topics["impressions"], [(event_key(e), encode(e)) for e in impressions[half:]])
            produce(bootstrap, topics["items"], [(event_key(e), encode(e)) for e in late_items])
            end = {str(p): o for p, o in end_offsets(bootstrap, topics["impressions"]).items()}
            items_end = end_offsets(bootstrap, topics["items"])

            def snapshot_past_the_huge_records() -> bool:
                version = store.latest_version()
                return version is not None and store.manifest(version).offsets.get(topics["impressions"]) == end

            wait_for(snapshot_past_the_huge_records, args.timeout, "a snapshot at the log end", 0.5)
            wait_for(
                lambda: read_catalogue_offsets(client, topics["items"], prefix) == items_end,
                args.timeout,
                "the indexer past the huge items",
                0.5,
            )
            late_indexed = sum(catalog_entry(client, e.ad_id, prefix) is not None for e in late_items)
            indexer_up = indexer.alive and indexer.starts == 1
            trainer_up = trainer.alive and trainer.starts == 1
            trainer_code = trainer.stop()
            indexer_code = indexer.stop()
            letters = {
                "impressions": [read_dead_letter(r.value) for r in read_topic(bootstrap, topics["impressions-dlq"])],
                "items": [read_dead_letter(r.value) for r in read_topic(bootstrap, topics["items-dlq"])],
            }
            letter_bytes = max(
                (len(r.value) for t in ("impressions-dlq", "items-dlq") for r in read_topic(bootstrap, topics[t])),
                default=0,
            )
    finally:
        for service in services:
            if service.alive:
                service.kill()
        client.close()
        redis_server.stop()
    digests = {hashlib.sha256(v).hexdigest() for v in huge}

    def letters_cover(found: list[Any], positions: list[tuple[int, int]]) -> bool:
        by_position = {(lt.partition, lt.offset): lt for lt in found}
        return all(
            pos in by_position
            and by_position[pos].raw_truncated
            and by_position[pos].raw_length == HUGE_BYTES
            and by_position[pos].raw_sha256 in digests
            for pos in positions
        )

    trained = consumed_ids(ids_path)
    good = {e.event_id for e in impressions}
    held_out = {e for e in good if is_held_out(e, HOLDOUT)}
    lost = len(good - set(trained) - held_out)
    duplicated = len(trained) - len(set(trained))
    checks = {
        "huge_impressions_dead_lettered": letters_cover(letters["impressions"], huge_imp),
        "huge_items_dead_lettered": letters_cover(letters["items"], huge_items),
        "letters_small": 0 < letter_bytes < 64 * 1024,
        "snapshot_past_them_while_running": trainer_up,
        "indexer_never_restarted": indexer_up,
        "ads_after_them_indexed": late_indexed == len(late_items),
        "every_good_impression_once": lost == 0 and duplicated == 0 and not (set(trained) & held_out),
        "clean_exits": trainer_code == 0 and indexer_code == 0,
    }
    details = {
        "faults": f"{args.huge} x 900 KB per topic",
        "largest_letter_bytes": letter_bytes,
        "impressions": len(good),
        "trained": len(set(trained)),
        "held_out": len(held_out),
        "snapshots_written": store.latest_version(),
        "seconds": round(time.monotonic() - started, 1),
    }
    title = "900 KB malformed records on hsnn.impressions and hsnn.items"
    return loop_result(
        args,
        "e6",
        title,
        started,
        work,
        checks,
        details,
        faults_injected=2 * args.huge,
        lost=lost,
        duplicated=duplicated,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = experiment_parser("e6", __doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=5_000)
    parser.add_argument("--huge", type=int, default=10, help="900 KB records per topic")
    parser.add_argument("--ads", type=int, default=300)
    parser.add_argument("--late-ads", type=int, default=20, help="ads created after the huge records")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    return parse_loop_args(parser, "e6", argv)
