"""Scale figures of the marketplace simulator: build time, memory, events per second, true top-k cost.

    python -m feed.simulate --ads 1000000 --impressions 100000 --users 100000 --item-events --no-progress

Nothing is sent anywhere (`python -m feed` streams the same events into Kafka); see docs/simulator.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from clitools.progress import progress_bar
from streaming.events import encode
from worlds.simulator import Marketplace, scaled_config


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feed.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=10_000)
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=1_000, help="impressions per step() call")
    parser.add_argument("--item-events", action="store_true", help="also build and encode every initial create")
    parser.add_argument("--top-k-users", type=int, default=20, help="time true top-100 over all live ads for these")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    show = not args.no_progress
    rss0 = _peak_rss_mib()
    t0 = time.perf_counter()
    market = Marketplace(scaled_config(args.ads, args.users, args.seed))
    build_s = time.perf_counter() - t0
    print(
        f"build: {args.ads:,} ads, {args.users:,} users, {market.config.num_advertisers:,} advertisers, "
        f"{market.config.num_categories} categories in {build_s:.2f}s; arrays {market.nbytes() / 2**20:.1f} MiB; "
        f"peak RSS {_peak_rss_mib():.0f} MiB (+{_peak_rss_mib() - rss0:.0f})"
    )
    if args.item_events:
        t0, count, size = time.perf_counter(), 0, 0
        for chunk in progress_bar(market.iter_initial_item_events(10_000), "initial item events", show):
            count += len(chunk)
            size += sum(len(encode(e)) for e in chunk)
        took = time.perf_counter() - t0
        print(
            f"initial creates: {count:,} events, {size / 2**20:.1f} MiB encoded in {took:.2f}s ({count / took:,.0f}/s)"
        )
    t0 = time.perf_counter()
    made = clicks = conversions = item_events = size = 0
    chunks = [args.chunk] * (args.impressions // args.chunk) + (
        [args.impressions % args.chunk] if args.impressions % args.chunk else []
    )
    for n in progress_bar(chunks, "impressions", show):
        imps, items = market.step(n)
        made += len(imps)
        item_events += len(items)
        clicks += sum(e.labels.click for e in imps)
        conversions += sum(e.labels.conversion for e in imps)
        size += sum(len(encode(e)) for e in imps)
    took = time.perf_counter() - t0
    print(
        f"impressions: {made:,} in {took:.2f}s ({made / max(took, 1e-9):,.0f}/s, incl. encoding), "
        f"{size / max(made, 1) / 1024:.2f} KiB each; simulated {market.now_hours:.1f} h; "
        f"CTR {clicks / max(made, 1):.2%}, CVR/click {conversions / max(clicks, 1):.2%}; "
        f"item events {item_events:,}; live ads {int(market.live.sum()):,}"
    )
    if args.top_k_users:
        users = market.sample_users(args.top_k_users)
        t0 = time.perf_counter()
        for u in users:
            market.true_top_k(int(u), 100)
        took = (time.perf_counter() - t0) / len(users)
        print(f"true top-100 over {int(market.live.sum()):,} live ads: {took * 1000:.1f} ms per user")
    print(
        f"peak RSS {_peak_rss_mib():.0f} MiB; CPU time {time.process_time():.1f}s (wall figures above include waiting)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
