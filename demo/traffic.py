"""Simulated traffic for the demo: the feed's marketplace, streamed into Kafka from a thread.

The feed's own building blocks are reused (`FeedConfig`, `marketplace_for`, `simulated_events`, the
token bucket, the same keys and encoding), so the stream is exactly what `python -m feed` would send
with the same sizing and seed. The demo keeps the `Marketplace` object, because it asks the simulator
for each sampled user's request features and true top-K while the traffic runs. The marketplace is not
thread-safe, so every call into it goes through `lock` (the thread holds it only while the simulator
produces the next event, never while it waits for its rate).

With `wall_clock_impressions` each impression's `event_time` is the wall clock when it is sent, as an ad
server would stamp it, instead of the simulator's clock (which starts at its `start_time` and runs as fast as
the rate makes it: at 200 records/s about 36 simulated seconds a second). Only the trainer's freshness and
lag figures read an impression's event time (user histories carry ages), so the demo turns it on to measure
event -> trained -> served; item events keep the simulator's times.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from feed.feed import FeedConfig, TokenBucket, make_producer, marketplace_for, simulated_events
from streaming.events import ItemEvent, encode, event_key
from worlds.simulator import Marketplace


@dataclass
class TrafficStats:
    item_events: int = 0
    impressions: int = 0
    acked: int = 0
    failed: int = 0
    first_error: str | None = None
    started: float = 0.0
    finished: float | None = None

    @property
    def sent(self) -> int:
        return self.item_events + self.impressions

    def rate(self, now: float | None = None) -> float:
        end = self.finished or now or time.monotonic()
        return self.sent / max(1e-9, end - self.started) if self.started else 0.0


class Traffic(threading.Thread):
    """Sends the initial catalogue at once, then the simulation at `config.rate` records/s until stopped."""

    def __init__(self, config: FeedConfig, market: Marketplace | None = None, wall_clock_impressions: bool = False):
        super().__init__(name="demo-traffic", daemon=True)
        self.config = config
        self.wall_clock_impressions = wall_clock_impressions
        self.market = market or marketplace_for(config)
        self.lock = threading.Lock()
        self.stats = TrafficStats()
        self.last_create: ItemEvent | None = None  # a real ad's features, for the demo's own create
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the demo loop
            self.error = exc
        finally:
            self.stats.finished = time.monotonic()

    def _run(self) -> None:
        config, stats = self.config, self.stats
        producer = make_producer(config.bootstrap, "hsnn-demo-feed")
        bucket = TokenBucket(config.rate)

        def acked(_metadata: object) -> None:
            stats.acked += 1

        def failed(error: BaseException) -> None:
            stats.failed += 1
            if stats.first_error is None:
                stats.first_error = f"{type(error).__name__}: {error}"

        with self.lock:
            initial = int(self.market.live.sum())
            events = simulated_events(self.market, 1 << 62, config.chunk)  # endless: stopped from outside
        stats.started = time.monotonic()
        try:
            while not self._stop_event.is_set():
                with self.lock:
                    kind, event = next(events)
                if kind == "impression" or stats.item_events >= initial:
                    bucket.acquire()  # the initial catalogue goes out at once, the simulation at the rate
                if kind == "impression" and self.wall_clock_impressions:
                    event = event.model_copy(update={"event_time": round(time.time(), 3)})
                topic = config.items_topic if kind == "item" else config.impressions_topic
                try:
                    future = producer.send(topic, key=event_key(event), value=encode(event))
                except Exception as error:
                    failed(error)
                    continue
                future.add_callback(acked)
                future.add_errback(failed)
                if kind == "item":
                    stats.item_events += 1
                    if event.op == "create":
                        self.last_create = event
                else:
                    stats.impressions += 1
            producer.flush(timeout=30)
        finally:
            producer.close(timeout=10)
