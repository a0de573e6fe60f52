"""E9: Kafka down while ad systems post item batches: /retrieve must not notice, item posts fail fast.

    python -m chaos e9                        # 8 concurrent 1,000-event batches, 20 s per phase
    python -m chaos e9 --seconds 8            # the scaled run

The API runs as its own process (`python -m retrieval_api`: a tiny model over a planted catalogue,
item events to a devservers broker). Two phases, measured the same way in the same run: Kafka up,
then the broker stopped. In each, `--posters` clients post authenticated `--batch`-event item
batches back to back while `--concurrency` clients time POST /retrieve (closed loop, bench.loadgen).
Pass: /retrieve p99 with Kafka down is within +-`--tolerance` of p99 with Kafka up, /retrieve never
answers 5xx, every item post with Kafka up is 202 and every one with Kafka down is 503 within
`kafka_ack_timeout_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import drive
from bench.trainer_throughput import make_events
from chaos.harness import api_service, create_topics, wait_for, wait_ready
from chaos.report import ExperimentResult, finish, loop_result, parse_loop_args
from chaos.world import BEAMS, free_port, item_batch_bodies, planted_world, post_items, request_bodies, tiny_model
from streaming.snapshots import SnapshotStore

TOKEN = "chaos-e9-token"


async def phase(url: str, bodies: list[dict], batches: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """/retrieve timed by `drive` while every batch is posted back to back by its own client, for the window."""
    posts: list[tuple[int, float]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=len(batches), max_keepalive_connections=len(batches))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def poster(body: bytes) -> None:
            while not stop.is_set():
                status, seconds, _ = await post_items(client, body, TOKEN)
                posts.append((status, seconds))

        async def timed() -> dict[str, Any]:
            try:
                return await drive(url, bodies, args.concurrency, args.seconds, args.warmup, truth={})
            finally:
                stop.set()

        tasks = [asyncio.create_task(poster(body)) for body in batches]
        retrieve = await timed()
        await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for status, _ in posts:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "retrieve": {k: round(v, 2) if isinstance(v, float) else v for k, v in retrieve.items()},
        "item_posts": len(posts),
        "item_statuses": statuses,
        "item_seconds_max": round(max((s for _, s in posts), default=0.0), 3),
        "item_seconds_p50": round(sorted(s for _, s in posts)[len(posts) // 2], 3) if posts else 0.0,
    }


def run(args: argparse.Namespace) -> ExperimentResult:
    from devservers import KafkaServer

    if args.bootstrap:
        raise SystemExit("e9 stops its broker: it starts its own (no --bootstrap)")
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-e9-"))
    started = time.monotonic()
    world = planted_world()
    bodies = request_bodies(world, 64)
    items, _ = make_events(0, args.posters * args.batch, seed=args.seed)
    batches = item_batch_bodies(items, args.batch)
    tag = uuid.uuid4().hex[:6]
    topic = f"e9-items-{tag}"
    store = SnapshotStore(work / "store")
    store.promote(store.write(tiny_model(args.seed)).version)
    kafka = KafkaServer(work / "kafka").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = api_service(
        store,
        work / "logs",
        port,
        (kafka.bootstrap_servers, topic, TOKEN),
        beams=BEAMS,
        catalog=f"planted:{world.item_ids.numel()}:5",
        kafka_ack_timeout_s=args.ack_timeout,
        kafka_workers=args.posters,
    )
    try:
        create_topics(kafka.bootstrap_servers, [topic], 2, compacted=[topic])
        api.start()
        wait_ready(api, url)

        def item_post_acknowledged() -> bool:  # a fresh broker may still be electing the topic's leaders
            return asyncio.run(_post_once(url, batches[0]))[0] == 202

        wait_for(item_post_acknowledged, 60, "a first item batch acknowledged", 0.5)
        up = asyncio.run(phase(url, bodies, batches, args))
        kafka.stop()
        down = asyncio.run(phase(url, bodies, batches, args))
        api_alive = api.alive
        api.stop(timeout=30)
    finally:
        if api.alive:
            api.kill()
        kafka.stop()
    p99_up, p99_down = up["retrieve"]["p99_ms"], down["retrieve"]["p99_ms"]
    ratio = p99_down / p99_up if p99_up > 0 else float("inf")
    retrieve_5xx = sum(n for ph in (up, down) for code, n in ph["retrieve"]["errors"].items() if int(code) >= 500)
    unexpected_5xx = sum(n for ph, ok in ((up, "202"), (down, "503")) for c, n in ph["item_statuses"].items() if c != ok)
    checks = {
        "retrieve_p99_within_tolerance": abs(ratio - 1) <= args.tolerance,
        "retrieve_never_5xx": retrieve_5xx == 0,
        "retrieve_answered_while_down": down["retrieve"]["requests"] > 0,
        "items_202_while_up": set(up["item_statuses"]) == {"202"},
        "items_503_while_down": set(down["item_statuses"]) == {"503"},
        "items_503_within_ack_timeout": down["item_seconds_max"] <= args.ack_timeout,
        "api_stayed_up": api_alive,
    }
    details = {
        "faults": "broker stopped",
        "kafka_ack_timeout_s": args.ack_timeout,
        "p99_ratio_down_over_up": round(ratio, 3),
        "kafka_up": up,
        "kafka_down": down,
        "seconds": round(time.monotonic() - started, 1),
    }
    title = (
        f"Kafka stopped: {args.posters} concurrent {args.batch:,}-event item batches while timing /retrieve "
        f"(p99 {p99_up:.1f} ms up, {p99_down:.1f} ms down; item posts 503 in <= {down['item_seconds_max']:.2f} s)"
    )
    result = loop_result(args, "e9", title, started, work, checks, details, faults_injected=1, lost=0, duplicated=0)
    result.http_5xx = retrieve_5xx + unexpected_5xx
    return result


async def _post_once(url: str, body: bytes) -> tuple[int, float, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await post_items(client, body, TOKEN)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos e9", description=__doc__.splitlines()[0])
    parser.add_argument("--posters", type=int, default=8, help="concurrent item batches (and kafka_workers)")
    parser.add_argument("--batch", type=int, default=1000, help="events per item batch")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop /retrieve clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, per phase")
    parser.add_argument("--ack-timeout", type=float, default=2.0, help="the API's kafka_ack_timeout_s")
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed relative change of /retrieve p99")
    return parse_loop_args(parser, "e9", argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    return finish(run(args), args.report_key)
