"""E9: Kafka down while ad systems post item batches: /retrieve must not notice, item posts fail fast.

    python -m chaos e9                        # 8 concurrent 1,000-event batches, 2 x (10 s up, 10 s down)
    python -m chaos e9 --seconds 5 --rounds 1 # the scaled run

The API runs as its own process (`python -m retrieval_api`: a tiny model over a planted catalogue,
item events to a devservers broker). Phases measured the same way in the same run: Kafka up,
then the broker stopped, `--rounds` times (the broker restarted in between). In each, `--posters`
clients post authenticated `--batch`-event item batches back to back while `--concurrency`
closed-loop clients time POST /retrieve.
Pass: /retrieve p99 with Kafka down is at most (1 + `--tolerance`) x p99 with Kafka up, /retrieve never
answers 5xx, and every item post with Kafka down is 503 within `kafka_ack_timeout_s` as the client
measures it. (Faster with Kafka down is no fault: with it up, the broker and the producer share the
API's CPUs, so on a small machine /retrieve is slower then; the ratio is reported either way.)
With Kafka up the posts are 202, or 503 when the broker does not acknowledge a whole batch in time
(counted in the details, not a failure: the client retries).
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

from bench.loadgen import Tally
from bench.trainer_throughput import make_events
from chaos.harness import api_service, create_topics, wait_for, wait_ready
from chaos.report import ExperimentResult, add_item_post_options, experiment_parser, loop_result, parse_loop_args
from chaos.world import BEAMS, free_port, item_batch_bodies, planted_world, post_items, request_bodies, tiny_model
from streaming.snapshots import SnapshotStore

TOKEN = "chaos-e9-token"


async def phase(url: str, bodies: list[dict], batches: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """/retrieve timed by `--concurrency` closed-loop clients while every batch is posted back to back by its own
    client, for `--warmup` + `--seconds`; returns the /retrieve tally and each item post's (status, seconds)."""
    tally = Tally(truth={})
    posts: list[tuple[int, float]] = []
    stop = asyncio.Event()
    measuring = False
    connections = len(batches) + args.concurrency
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def poster(body: bytes) -> None:
            while not stop.is_set():
                status, seconds, _ = await post_items(client, body, TOKEN)
                if measuring:
                    posts.append((status, seconds))

        async def retriever(number: int) -> None:
            while not stop.is_set():
                body_number = number % len(bodies)
                number += args.concurrency
                started = time.perf_counter()
                response = await client.post("/retrieve", json=bodies[body_number])
                if measuring:
                    tally.add(body_number, response, time.perf_counter() - started)

        tasks = [asyncio.create_task(poster(body)) for body in batches]
        tasks += [asyncio.create_task(retriever(n)) for n in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        measuring = True
        await asyncio.sleep(args.seconds)
        measuring = False
        stop.set()
        await asyncio.gather(*tasks)
    return {"tally": tally, "posts": posts}


def pooled(phases: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One summary of the phases run in one condition (Kafka up, or down)."""
    tally = Tally(truth={})
    posts = [post for ph in phases for post in ph["posts"]]
    for ph in phases:
        tally.latencies += ph["tally"].latencies
        tally.items_scored += ph["tally"].items_scored
        tally.flops += ph["tally"].flops
        for code, n in ph["tally"].errors.items():
            tally.errors[code] = tally.errors.get(code, 0) + n
    summary = tally.summary(seconds * len(phases))
    statuses: dict[str, int] = {}
    for status, _ in posts:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ordered = sorted(s for _, s in posts)
    return {
        "retrieve": {k: summary[k] for k in ("requests", "errors", "qps", "p50_ms", "p99_ms", "mean_ms")},
        "retrieve_p99_ms_per_phase": [round(ph["tally"].summary(seconds)["p99_ms"], 1) for ph in phases],
        "item_posts": len(posts),
        "item_statuses": statuses,
        "item_seconds_p50": round(ordered[len(ordered) // 2], 3) if ordered else 0.0,
        "item_seconds_max": round(ordered[-1], 3) if ordered else 0.0,
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

        def item_post_acknowledged() -> bool:  # a (re)started broker may still be electing the topic's leaders
            return asyncio.run(_post_once(url, batches[0]))[0] == 202

        phases: dict[str, list[dict[str, Any]]] = {"up": [], "down": []}
        for number in range(args.rounds):  # alternated, so drifting background load hits both alike
            if number:
                kafka.start()
            wait_for(item_post_acknowledged, 60, "an item batch acknowledged", 0.5)
            phases["up"].append(asyncio.run(phase(url, bodies, batches, args)))
            kafka.stop()
            phases["down"].append(asyncio.run(phase(url, bodies, batches, args)))
        up, down = pooled(phases["up"], args.seconds), pooled(phases["down"], args.seconds)
        api_alive = api.alive
        api.stop(timeout=30)
    finally:
        if api.alive:
            api.kill()
        kafka.stop()
    p99_up, p99_down = up["retrieve"]["p99_ms"], down["retrieve"]["p99_ms"]
    ratio = p99_down / p99_up if p99_up > 0 else float("inf")
    retrieve_5xx = sum(n for ph in (up, down) for code, n in ph["retrieve"]["errors"].items() if int(code) >= 500)
    # A 503 is the documented answer to an unacknowledged batch, with Kafka up (rarely) or down; other 5xx are not.
    unexpected_5xx = sum(n for ph in (up, down) for c, n in ph["item_statuses"].items() if int(c) >= 500 and c != "503")
    checks = {
        "retrieve_p99_not_worse_while_down": ratio <= 1 + args.tolerance,
        "retrieve_never_5xx": retrieve_5xx == 0,
        "retrieve_answered_while_down": down["retrieve"]["requests"] > 0,
        "items_503_while_down": set(down["item_statuses"]) == {"503"},
        "items_503_within_ack_timeout": down["item_seconds_max"] <= args.ack_timeout,
        "api_stayed_up": api_alive,
    }
    details = {
        "faults": f"broker stopped {args.rounds}x",
        "kafka_ack_timeout_s": args.ack_timeout,
        "p99_ratio_down_over_up": round(ratio, 3),
        "item_posts_down_over_ack_timeout": sum(
            1 for ph in phases["down"] for _, t in ph["posts"] if t > args.ack_timeout
        ),
        "kafka_up": up,
        "kafka_down": down,
        "seconds": round(time.monotonic() - started, 1),
    }
    title = (
        f"Kafka stopped: {args.posters} concurrent {args.batch:,}-event item batches while timing /retrieve "
        f"(p99 {p99_up:.1f} ms up, {p99_down:.1f} ms down; item posts 503 in <= {down['item_seconds_max']:.2f} s)"
    )
    result = loop_result(
        args, "e9", title, started, work, checks, details, faults_injected=args.rounds, lost=0, duplicated=0
    )
    result.http_5xx = retrieve_5xx + unexpected_5xx
    return result


async def _post_once(url: str, body: bytes) -> tuple[int, float, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await post_items(client, body, TOKEN)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = experiment_parser("e9", __doc__.splitlines()[0])
    add_item_post_options(parser, posters=8, batch=1000, posters_help="concurrent item batches (and kafka_workers)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop /retrieve clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="(Kafka up, Kafka down) phase pairs, alternated")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, per phase")
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed rise of /retrieve p99 while down")
    return parse_loop_args(parser, "e9", argv)
