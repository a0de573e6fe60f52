"""E3: Redis kill -9 (AOF on) and, separately, FLUSHALL while the indexer applies an item feed.

    python -m chaos e3                       # 20,000 ads in 4 parts, kill -9 after part 2, FLUSHALL after part 3
    python -m chaos e3 --ads 2000            # the scaled run

A sampler reads the index pointer every 20 ms, as an API replica would. Pass: the catalogue in Redis
converges to a replay of hsnn.items (same ads, same versions), the final index holds every live ad,
no index version that went live ever held fewer live ads than one before it (the feed only adds and
updates), and the indexer process stayed up through both faults.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis as redis_lib
import torch

from chaos.harness import create_topics, indexer_service, kafka_bootstrap, produce, wait_for
from chaos.report import ExperimentResult, experiment_parser, loop_result, parse_loop_args
from hsnn.model import HSNN
from hsnn.training import train
from streaming.events import ItemEvent, ItemFeatures, encode, event_key, supersedes
from streaming.index_store import current_version, load_index, read_catalog, read_meta
from streaming.snapshots import SnapshotStore
from worlds.planted import make_batches, make_world, tiny_hsnn_config


class PointerSampler(threading.Thread):
    """Records (index version, live ads) each time the pointer changes; survives Redis being away."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.url, self.prefix = url, prefix
        self.seen: list[tuple[int, int]] = []
        self.unreachable = 0
        self.stop = threading.Event()

    def run(self) -> None:
        client = redis_lib.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        while not self.stop.wait(0.02):
            try:
                version = current_version(client, self.prefix)
                if version is not None and (not self.seen or self.seen[-1][0] != version):
                    self.seen.append((version, int(read_meta(client, version, self.prefix)["num_live"])))
            except (redis_lib.RedisError, KeyError, LookupError, ValueError):
                self.unreachable += 1


def planted_ads(ads: int, seed: int) -> tuple[HSNN, list[ItemEvent]]:
    """Ads of the planted world and a tiny HSNN trained a few steps on it.

    The index builder refuses an unbalanced index, and an untrained LTI puts most ads in a few nodes.
    """
    world = make_world(num_items=ads, seed=seed)
    torch.manual_seed(seed)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    train(model, make_batches(world, 4, 128, seed=seed, users_per_batch=32))
    events = [
        ItemEvent(
            op="create",
            ad_id=int(world.item_ids[row]),
            event_time=1.7e9,
            sequence=1,
            features=ItemFeatures(
                dense=world.items.dense[row].tolist(),
                sparse={name: int(world.items.sparse[name][row]) for name in ("advertiser", "category")},
            ),
        )
        for row in range(ads)
    ]
    return model.eval(), events


def expected_catalogue(events: list[ItemEvent]) -> dict[int, tuple[int, float]]:
    """ad -> (sequence, event time) after applying every event in log order: what a replay yields."""
    newest: dict[int, ItemEvent] = {}
    for event in events:
        if supersedes(event, newest.get(event.ad_id)):
            newest[event.ad_id] = event
    return {ad: (e.sequence, e.event_time) for ad, e in newest.items()}


def run(args: argparse.Namespace) -> ExperimentResult:
    from devservers import RedisServer

    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e3-"))
    started = time.monotonic()
    model, items = planted_ads(args.ads, args.seed)
    updates = [
        e.model_copy(update={"op": "update", "sequence": 2, "event_time": e.event_time + 1})
        for e in items[:: max(1, len(items) // (args.ads // 10 or 1))]
    ]
    feed = items + updates
    parts = [feed[i::4] for i in range(4)]
    tag = uuid.uuid4().hex[:6]
    topics = {"items": f"e3-items-{tag}", "dlq": f"e3-items-dlq-{tag}"}
    prefix = f"e3-{tag}:"
    torch.manual_seed(args.seed)
    store = SnapshotStore(work / "store")
    store.promote(store.write(model).version)
    redis_server = RedisServer(work / "redis", appendonly=True).start()
    client = redis_server.client(socket_timeout=5)
    faults: list[str] = []
    indexer = None
    sampler = PointerSampler(redis_server.url, prefix)
    try:
        with kafka_bootstrap(work, args.bootstrap) as bootstrap:
            create_topics(bootstrap, [topics["items"]], args.partitions, compacted=[topics["items"]])
            create_topics(bootstrap, [topics["dlq"]], 1)
            pair = (topics["items"], topics["dlq"])
            logs = work / "logs"
            timeouts = {"redis_socket_timeout_s": 2, "redis_connect_timeout_s": 1}
            indexer = indexer_service(redis_server.url, bootstrap, pair, f"e3-{tag}", store, prefix, logs, **timeouts)
            indexer.start()
            sampler.start()

            def served_live() -> int:
                """Live ads a reader of the pointer gets: the index version plus its delta."""
                try:
                    return int(load_index(client, model, prefix=prefix).index.live.sum())
                except (redis_lib.RedisError, LookupError):
                    return -1

            sent: list[ItemEvent] = []
            for number, part in enumerate(parts):
                produce(bootstrap, topics["items"], [(event_key(e), encode(e)) for e in part])
                sent += part
                live_now = len({e.ad_id for e in sent})
                if number == 1:  # kill -9 while the indexer is busy with this part
                    time.sleep(args.fault_delay)
                    os.kill(redis_server.pid, signal.SIGKILL)
                    faults.append("redis kill -9")
                    time.sleep(2.0)
                    redis_server.start()  # same data dir: AOF replay
                elif number == 2:
                    time.sleep(args.fault_delay)
                    client.flushall()
                    faults.append("FLUSHALL")
                wait_for(lambda n=live_now: served_live() == n, args.timeout, f"the index to serve {live_now} ads", 1.0)
            converged_at = time.monotonic() - started
            catalogue = {e.ad_id: (e.sequence, e.event_time) for e in read_catalog(client, prefix, live_only=False)}
            served_at_end = served_live()
            indexer_alive = indexer.alive and indexer.starts == 1
            exit_code = indexer.stop(timeout=30)
    finally:
        sampler.stop.set()
        if indexer is not None and indexer.alive:
            indexer.kill()
        client.close()
        redis_server.stop()
    expected = expected_catalogue(feed)
    live_counts = [n for _, n in sampler.seen]
    shrinks = sum(1 for a, b in itertools.pairwise(live_counts) if b < a)
    missing = len(set(expected) - set(catalogue))
    wrong_version = sum(1 for ad, v in expected.items() if ad in catalogue and catalogue[ad] != v)
    checks = {
        "catalogue_equals_replay": catalogue == expected,
        "final_index_serves_every_ad": served_at_end == len(expected),
        "no_shrunken_index_went_live": shrinks == 0,
        "indexer_stayed_up": indexer_alive,
    }
    details = {
        "faults": ", ".join(faults),
        "ads": len(expected),
        "item_events": len(feed),
        "catalogue_wrong_versions": wrong_version,
        "index_versions_seen": sampler.seen,
        "pointer_unreadable_samples": sampler.unreachable,
        "indexer_exit_code": exit_code,
        "seconds_to_converge": round(converged_at, 1),
    }
    title = "Redis kill -9 (AOF) and FLUSHALL under the indexer"
    return loop_result(
        args,
        "e3",
        title,
        started,
        work,
        checks,
        details,
        faults_injected=len(faults),
        lost=missing,
        duplicated=0,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = experiment_parser("e3", __doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--fault-delay", type=float, default=0.3, help="seconds after a part is sent to the fault")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for the index to converge")
    return parse_loop_args(parser, "e3", argv)
