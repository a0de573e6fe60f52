"""E2: broker SIGKILLs and restarts while ad systems post authenticated item batches to the API.

    python -m chaos e2                          # 3 kills, 4 posters of 200-event batches
    python -m chaos e2 --ads 2000 --batch 100   # the scaled run

The broker (devservers), Redis, the indexer (`python -m indexer`) and the API (`python -m
retrieval_api`) run as processes. `--posters` clients post batches back to back, creates first and
then updates (rising `sequence`), and retry a batch that was not answered 202, as an ad system
would. The broker is SIGKILLed `--kills` times, each time restarted `--down` seconds later on the
same data. Posting goes on until the last restart has taken a batch. Pass: every event answered
202 is in the items topic at the partition and offset the API returned, after recovery the Redis
catalogue holds every acknowledged ad at a version at least the acknowledged one, every batch was
answered (202 or 503: no other 5xx), and the indexer never restarted. A batch answered 503 may
still have been written in part, so its retry can copy records (counted as duplicated; the indexer
applies them idempotently by sequence).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from kafka.errors import KafkaError

from chaos.e3_redis_faults import planted_ads
from chaos.harness import (
    api_service,
    create_topics,
    end_offsets,
    indexer_service,
    kill_broker,
    read_topic,
    wait_for,
)
from chaos.report import ExperimentResult, add_item_post_options, experiment_parser, loop_result, parse_loop_args
from chaos.world import BEAMS, free_port, item_batch_bodies, post_items
from indexer.catalogue_offsets import read_catalogue_offsets
from streaming.events import ItemEvent, decode_item
from streaming.index_store import catalog_entry
from streaming.snapshots import SnapshotStore

TOKEN = "chaos-e2-token"
T = TypeVar("T")


def batch_events(ads: list[ItemEvent], number: int, size: int) -> list[ItemEvent]:
    """Batch `number`: the next `size` ads in turn; the first round creates them, later rounds update them."""
    events = []
    for i in range(number * size, (number + 1) * size):
        base = ads[i % len(ads)]
        sequence = 1 + i // len(ads)
        op = "create" if sequence == 1 else "update"
        events.append(base.model_copy(update={"op": op, "sequence": sequence, "event_time": 1.7e9 + sequence}))
    return events


def post_under_faults(url: str, ads: list[ItemEvent], kafka: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Posters (an event loop on a thread) while this thread kills and restarts the broker.

    The broker is started from this thread: devservers ties a server's life to the thread that started it.
    """
    acknowledged: dict[tuple[int, int], tuple[int, int]] = {}  # (ad, sequence) -> (partition, offset)
    statuses: Counter[int] = Counter()
    pending: list[int] = []  # batches to retry
    next_batch = 0
    faults: list[str] = []
    done = threading.Event()
    accepted = threading.Event()  # a batch was answered 202 since the last restart

    async def poster(client: httpx.AsyncClient) -> None:
        nonlocal next_batch
        while not (done.is_set() and not pending):
            if pending:
                number = pending.pop(0)
            elif done.is_set():
                return
            else:
                number, next_batch = next_batch, next_batch + 1
            events = batch_events(ads, number, args.batch)
            body = item_batch_bodies(events, args.batch)[0]
            status, _, answer = await post_items(client, body, TOKEN, read_202=True)
            statuses[status] += 1
            if status == 202:
                for event, record in zip(events, answer["records"], strict=True):
                    assert record["ad_id"] == event.ad_id
                    acknowledged[(event.ad_id, event.sequence)] = (record["partition"], record["offset"])
                accepted.set()
            else:
                pending.append(number)
                await asyncio.sleep(args.retry_pause)

    async def posters() -> None:
        limits = httpx.Limits(max_connections=args.posters, max_keepalive_connections=args.posters)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            await asyncio.gather(*(poster(client) for _ in range(args.posters)))

    thread = threading.Thread(target=asyncio.run, args=(posters(),), name="chaos-e2-posters", daemon=True)
    thread.start()
    try:
        for kill in range(args.kills):
            time.sleep(args.gap)
            kill_broker(kafka)
            faults.append(f"SIGKILL {kill + 1}")
            time.sleep(args.down)
            accepted.clear()
            kafka.start()
            if not accepted.wait(args.timeout):
                raise TimeoutError(f"no item batch was acknowledged within {args.timeout:g}s of restart {kill + 1}")
    finally:
        done.set()
        thread.join(args.timeout)
    return {"acknowledged": acknowledged, "statuses": statuses, "faults": faults, "batches": next_batch}


def run(args: argparse.Namespace) -> ExperimentResult:
    from devservers import KafkaServer, RedisServer

    if args.bootstrap:
        raise SystemExit("e2 kills its broker: it starts its own (no --bootstrap)")
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e2-"))
    started = time.monotonic()
    model, ads = planted_ads(args.ads, args.seed)
    tag = uuid.uuid4().hex[:6]
    topics = (f"e2-items-{tag}", f"e2-items-dlq-{tag}")
    prefix = f"e2-{tag}:"
    store = SnapshotStore(work / "store")
    store.promote(store.write(model).version)
    kafka = KafkaServer(work / "kafka").start()
    redis_server = RedisServer(work / "redis").start()
    client = redis_server.client(socket_timeout=5)
    bootstrap = kafka.bootstrap_servers
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = work / "logs"
    indexer = indexer_service(redis_server.url, bootstrap, topics, f"e2-{tag}", store, prefix, logs)
    api = api_service(
        store,
        logs,
        port,
        (bootstrap, topics[0], TOKEN),
        beams=BEAMS,
        redis_url=redis_server.url,
        key_prefix=prefix,
        kafka_ack_timeout_s=args.ack_timeout,
    )
    try:
        create_topics(bootstrap, [topics[0]], args.partitions, compacted=[topics[0]])
        create_topics(bootstrap, [topics[1]], 1)
        indexer.start()
        api.start()
        wait_for(lambda: _answers(url), 120, "the API listening", 0.2)
        outcome = post_under_faults(url, ads, kafka, args)
        end = _settled(lambda: end_offsets(bootstrap, topics[0]), args.timeout)  # leaders may still be electing
        wait_for(
            lambda: read_catalogue_offsets(client, topics[0], prefix) == end,
            args.timeout,
            "the indexer at the end of the items topic",
            0.5,
        )
        records = _settled(lambda: read_topic(bootstrap, topics[0]), args.timeout)
        catalogue = {ad: catalog_entry(client, ad, prefix) for ad, _ in outcome["acknowledged"]}
        indexer_up = indexer.alive and indexer.starts == 1
        api_up = api.alive
        indexer_code, api_code = indexer.stop(timeout=30), api.stop(timeout=30)
    finally:
        for service in (api, indexer):
            if service.alive:
                service.kill()
        client.close()
        redis_server.stop()
        kafka.stop()
    at = {(r.partition, r.offset): decode_item(r.value) for r in records}
    acknowledged = outcome["acknowledged"]
    not_in_topic = [
        key for key, pos in acknowledged.items() if pos not in at or (at[pos].ad_id, at[pos].sequence) != key
    ]
    not_in_redis = [(ad, seq) for ad, seq in acknowledged if catalogue.get(ad) is None or catalogue[ad].sequence < seq]
    copies = Counter((e.ad_id, e.sequence) for e in at.values())
    statuses = outcome["statuses"]
    checks = {
        "every_202_in_the_topic": not not_in_topic,
        "every_202_in_redis": not not_in_redis,
        "kills_landed_during_posts": len(outcome["faults"]) == args.kills,
        "only_202_or_503": set(statuses) <= {202, 503},
        "indexer_never_restarted": indexer_up,
        "api_stayed_up": api_up,
    }
    details = {
        "faults": ", ".join(outcome["faults"]),
        "batches": outcome["batches"],
        "events_acknowledged": len(acknowledged),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "acknowledged_not_in_topic": not_in_topic[:20],
        "acknowledged_not_in_redis": not_in_redis[:20],
        "topic_records": len(records),
        "exit_codes": {"indexer": indexer_code, "api": api_code},
        "topic_copies_beyond_first": sum(n - 1 for n in copies.values()),
        "seconds": round(time.monotonic() - started, 1),
    }
    title = f"broker SIGKILL + restart x{args.kills} during authenticated item posts (retried on 503)"
    result = loop_result(
        args,
        "e2",
        title,
        started,
        work,
        checks,
        details,
        faults_injected=len(outcome["faults"]),
        lost=len(set(not_in_topic) | set(not_in_redis)),
        duplicated=details["topic_copies_beyond_first"],
    )
    result.http_5xx = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
    return result


def _settled(read: Callable[[], T], timeout: float) -> T:
    """`read()` once the restarted broker answers it (a partition without a leader yet raises)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/livez", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def parse(argv: list[str]) -> argparse.Namespace:
    parser = experiment_parser("e2", __doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--ads", type=int, default=4000, help="distinct ads; later batches update them")
    add_item_post_options(parser, posters=4, batch=200, posters_help="concurrent item posters")
    parser.add_argument("--gap", type=float, default=4.0, help="seconds of posting before each kill")
    parser.add_argument("--down", type=float, default=2.0, help="seconds the broker stays dead")
    parser.add_argument("--retry-pause", type=float, default=0.2, help="seconds before a poster retries a batch")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    return parse_loop_args(parser, "e2", argv)
