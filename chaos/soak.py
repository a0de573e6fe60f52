"""Soak: the whole system under steady /retrieve load for minutes: flat API memory, no 5xx.

    python -m chaos soak --minutes 10         # the full run (about 12 minutes in all)
    python -m chaos soak --minutes 3          # a short one

Everything runs as the demo runs it (`demo.run.Demo`: Kafka and Redis from devservers, the feed's
simulated impressions and item events at `--feed-rate` records/s, the trainer publishing a snapshot
every `--snapshot-every` s, the indexer building each one's Redis index, the API hot-swapping them).
Once the API serves, a short closed-loop probe (`--probe-clients` clients for `--probe-seconds`)
measures the most /retrieve answers per second the running system gives; then an open-loop client
sends `--load-fraction` of that rate for `--minutes` (plain HTTP/1.1 keep-alive connections,
`chaos.world.open_loop`: httpx's pool, in the process that also runs the feed, fell behind the
schedule and became the bottleneck), while the API's resident memory is sampled
every `--sample-s`. Pass: the median RSS of the last minute is within +`--rss-tolerance` of the
second minute's, /retrieve never answers 5xx (nor fails to connect), and no service exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import rss_mb
from chaos.harness import wait_for
from chaos.report import ExperimentResult, loop_result, parse_options
from chaos.world import closed_loop, open_loop


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def user_bodies(demo: Any, count: int, k: int) -> list[dict]:
    """/retrieve bodies for `count` sampled users of the demo's marketplace (what their impressions carry)."""
    with demo.traffic.lock:
        market = demo.traffic.market
        return [
            {"user": market.user_features(int(r)).model_dump(mode="json"), "k": k} for r in market.sample_users(count)
        ]


async def load(demo: Any, bodies: list[dict], rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """`rate` /retrieve requests a second for `--minutes`, the API's RSS sampled meanwhile."""
    samples: list[tuple[float, float]] = []
    children_ok = True
    pid = demo.services["api"].pid
    duration = args.minutes * 60

    async def sample() -> None:
        nonlocal children_ok
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration:
            samples.append((elapsed, rss_mb(pid)))
            children_ok = children_ok and demo.check_children()
            await asyncio.sleep(args.sample_s)

    driving = asyncio.ensure_future(open_loop(demo.port, bodies, rate, duration))
    await sample()
    return {"summary": await driving, "rss": samples, "children_ok": children_ok}


def minute_median(samples: list[tuple[float, float]], start_s: float) -> float | None:
    values = [rss for at, rss in samples if start_s <= at < start_s + 60]
    return round(statistics.median(values), 1) if values else None


def run(args: argparse.Namespace) -> ExperimentResult:
    from demo.run import Demo
    from demo.run import parse_args as demo_args

    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-soak-"))
    started = time.monotonic()
    demo = Demo(
        demo_args(
            [
                *("--port", "0", "--rate", str(args.feed_rate), "--seed", str(args.seed)),
                *("--snapshot-every", str(args.snapshot_every), "--data-dir", str(work)),
            ]
        )
    )
    demo_log = work / "demo.log"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with demo_log.open("a") as log, contextlib.redirect_stdout(log):  # the demo's lines name machine paths
            demo.setup()
        wait_for(lambda: demo.check_children() and _ready(demo.api), args.ready_timeout, "the API serving", 1.0)
        bodies = user_bodies(demo, 256, args.k)
        probe = asyncio.run(closed_loop(demo.port, bodies, args.probe_clients, args.probe_seconds))
        rate = args.load_fraction * probe["qps_200"]
        soaked = asyncio.run(load(demo, bodies, rate, args))
        versions_served = _served_versions(demo.api)
    finally:
        with demo_log.open("a") as log, contextlib.redirect_stdout(log):
            demo.shutdown()
    summary = soaked["summary"]
    samples = soaked["rss"]
    second = minute_median(samples, 60)
    last = minute_median(samples, args.minutes * 60 - 60)
    statuses, probe_statuses = summary["statuses"], probe["statuses"]
    server_errors = sum(n for c, n in [*statuses.items(), *probe_statuses.items()] if int(c) >= 500)
    checks = {
        "rss_flat": second is not None and last is not None and last <= second * (1 + args.rss_tolerance),
        "no_5xx": server_errors == 0,
        "no_connection_errors": not summary["errors"] and not probe["errors"],
        "services_stayed_up": soaked["children_ok"],
    }
    details = {
        "faults": "none: steady load with feed, trainer and indexer running",
        "max_qps_probe": probe | {"clients": args.probe_clients, "seconds": args.probe_seconds},
        "retrieve": summary,
        "rss_mb": {
            "second_minute_median": second,
            "last_minute_median": last,
            "first": samples[0][1] if samples else None,
            "last": samples[-1][1] if samples else None,
            "per_minute_median": [minute_median(samples, 60 * m) for m in range(int(args.minutes))],
        },
        "served_at_end": versions_served,
        "feed_records": demo.traffic.stats.sent if demo.traffic else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    change = (last / second - 1) if second and last else float("nan")
    title = (
        f"{args.minutes:g} min at {args.load_fraction:.0%} of max /retrieve QPS ({rate:.0f} of "
        f"{probe['qps_200']:.0f}/s) with feed, trainer and indexer running "
        f"(API RSS {change:+.1%} second to last minute)"
    )
    result = loop_result(args, "soak", title, started, work, checks, details, faults_injected=0, lost=0, duplicated=0)
    result.http_5xx = server_errors
    return result


def _served_versions(url: str) -> dict[str, Any] | None:
    try:
        served = httpx.get(f"{url}/status.json", timeout=5).json().get("served", {})
    except (httpx.HTTPError, ValueError):
        return None
    return {k: served.get(k) for k in ("model_version", "index_version")}


OPTIONS = (
    ("--minutes", float, 10.0, "minutes of steady load (at least 2: the second and the last minute compare)"),
    ("--load-fraction", float, 0.8, "share of the probed maximum QPS offered"),
    ("--probe-seconds", float, 20.0, "seconds of the closed-loop max-QPS probe"),
    ("--probe-clients", int, 16, "closed-loop clients of the probe"),
    ("--feed-rate", float, 200.0, "simulated records per second into Kafka"),
    ("--snapshot-every", float, 30.0, "trainer snapshot interval, seconds"),
    ("--k", int, 20, "ads asked per /retrieve"),
    ("--sample-s", float, 5.0, "seconds between RSS samples"),
    ("--rss-tolerance", float, 0.10, "allowed rise of the last minute's median RSS over the second's"),
    ("--ready-timeout", float, 300.0, "seconds to wait for the API to serve"),
)


def parse(argv: list[str]) -> argparse.Namespace:
    args = parse_options("soak", __doc__.splitlines()[0], OPTIONS, argv)
    if args.minutes < 2:
        raise SystemExit("python -m chaos soak: --minutes must be at least 2")
    return args
