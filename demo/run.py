"""The demo's orchestration: servers, topics, services, traffic, the progress loop, and an orderly stop."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.probes import (
    CreateCheck,
    IndexInfo,
    RecallResult,
    StoreView,
    find_ad,
    http_json,
    measure_recall,
    metric_sum,
    post_create,
    redis_index,
    scrape,
    store_view,
)
from demo.services import REPO, Service, service_env
from demo.traffic import Traffic
from devservers._proc import free_port, port_is_free

CREATED_AD_BASE = 2_000_000_000  # far above any id the simulator hands out
KEY_PREFIX = "hsnn:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Run the whole system on this machine: Kafka, Redis, trainer, indexer, retrieval API, traffic.",
        epilog="The quick core-only demo (no services) is `python -m demo.model_only`.",
    )
    parser.add_argument("--duration", type=float, default=0, help="stop by itself after this many seconds (0: never)")
    parser.add_argument(
        "--until-served",
        action="store_true",
        help="stop as soon as the API serves a published snapshot with its Redis index, a new ad was verified "
        "retrievable and a recall figure was taken (--duration then caps the wait; exit 1 if it runs out)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="simulated records per second into Kafka")
    parser.add_argument("--ads", type=int, default=1000, help="ads in the simulated marketplace")
    parser.add_argument("--users", type=int, default=2000, help="users in the simulated marketplace")
    parser.add_argument("--seed", type=int, default=0, help="marketplace seed (the feed's sizing rule)")
    parser.add_argument("--port", type=int, default=8000, help="API port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--snapshot-every", type=float, default=20.0, help="trainer snapshot interval, seconds")
    parser.add_argument("--snapshot-events", type=int, default=5000, help="... or after this many events")
    parser.add_argument(
        "--max-ne-regression",
        type=float,
        default=0.05,
        help="the publisher's quality gate: hold back a snapshot whose held-out NE is this much worse than the "
        "promoted one's (the service default is 0.01; the demo's small eval buffer is noisy)",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between progress reports")
    parser.add_argument("--recall-k", type=int, default=50, help="K of recall@K against the true top-K")
    parser.add_argument("--recall-users", type=int, default=8, help="users sampled per recall measurement")
    parser.add_argument(
        "--beams", default="8,32", help="API beams per index level; the default covers the demo's 8x4 index fully"
    )
    parser.add_argument("--data-dir", type=Path, help="where Kafka, Redis, snapshots and logs go (default: a temp dir)")
    parser.add_argument("--keep-data", action="store_true", help="keep the data dir at the end (kept on failure)")
    return parser.parse_args(argv)


@dataclass
class Observed:
    """What the last progress tick saw (the final summary reads the newest of each)."""

    trainer: dict[str, float] = field(default_factory=dict)
    store: StoreView = field(default_factory=StoreView)
    index: IndexInfo = field(default_factory=IndexInfo)
    api: dict[str, Any] | None = None
    recall: RecallResult | None = None
    recalls: list[RecallResult] = field(default_factory=list)
    create: CreateCheck | None = None
    served_versions: set[tuple[int, int]] = field(default_factory=set)
    adoptions: dict[tuple[int, float], dict[str, Any]] = field(default_factory=dict)  # the API's, by (version, when)

    def note_api(self, api: dict[str, Any] | None) -> None:
        """Keep every adoption the API's /status.json lists (it keeps the last 256; the demo keeps them all)."""
        for adoption in ((api or {}).get("freshness") or {}).get("adoptions", []):
            self.adoptions[(adoption["model_version"], adoption["adopted_at"])] = adoption


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def freshness_lines(adoptions: list[dict[str, Any]], trainer: dict[str, float]) -> list[str]:
    """The summary's freshness figures: exact p50/p99 from the API's adoption timestamps, and the trainer's
    event -> trained from its histogram (bucket-interpolated, as Prometheus would)."""
    from retrieval_api.status import histogram_quantile

    lines = []
    observed = [a for a in adoptions if a.get("observed")]
    for key, label in (("published_to_served_s", "snapshot published -> served"), ("event_to_served_s", None)):
        values = [a[key] for a in observed if a.get(key) is not None]
        label = label or "newest event trained -> served"
        if not values:
            lines.append(f"freshness: {label}: no new snapshot adopted by the API while it ran")
            continue
        target = " (target p99 <= 10 s)" if key == "published_to_served_s" else ""
        lines.append(
            f"freshness: {label} p50 {percentile(values, 0.5):.2f}s / p99 {percentile(values, 0.99):.2f}s / "
            f"max {max(values):.2f}s over {len(values)} snapshots{target}"
        )
    name = "hsnn_trainer_event_to_trained_seconds_bucket"
    buckets = []
    for sample, value in trainer.items():
        if sample.startswith(name + "{"):
            le = dict(part.split("=", 1) for part in sample[len(name) + 1 : -1].split(",") if part).get("le")
            if le is not None:
                buckets.append((float(le), value))
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    if p50 is not None and p99 is not None:
        lines.append(f"freshness: event -> trained p50 {p50:.2f}s / p99 {p99:.2f}s (trainer histogram, per impression)")
    return lines


def fmt_age(now: float, then: float | None) -> str:
    return "-" if not then else f"{max(0.0, now - then):.0f}s ago"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not stop"
    if code < 0:  # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done
        return f"ended by {signal.Signals(-code).name}"
    return f"exited {code}"


def model_config_json(market: Any) -> str:
    """The tiny HSNN preset (8x4 index, small MoNNs) over the simulator's feature schema."""
    from hsnn.config import HSNNConfig
    from worlds.planted import tiny_hsnn_config
    from worlds.simulator import feature_schema

    config = tiny_hsnn_config(num_nodes=(8, 4)).model_dump()
    config["features"] = feature_schema(market.config).model_dump()
    return HSNNConfig.model_validate(config).model_dump_json(indent=1)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stop_event = threading.Event()
        self.stop_reason = "stopped"
        self.exit_code = 0
        self.seen = Observed()
        self.started = time.monotonic()
        self.services: dict[str, Service] = {}
        self.servers: list[Any] = []
        self.traffic: Traffic | None = None
        self.token = secrets.token_hex(16)
        self.final_snapshot: StoreView | None = None

    # ---------------------------------------------------------------------------------------- helpers

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_event.is_set():  # a second Ctrl-C: stop waiting politely
            raise KeyboardInterrupt
        self.stop_reason = f"signal {signal.Signals(signum).name}"
        self.stop_event.set()

    # ------------------------------------------------------------------------------------------- start

    def setup(self) -> None:
        from devservers import KafkaServer, RedisServer
        from feed.feed import FeedConfig, ensure_topics

        args = self.args
        if args.port and not port_is_free(args.port):
            raise SystemExit(f"port {args.port} is in use; pass --port N (or --port 0 for any free port)")
        self.port = args.port or free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.work = args.data_dir or Path(tempfile.mkdtemp(prefix="hsnn-demo-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.work / "snapshots"
        if self.store_dir.exists():
            shutil.rmtree(self.store_dir)  # a fresh store every run
        self.logs = self.work / "logs"
        self.say(f"HSNN-Serve demo: data and logs under {self.work}")

        for reason in (KafkaServer.unavailable_reason(), RedisServer.unavailable_reason()):
            if reason:
                raise SystemExit(f"{reason}\ninstall the servers with: bash devservers/install.sh")
        self.say("starting Kafka (KRaft) and Redis ...")
        redis_server = RedisServer(self.work / "redis")
        if (self.work / "redis").exists():
            shutil.rmtree(self.work / "redis")
        self.servers.append(redis_server.start())
        kafka = KafkaServer(self.work / "kafka")
        self.servers.append(kafka.start())
        self.redis_url = redis_server.url
        self.bootstrap = kafka.bootstrap_servers
        self.say(f"  Kafka {self.bootstrap}, Redis {self.redis_url}")

        self.feed_config = FeedConfig(
            bootstrap=self.bootstrap, rate=args.rate, ads=args.ads, users=args.users, seed=args.seed, chunk=100
        )
        created = ensure_topics(self.feed_config)
        self.say(f"  topics: {', '.join(created) or 'already there'}")
        self.traffic = Traffic(self.feed_config, wall_clock_impressions=True)  # event time = when sent
        market = self.traffic.market
        self.say(
            f"  marketplace: {int(market.live.sum())} live ads, {market.config.num_users} users, "
            f"{market.config.num_categories} categories, seed {args.seed} (the feed's sizing rule)"
        )
        config_path = self.work / "hsnn-model.json"
        config_path.write_text(model_config_json(market))
        import redis as redis_lib

        self.redis = redis_lib.Redis.from_url(self.redis_url)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        from streaming.snapshots import SnapshotStore

        self.store = SnapshotStore(self.store_dir)
        self.trainer_port, self.indexer_port = free_port(), free_port()
        beams = "[" + ",".join(str(int(b)) for b in args.beams.split(",")) + "]"
        self.services = {
            "trainer": Service(
                "trainer",
                "trainer",
                service_env(
                    {
                        "HSNN_TRAINER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                        "HSNN_TRAINER_STORE_DIR": self.store_dir,
                        "HSNN_TRAINER_MODEL_CONFIG_PATH": config_path,
                        "HSNN_TRAINER_BATCH_SIZE": 256,
                        "HSNN_TRAINER_MAX_POLL_RECORDS": 512,
                        "HSNN_TRAINER_SNAPSHOT_EVERY_SECONDS": args.snapshot_every,
                        "HSNN_TRAINER_SNAPSHOT_EVERY_EVENTS": args.snapshot_events,
                        "HSNN_TRAINER_EVAL_MIN_EVENTS": 50,
                        "HSNN_TRAINER_MAX_NE_REGRESSION": args.max_ne_regression,
                        "HSNN_TRAINER_METRICS_PORT": self.trainer_port,
                        "HSNN_TRAINER_SEED": args.seed,
                    }
                ),
                self.logs / "trainer.log",
            ),
            "indexer": Service(
                "indexer",
                "indexer",
                service_env(
                    {
                        "HSNN_INDEXER_REDIS_URL": self.redis_url,
                        "HSNN_INDEXER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                        "HSNN_INDEXER_STORE_DIR": self.store_dir,
                        "HSNN_INDEXER_KEY_PREFIX": KEY_PREFIX,
                        "HSNN_INDEXER_METRICS_PORT": self.indexer_port,
                    }
                ),
                self.logs / "indexer.log",
            ),
            "api": Service(
                "api",
                "retrieval_api",
                service_env(
                    {
                        "HSNN_API_HOST": "127.0.0.1",
                        "HSNN_API_PORT": self.port,
                        "HSNN_API_STORE_DIR": self.store_dir,
                        "HSNN_API_REDIS_URL": self.redis_url,
                        "HSNN_API_KEY_PREFIX": KEY_PREFIX,
                        "HSNN_API_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                        "HSNN_API_ITEMS_TOKEN": self.token,
                        "HSNN_API_BEAMS": beams,
                        "HSNN_API_RELOAD_INTERVAL_S": 1.0,
                    }
                ),
                self.logs / "api.log",
            ),
        }
        for service in self.services.values():
            service.start()
            self.say(f"  started {service.name} (pid {service.pid}, log {service.log_path})")
        self.traffic.start()
        self.say(f"  traffic: {args.rate:g} records/s into hsnn.items + hsnn.impressions")
        self.say(
            f"  trainer snapshots every {args.snapshot_every:g}s or {args.snapshot_events:,} events; quality gate "
            f"holds back a snapshot whose held-out NE is over {args.max_ne_regression:.0%} worse than the promoted one"
        )
        self.say()
        self.say(f"API: {self.api}   status page: {self.api}/status   metrics: {self.api}/metrics")
        self.say(f"  curl -s {self.api}/readyz")
        self.say(
            f"  curl -s -X POST {self.api}/retrieve -H 'Content-Type: application/json' "
            """-d '{"user": {"dense": [0, 0, 0, 0], "sparse": {"segment": [1]}}, "k": 5}'"""
        )
        self.say("Ctrl-C stops everything (the trainer publishes a final snapshot first).")
        self.say()

    # ------------------------------------------------------------------------------------------- loop

    def check_children(self) -> bool:
        for service in self.services.values():
            code = service.exited()
            if code is not None:
                self.say(f"!! {service.name} exited with status {code}; the end of its log:")
                self.say(service.tail())
                self.stop_reason = f"{service.name} exited ({code})"
                self.exit_code = 1
                return False
        if self.traffic is not None and self.traffic.error is not None:
            self.say(f"!! traffic failed: {self.traffic.error!r}")
            self.stop_reason, self.exit_code = "traffic failed", 1
            return False
        return True

    def observe(self) -> None:
        seen = self.seen
        seen.trainer = scrape(f"http://127.0.0.1:{self.trainer_port}/metrics") or seen.trainer
        seen.store = store_view(self.store)
        seen.index = redis_index(self.redis, KEY_PREFIX)
        status, api = http_json(f"{self.api}/status.json", timeout=5)
        seen.api = api if status == 200 else None
        seen.note_api(seen.api)
        served = (seen.api or {}).get("served", {})
        if served.get("ready"):
            seen.served_versions.add((served["model_version"], served["index_version"]))
            self.create_and_find()
            if not seen.recall or time.time() - seen.recall.at >= 3 * self.args.interval:
                result = measure_recall(self.api, self.traffic, self.args.recall_k, self.args.recall_users)
                if result is not None:
                    seen.recall = result
                    seen.recalls.append(result)

    def create_and_find(self) -> None:
        """Once the API serves a Redis index: create one new ad through the API and poll until it is returned."""
        seen = self.seen
        if seen.create is None:
            template = self.traffic.last_create if self.traffic else None
            if template is None:
                return
            seen.create = post_create(self.api, self.token, template, CREATED_AD_BASE + secrets.randbelow(10**6))
        check = seen.create
        if check.created_at is None or check.seen_after_s is not None:
            return
        deadline = time.monotonic() + min(self.args.interval, 5.0)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if find_ad(self.api, self.traffic, check):
                return
            time.sleep(0.2)

    def report(self) -> None:
        seen, now, args = self.seen, time.time(), self.args
        stats = self.traffic.stats
        t = seen.trainer
        trained = metric_sum(t, "hsnn_trainer_events_total", outcome="trained")
        held = metric_sum(t, "hsnn_trainer_events_total", outcome="eval")
        dead = metric_sum(t, "hsnn_trainer_events_total", outcome="dead_letter")
        lag = metric_sum(t, "hsnn_trainer_consumer_lag_messages")
        loss = t.get("hsnn_trainer_loss")
        pad = " " * 9
        lines = [
            f"t+{self.elapsed():4.0f}s  feed      {stats.item_events:,} item events, {stats.impressions:,} impressions "
            f"sent ({stats.acked:,} acked, {stats.failed} failed), {stats.rate():.0f}/s",
            f"{pad}trainer   "
            + (
                f"{trained:,.0f} trained, {held:,.0f} held out, {dead:,.0f} dead letters; lag {lag:,.0f} messages"
                + (f"; loss {loss:.3f}" if loss else "")
                if t
                else "starting (no metrics yet)"
            ),
        ]
        s = seen.store
        if s.latest:
            ne = f"; held-out NE {s.latest_ne:.3f}" if s.latest_ne is not None else ""
            gate = "" if s.promoted == s.latest else ", newest held back by the quality gate"
            lines.append(
                f"{pad}snapshots v{s.latest} published {fmt_age(now, s.latest_created_at)} "
                f"(promoted v{s.promoted}{gate}){ne}"
            )
        else:
            lines.append(f"{pad}snapshots none yet (every {args.snapshot_every:g}s or {args.snapshot_events:,} events)")
        i = seen.index
        if i.version is not None:
            lines.append(
                f"{pad}index     v{i.version} in Redis from snapshot {i.model_version}, built "
                f"{fmt_age(now, i.created_at)}, {i.num_live} live ads, {i.delta} delta changes since"
            )
        else:
            lines.append(f"{pad}index     none yet (built when a snapshot is promoted)")
        served = (seen.api or {}).get("served", {})
        if served.get("ready"):
            req = seen.api["requests"]
            p50 = f", p50 {req['latency_p50_s'] * 1000:.0f} ms" if req["latency_p50_s"] is not None else ""
            lines.append(
                f"{pad}api       serving model {served['model_version']} / index {served['index_version']}; "
                f"freshness {served['snapshot_age_s']:.0f}s (now - snapshot created_at); "
                f"{req['requests']} requests{p50}"
            )
        else:
            lines.append(f"{pad}api       {'not ready (no model/index pair yet)' if seen.api else 'starting'}")
        checks = []
        c = seen.create
        if c is not None:
            if c.error:
                checks.append(f"create failed: {c.error}")
            elif c.seen_after_s is not None:
                checks.append(f"new ad {c.ad_id} retrievable {c.seen_after_s:.1f}s after its create")
            else:
                checks.append(f"new ad {c.ad_id} created, not retrievable yet")
        if seen.recall:
            r = seen.recall
            checks.append(
                f"recall@{r.k} vs true top-{r.k} {r.recall:.3f} over {r.users} users "
                f"(model {r.model_version}; random {r.random_baseline:.3f})"
            )
        if checks:
            lines.append(f"{pad}checks    " + "; ".join(checks))
        self.say("\n".join(lines))
        self.say()

    def goal_reached(self) -> bool:
        seen = self.seen
        served = (seen.api or {}).get("served", {})
        index = (seen.api or {}).get("index", {})
        return bool(
            served.get("ready")
            and index.get("source") == "redis"
            and seen.create is not None
            and seen.create.seen_after_s is not None
            and seen.recall is not None
        )

    def loop(self) -> None:
        args = self.args
        next_report = time.monotonic()
        while not self.stop_event.is_set():
            if not self.check_children():
                return
            if args.duration and self.elapsed() >= args.duration:
                if args.until_served:
                    self.stop_reason, self.exit_code = f"--duration {args.duration:g}s passed before served", 1
                else:
                    self.stop_reason = f"--duration {args.duration:g}s"
                return
            if time.monotonic() >= next_report:
                self.observe()
                self.report()
                next_report = time.monotonic() + args.interval
                if args.until_served and self.goal_reached():
                    self.stop_reason = "--until-served: served, indexed, new ad retrievable, recall measured"
                    return
            self.stop_event.wait(0.2)

    # -------------------------------------------------------------------------------------------- stop

    def shutdown(self) -> None:
        self.say(f"stopping ({self.stop_reason}) ...")
        if self.traffic is not None and self.traffic.is_alive():
            self.traffic.stop()
            self.traffic.join(timeout=40)
        trainer = self.services.get("trainer")
        if trainer is not None:
            before = store_view(self.store).latest if hasattr(self, "store") else None
            self.say("  trainer: SIGTERM, waiting for its final snapshot ...")
            code = trainer.stop(timeout=120)
            if hasattr(self, "store"):
                self.final_snapshot = store_view(self.store)
                after = self.final_snapshot.latest
                took = trainer.stop_seconds
                self.say(f"  trainer {describe_exit(code)} after {took:.1f}s; snapshots v{before} -> v{after}")
                self.await_final_pair()
        for name in ("api", "indexer"):
            if name in self.services:
                self.services[name].terminate()
        for name in ("api", "indexer"):
            if name in self.services:
                service = self.services[name]
                code = service.wait(timeout=30)
                self.say(f"  {name} {describe_exit(code)} after {service.stop_seconds:.1f}s")
        if hasattr(self, "redis"):
            self.seen.index = redis_index(self.redis, KEY_PREFIX)
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        self.say("  Kafka and Redis stopped")

    def await_final_pair(self, timeout: float = 20.0) -> None:
        """Give the indexer and the API a moment to serve the trainer's final snapshot, if it was promoted."""
        final = self.final_snapshot
        api = self.services.get("api")
        if final is None or final.promoted is None or api is None or not api.running():
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, data = http_json(f"{self.api}/status.json", timeout=5)
            served = (data or {}).get("served", {}) if status == 200 else {}
            if served.get("ready"):
                self.seen.api = data
                self.seen.note_api(data)
                self.seen.served_versions.add((served["model_version"], served["index_version"]))
                if served["model_version"] >= final.promoted:
                    self.say(
                        f"  api serves the promoted snapshot v{final.promoted}: model {served['model_version']} / "
                        f"index {served['index_version']}"
                    )
                    if self.traffic is not None and not self.traffic.is_alive():
                        result = measure_recall(self.api, self.traffic, self.args.recall_k, self.args.recall_users)
                        if result is not None:
                            self.seen.recall = result
                            self.seen.recalls.append(result)
                            self.say(f"  recall@{result.k} of the served model, traffic stopped: {result.recall:.3f}")
                    return
            time.sleep(0.5)
        self.say(f"  api did not reach snapshot {final.promoted} within {timeout:.0f}s")

    def summary(self) -> None:
        seen, args = self.seen, self.args
        self.say()
        self.say("== summary ==")
        self.say(f"ran {self.elapsed():.1f}s; stopped by {self.stop_reason}")
        if self.traffic is not None:
            st = self.traffic.stats
            self.say(
                f"feed: {st.item_events:,} item events + {st.impressions:,} impressions produced "
                f"({st.acked:,} acked, {st.failed} failed)"
            )
        t = seen.trainer
        store = self.final_snapshot or seen.store
        trainer = self.services.get("trainer")
        final = f"; trainer {describe_exit(trainer.returncode)}" if trainer is not None else ""
        if store.trained_total is not None:
            self.say(f"trainer: {store.trained_total:,.0f} events trained (final snapshot's manifest){final}")
        else:
            scraped = metric_sum(t, "hsnn_trainer_events_total", outcome="trained")
            self.say(f"trainer: {scraped:,.0f} events trained (at the last scrape){final}")
        if store.latest:
            ne = f", held-out NE {store.latest_ne:.3f}" if store.latest_ne is not None else ""
            self.say(f"snapshots published: {store.latest} (latest v{store.latest}, promoted v{store.promoted}{ne})")
        else:
            self.say("snapshots published: 0")
        i = seen.index
        if i.version is not None:
            self.say(f"index: version {i.version} in Redis, built from snapshot {i.model_version}, {i.num_live} ads")
        else:
            self.say("index: none")
        if seen.served_versions:
            model, index = max(seen.served_versions)
            pairs = ", ".join(f"{m}/{x}" for m, x in sorted(seen.served_versions))
            api = seen.api or {}
            age = api.get("served", {}).get("snapshot_age_s")
            fresh = f"; freshness at the last check {age:.0f}s" if age is not None else ""
            self.say(f"api: served model {model} / index {index} (pairs seen: {pairs}){fresh}")
        else:
            self.say("api: served nothing")
        adoptions = sorted(seen.adoptions.values(), key=lambda a: a["adopted_at"])
        for line in freshness_lines(adoptions, seen.trainer):
            self.say(line)
        c = seen.create
        if c is not None and c.seen_after_s is not None:
            self.say(
                f"item create -> retrievable: ad {c.ad_id} in {c.seen_after_s:.1f}s "
                f"(model {c.seen_in[0]} / index {c.seen_in[1]})"
            )
        else:
            self.say(f"item create -> retrievable: {'not verified' if c is None else c.error or 'not seen in time'}")
        if seen.recalls:
            r, first = seen.recalls[-1], seen.recalls[0]
            earlier = f"; first {first.recall:.3f} on model {first.model_version}" if len(seen.recalls) > 1 else ""
            self.say(
                f"recall@{r.k}: {r.recall:.3f} vs the simulator's true top-{r.k} over {r.users} users "
                f"(model {r.model_version}; random ranking {r.random_baseline:.3f}; "
                f"{len(seen.recalls)} measurements{earlier})"
            )
        else:
            self.say(f"recall@{args.recall_k}: not measured")
        self.say(f"logs: {self.logs}" if hasattr(self, "logs") else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo(args)
    signal.signal(signal.SIGINT, demo.on_signal)
    signal.signal(signal.SIGTERM, demo.on_signal)
    try:
        try:
            demo.setup()
            demo.loop()
        except KeyboardInterrupt:
            demo.stop_reason = "interrupt"
        except SystemExit:
            raise
        except Exception as exc:
            demo.say(f"!! demo failed: {type(exc).__name__}: {exc}")
            demo.stop_reason, demo.exit_code = f"error ({type(exc).__name__})", 1
        demo.shutdown()
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown: the atexit hooks kill what is left
        demo.exit_code = 130
    demo.summary()
    work = getattr(demo, "work", None)
    if work is not None and args.data_dir is None and not args.keep_data and demo.exit_code == 0:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    return demo.exit_code


__all__ = ["REPO", "main"]
