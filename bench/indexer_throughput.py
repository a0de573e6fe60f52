"""How long the indexer takes: full rebuilds at catalogue sizes, and item create -> indexed latency.

    python -m bench.indexer_throughput                                   # starts its own Redis and Kafka (devservers)
    python -m bench.indexer_throughput --ads 100000 1000000 --events 500 --rate 200
    python -m bench.indexer_throughput --redis-url redis://127.0.0.1:6379/0 --bootstrap 127.0.0.1:9092

A report, not a test. The model is the tiny planted HSNN (`tiny_hsnn_config`), trained a few steps,
written to a fresh snapshot store and promoted. Then:

1. For each `--ads` size N: write a catalogue of N live ads to Redis, then time `Indexer.rebuild`
   end to end (HSCAN of the catalogue, item tower + LTI paths in batches, `write_index`, pointer
   flip, catch-up, GC). The first `--apply-sample` ads go through `apply_item_events` (the path the
   indexer itself uses, one Lua script per event), the rest are written with pipelined HSETs of the
   same catalogue values, which is much faster and leaves the same `catalog` hash (it skips only
   the `catalog:changes` stream, which a first rebuild does not read). Reports the seconds and
   Redis `used_memory` with the catalogue alone and after the rebuild. Each size uses its own key
   prefix, deleted afterwards.
2. On the index of the first size: the indexer runs its loop (`Indexer.run`) in a thread on a fresh
   items topic. The bench produces `--events` create events at `--rate` per second, each with
   event_time = now, and a watcher polls the current version's delta list in Redis. Latency is the
   time from just before `producer.send` to the first time the watcher sees the ad in the delta.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis as redis_lib
import torch
from kafka import KafkaProducer

from hsnn.model import HSNN
from hsnn.training import train
from indexer.service import Indexer
from indexer.settings import IndexerSettings
from streaming.events import ItemEvent, ItemFeatures, encode, event_key
from streaming.index_store import CatalogEntry, IndexKeys, apply_item_events, current_version
from streaming.snapshots import SnapshotStore
from worlds.planted import make_batches, make_world, tiny_hsnn_config

MIB = 1 << 20


def train_snapshot(store_dir: Path, steps: int, seed: int = 0) -> int:
    """Train the tiny HSNN a few steps on the planted world, write it to a store and promote it."""
    torch.manual_seed(seed)
    world = make_world(num_items=1200, seed=seed)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    train(model, make_batches(world, steps, 128, seed=seed + 1, users_per_batch=32))
    store = SnapshotStore(store_dir)
    version = store.write(model.eval()).version
    store.promote(version)
    return version


def catalogue_values(count: int, first_ad: int = 1, seed: int = 0) -> list[tuple[int, dict]]:
    """(ad id, features as JSON) for `count` ads with planted-world features."""
    world = make_world(num_items=count, seed=seed)
    dense = world.items.dense.tolist()
    advertiser = world.items.sparse["advertiser"].tolist()
    category = world.items.sparse["category"].tolist()
    return [
        (first_ad + i, {"dense": dense[i], "sparse": {"advertiser": advertiser[i], "category": category[i]}})
        for i in range(count)
    ]


def load_catalogue(redis, prefix: str, count: int, apply_sample: int, event_time: float) -> dict[str, float]:
    """Write `count` live ads; the first `apply_sample` through `apply_item_events`, the rest pipelined HSETs."""
    ads = catalogue_values(count)
    sample = min(apply_sample, count)
    started = time.perf_counter()
    for start in range(0, sample, 500):
        events = [
            ItemEvent(op="create", ad_id=ad, event_time=event_time, sequence=1, features=ItemFeatures.model_validate(f))
            for ad, f in ads[start : min(start + 500, sample)]
        ]
        apply_item_events(redis, events, None, prefix)
    applied_s = time.perf_counter() - started
    started = time.perf_counter()
    key = IndexKeys(prefix).catalog
    pipe = redis.pipeline(transaction=False)
    for start in range(sample, count, 5000):
        chunk = ads[start : start + 5000]
        pipe.hset(key, mapping={ad: CatalogEntry(ad, 1, event_time, True, f).value() for ad, f in chunk})
        if len(pipe) >= 10:
            pipe.execute()
    pipe.execute()
    bulk_s = time.perf_counter() - started
    if int(redis.hlen(key)) != count:
        raise RuntimeError(f"catalogue holds {redis.hlen(key)} ads, expected {count}")
    return {
        "apply_events": sample,
        "apply_s": applied_s,
        "apply_per_s": sample / applied_s if applied_s else 0.0,
        "bulk": count - sample,
        "bulk_s": bulk_s,
        "bulk_per_s": (count - sample) / bulk_s if bulk_s else 0.0,
    }


def used_memory(redis) -> int:
    return int(redis.info("memory")["used_memory"])


def delete_prefix(redis, prefix: str) -> None:
    doomed = list(redis.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(doomed), 1000):
        redis.unlink(*doomed[start : start + 1000])
    for _ in range(600):  # UNLINK frees in the background: let used_memory settle before the next size
        if int(redis.info("memory").get("lazyfree_pending_objects", 0)) == 0:
            break
        time.sleep(0.1)


def make_settings(args, work: Path, prefix: str, topic: str = "unused", group: str = "unused") -> IndexerSettings:
    return IndexerSettings(
        redis_url=args.redis_url,
        kafka_bootstrap_servers=args.bootstrap,
        items_topic=topic,
        dlq_topic=f"{topic}-dlq",
        group_id=group,
        store_dir=str(work / "store"),
        key_prefix=prefix,
        batch_size=args.batch_size,
        metrics_port=0,
    )


def bench_rebuild(args, work: Path, redis, tag: str, ads: int) -> tuple[dict, Indexer]:
    prefix = f"bench-{tag}-{ads}:"
    base = used_memory(redis)
    loaded = load_catalogue(redis, prefix, ads, args.apply_sample, time.time())
    catalogue_mem = used_memory(redis)
    indexer = Indexer(make_settings(args, work, prefix), redis=redis)
    pointer = indexer.store.promoted()
    assert pointer is not None
    model, _ = indexer.store.load(pointer.version)
    indexer.model, indexer.model_version = model, pointer.version
    started = time.perf_counter()
    version = indexer.rebuild(model, pointer.version)
    rebuild_s = time.perf_counter() - started
    if version is None or current_version(redis, prefix) != version:
        raise RuntimeError("the rebuild did not flip a new version in")
    meta = json.loads(redis.get(IndexKeys(prefix).meta(version)))
    if meta["num_live"] != ads:
        raise RuntimeError(f"index holds {meta['num_live']} live ads, expected {ads}")
    row = {
        "ads": ads,
        "prefix": prefix,
        "base_mem": base,
        "catalogue_mem": catalogue_mem,
        "index_mem": used_memory(redis),
        "rebuild_s": rebuild_s,
        **loaded,
    }
    return row, indexer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def create_topic(args, kafka_server, topic: str) -> None:
    if kafka_server is not None:
        kafka_server.create_topics([topic, f"{topic}-dlq"], partitions=1)
        return
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{topic}-dlq", 1, 1)])
    admin.close()


class DeltaWatcher(threading.Thread):
    """Polls the current version's delta list and records when each ad id first shows up in it."""

    def __init__(self, redis, prefix: str, interval_s: float = 0.001):
        super().__init__(daemon=True)
        self.redis, self.keys, self.interval_s = redis, IndexKeys(prefix), interval_s
        self.version = current_version(redis, prefix)
        self.seen: dict[int, float] = {}
        self.position = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        key = self.keys.delta(self.version)
        while not self.stop_event.is_set():
            length = int(self.redis.llen(key))
            if length > self.position:
                now = time.time()
                for raw in self.redis.lrange(key, self.position, length - 1):
                    self.seen.setdefault(int(json.loads(raw)["ad_id"]), now)
                self.position = length
            else:
                time.sleep(self.interval_s)

    def wait_for(self, ads: set[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ads <= self.seen.keys():
                return True
            time.sleep(0.01)
        return False


def bench_latency(args, work: Path, redis, kafka_server, row: dict, tag: str) -> dict:
    prefix, first_new = row["prefix"], row["ads"] + 1
    topic = f"bench-items-{tag}"
    create_topic(args, kafka_server, topic)
    indexer = Indexer(make_settings(args, work, prefix, topic, f"bench-indexer-{tag}"), redis=redis)
    stop = threading.Event()
    loop = threading.Thread(target=indexer.run, args=(stop,), daemon=True)
    watcher = DeltaWatcher(redis_lib.Redis.from_url(args.redis_url), prefix)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=0)
    features = [f for _, f in catalogue_values(args.events + 1, seed=1)]

    def send(ad: int, feats: dict) -> float:
        now = time.time()
        event = ItemEvent(
            op="create", ad_id=ad, event_time=now, sequence=1, features=ItemFeatures.model_validate(feats)
        )
        producer.send(topic, key=event_key(event), value=encode(event))
        return now

    loop.start()
    watcher.start()
    try:
        warmup = first_new + args.events  # one event first, so the consumer has joined before timing starts
        send(warmup, features[-1])
        producer.flush()
        if not watcher.wait_for({warmup}, 120):
            raise RuntimeError("the indexer did not index the warm-up event within 120 s")
        histogram = "hsnn_indexer_item_event_to_indexed_seconds"
        before = [indexer.metrics.registry.get_sample_value(f"{histogram}_{s}") or 0.0 for s in ("sum", "count")]
        sent: dict[int, float] = {}
        started = time.perf_counter()
        for i in range(args.events):
            target = started + i / args.rate
            pause = target - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent[first_new + i] = send(first_new + i, features[i])
        producer.flush()
        send_s = time.perf_counter() - started
        complete = watcher.wait_for(set(sent), 120)
        after = [indexer.metrics.registry.get_sample_value(f"{histogram}_{s}") or 0.0 for s in ("sum", "count")]
    finally:
        stop.set()
        watcher.stop_event.set()
        loop.join(timeout=30)
        watcher.join(timeout=5)
        producer.close()
        indexer.close()
    latencies = [watcher.seen[ad] - t for ad, t in sent.items() if ad in watcher.seen]
    observed = after[1] - before[1]
    return {
        "events": args.events,
        "rate": args.events / send_s,
        "seen": len(latencies),
        "complete": complete,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "mean": sum(latencies) / len(latencies),
        "histogram_mean": (after[0] - before[0]) / observed if observed else float("nan"),
        "histogram_count": int(observed),
        "index_ads": row["ads"],
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def report(args, rows: list[dict], latency: dict | None, command: str) -> str:
    lines = [
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {machine()}, torch threads {torch.get_num_threads()}, "
        f"rebuild batch {args.batch_size}.",
        "",
        "| ads | catalogue load | rebuild (`Indexer.rebuild`) | used_memory: catalogue | used_memory: + index |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        load_s = r["apply_s"] + r["bulk_s"]
        catalogue, total = (r["catalogue_mem"] - r["base_mem"]) / MIB, (r["index_mem"] - r["base_mem"]) / MIB
        lines.append(
            f"| {r['ads']:,} | {load_s:.1f} s | {r['rebuild_s']:.1f} s | {catalogue:,.0f} MiB | {total:,.0f} MiB |"
        )
    lines.append("")
    r = rows[-1]
    lines.append(
        f"Catalogue load: {r['apply_events']:,} ads through `apply_item_events` ({r['apply_per_s']:,.0f} ads/s), "
        f"the rest with pipelined HSETs ({r['bulk_per_s']:,.0f} ads/s, at {r['ads']:,} ads). "
        "Memory is `INFO memory` used_memory above the empty server."
    )
    if latency is not None:
        lines += [
            "",
            "| create events | rate | indexed p50 | p99 | max |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {latency['events']} | {latency['rate']:.0f}/s | {1e3 * latency['p50']:.1f} ms | "
            f"{1e3 * latency['p99']:.1f} ms | {1e3 * latency['max']:.1f} ms |",
            "",
            f"Send to first seen in `idx:{{v}}:delta`, over an index of {latency['index_ads']:,} ads; "
            f"{latency['seen']}/{latency['events']} seen. The indexer's own histogram "
            f"(event time to Redis write) has mean {1e3 * latency['histogram_mean']:.1f} ms over "
            f"{latency['histogram_count']} events (the watcher's mean: {1e3 * latency['mean']:.1f} ms).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.indexer_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--redis-url", help="a running Redis; default: start one with devservers")
    parser.add_argument("--bootstrap", help="a running Kafka broker; default: start one with devservers")
    parser.add_argument("--ads", type=int, nargs="+", default=[100_000, 1_000_000], help="catalogue sizes")
    parser.add_argument("--apply-sample", type=int, default=10_000, help="ads loaded through apply_item_events")
    parser.add_argument("--events", type=int, default=500, help="create events for the latency run (0: skip)")
    parser.add_argument("--rate", type=float, default=200.0, help="create events per second")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8192, help="the indexer's rebuild batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m bench.indexer_throughput " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("redis_url", "bootstrap")
    )

    work = Path(tempfile.mkdtemp(prefix="indexer-bench-"))
    redis_server = kafka_server = None
    try:
        if args.redis_url is None:
            from devservers import RedisServer

            redis_server = RedisServer(work / "redis").start()
            args.redis_url = redis_server.url
        if args.bootstrap is None and args.events > 0:
            from devservers import KafkaServer

            kafka_server = KafkaServer(work / "kafka").start()
            args.bootstrap = kafka_server.bootstrap_servers
        redis = redis_lib.Redis.from_url(args.redis_url)
        tag = uuid.uuid4().hex[:6]
        version = train_snapshot(work / "store", args.train_steps)
        print(f"snapshot {version} promoted; Redis {args.redis_url}, Kafka {args.bootstrap}", flush=True)
        rows: list[dict] = []
        latency = None
        for i, ads in enumerate(args.ads):
            row, _ = bench_rebuild(args, work, redis, tag, ads)
            rows.append(row)
            print(
                f"{ads:,} ads: load {row['apply_s'] + row['bulk_s']:.1f}s, rebuild {row['rebuild_s']:.1f}s, "
                f"used_memory {row['index_mem'] / MIB:,.0f} MiB",
                flush=True,
            )
            if i == 0 and args.events > 0:
                latency = bench_latency(args, work, redis, kafka_server, row, tag)
                print(f"latency p50 {1e3 * latency['p50']:.1f} ms, p99 {1e3 * latency['p99']:.1f} ms", flush=True)
            delete_prefix(redis, row["prefix"])
        print()
        print(report(args, rows, latency, command))
    finally:
        if kafka_server is not None:
            kafka_server.stop()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
