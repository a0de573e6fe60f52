"""Throughput of the online trainer, end to end from Kafka.

    python -m trainer.bench --events 20000                         # starts its own broker (devservers)
    python -m trainer.bench --bootstrap 127.0.0.1:9092 --events 20000

Produces N impressions (and the ads they reference) to fresh topics, runs an OnlineTrainer
until it has drained them, and prints events/s plus where the time went: Kafka poll, items
catch-up, decode + routing, batch build (impressions_to_batch), train step, snapshot.
The model is HSNN on the planted schema with MoNN-Small as the item model; `--levels` picks
the per-level models (default: the HSNNConfig defaults, MoNN-Large then MoNN-Medium).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from pathlib import Path

import torch
from kafka import KafkaProducer

from hsnn.config import HSNNConfig, LTIConfig, preset
from hsnn.events import (
    Engagement,
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    Labels,
    UserFeatures,
    encode,
    event_key,
)
from hsnn.planted import SCHEMA
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings


def make_events(count: int, ads: int, seed: int = 0) -> tuple[list[ItemEvent], list[ImpressionEvent]]:
    g = torch.Generator().manual_seed(seed)
    items = [
        ItemEvent(
            op="create",
            ad_id=ad,
            event_time=1.7e9,
            sequence=1,
            features=ItemFeatures(
                dense=torch.randn(4, generator=g).tolist(), sparse={"advertiser": ad % 97 + 1, "category": ad % 13 + 1}
            ),
        )
        for ad in range(1, ads + 1)
    ]
    ad_ids = torch.randint(1, ads + 1, (count,), generator=g).tolist()
    clicks = (torch.rand(count, generator=g) < 0.1).long().tolist()
    impressions = []
    for i, (ad, click) in enumerate(zip(ad_ids, clicks, strict=True)):
        history = [
            Engagement(attributes={"item_id": h, "advertiser": h % 97 + 1, "category": h % 13 + 1}, age_hours=float(j))
            for j, h in enumerate(((ad * 7 + i) % ads + 1, (ad * 13 + i) % ads + 1, ad))
        ]
        impressions.append(
            ImpressionEvent(
                event_id=f"bench-{i}",
                event_time=1.7e9 + i * 0.001,
                user=UserFeatures(
                    dense=[0.1, -0.2], sparse={"segment": [i % 32 + 1], "age_bucket": [i % 8]}, history=history
                ),
                ad_id=ad,
                labels=Labels(click=click, conversion=0),
            )
        )
    return items, impressions


def bench_config(levels: str) -> HSNNConfig:
    if levels == "default":
        level_models = [preset("monn_large"), preset("monn_medium")]
    else:
        level_models = [preset(levels), preset(levels)]
    return HSNNConfig(
        features=SCHEMA,
        levels=[LTIConfig(num_nodes=16), LTIConfig(num_nodes=8)],
        level_models=level_models,
        item_model=preset("monn_small"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="a running broker; default: start one with devservers")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--ads", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--levels", default="default", help="'default' (large, medium) or a preset name for both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    server = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        from devservers import KafkaServer

        server = KafkaServer(work / "kafka").start()
        bootstrap = server.bootstrap_servers
    try:
        tag = uuid.uuid4().hex[:6]
        topics = {k: f"bench-{k}-{tag}" for k in ("imp", "items", "dlq", "items-dlq")}
        admin_server = server
        if admin_server is None:
            from kafka.admin import KafkaAdminClient, NewTopic

            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.create_topics(
                [NewTopic(t, args.partitions, 1) for t in topics.values() if t != topics["items"]]
                + [NewTopic(topics["items"], args.partitions, 1, topic_configs={"cleanup.policy": "compact"})]
            )
            admin.close()
        else:
            admin_server.create_topics(list(topics.values()), partitions=args.partitions, compacted=[topics["items"]])
        items, impressions = make_events(args.events, args.ads)
        t0 = time.perf_counter()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 18)
        for event in items:
            producer.send(topics["items"], key=event_key(event), value=encode(event))
        for event in impressions:
            producer.send(topics["imp"], key=event_key(event), value=encode(event))
        producer.flush()
        producer.close()
        print(f"produced {args.events} impressions + {args.ads} ads in {time.perf_counter() - t0:.1f}s")

        config_path = work / "hsnn.json"
        config_path.write_text(bench_config(args.levels).model_dump_json())
        settings = TrainerSettings(
            bootstrap_servers=bootstrap,
            impressions_topic=topics["imp"],
            items_topic=topics["items"],
            impressions_dlq_topic=topics["dlq"],
            items_dlq_topic=topics["items-dlq"],
            store_dir=str(work / "store"),
            model_config_path=str(config_path),
            batch_size=args.batch_size,
            max_poll_records=args.batch_size * 2,
            metrics_port=0,
            snapshot_every_seconds=1e9,
            snapshot_every_events=10**12,
        )
        trainer = OnlineTrainer(settings)
        trainer.catch_up_items()
        started = time.perf_counter()
        trainer.run(lambda: sum(trainer.offsets.topic(topics["imp"]).values()) >= args.events, max_idle_polls=50)
        drained = time.perf_counter() - started
        trainer.maybe_snapshot(force=True)
        total = time.perf_counter() - started
        trainer.close()
        t = trainer.timings
        print(f"threads={torch.get_num_threads()} batch={args.batch_size} levels={args.levels} item=monn_small")
        print(f"drained {args.events} events in {drained:.2f}s: {args.events / drained:,.0f} events/s")
        print(f"with the final snapshot: {total:.2f}s ({args.events / total:,.0f} events/s)")
        for name in ("poll", "items", "decode", "batch", "train", "snapshot"):
            seconds = getattr(t, name)
            share = 100 * seconds / total
            print(f"  {name:<9}{seconds:7.2f}s  {share:5.1f}%  {1e6 * seconds / args.events:7.1f} us/event")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
