"""What the loop experiments share: servers from devservers, topics, producing with positions, services as processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def kafka_bootstrap(work: Path, bootstrap: str | None = None, started: list[Any] | None = None) -> Iterator[str]:
    """A broker's address: `bootstrap` if given, else a devservers broker under `work` for the block (appended to
    `started`, for an experiment that kills and restarts it)."""
    if bootstrap:
        yield bootstrap
        return
    from devservers import KafkaServer

    server = KafkaServer(work / "kafka").start()
    if started is not None:
        started.append(server)
    try:
        yield server.bootstrap_servers
    finally:
        server.stop()


def create_topics(bootstrap: str, names: Sequence[str], partitions: int, compacted: Sequence[str] = ()) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
                for name in names
            ]
        )
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> list[tuple[int, int]]:
    """Send and wait for every ack; returns each record's (partition, offset), in order."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=10, max_request_size=2 << 20, batch_size=1 << 18
    )
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush(timeout=120)
        return [(meta.partition, meta.offset) for meta in (f.get(timeout=30) for f in futures)]
    finally:
        producer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Any]:
    """Every record of `topic` up to its end offsets as of now."""
    end = end_offsets(bootstrap, topic)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 << 20)
    try:
        tps = [TopicPartition(topic, p) for p in end]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp.partition] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end within {timeout:.0f}s")
            for records in consumer.poll(timeout_ms=500).values():
                out += records
        return out
    finally:
        consumer.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Service:
    """`python -m <module>` with settings as `HSNN_<SECTION>_*` environment variables; one log per start."""

    def __init__(self, module: str, env_prefix: str, settings: dict[str, Any], logs: Path) -> None:
        self.module = module
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.env.pop("HSNN_CONFIG_FILE", None)
        for name, value in settings.items():
            if value is not None:
                self.env[f"{env_prefix}{name.upper()}"] = str(value)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        log = (self.logs / f"{self.module}-{self.starts:03d}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, cwd=REPO, stderr=log)
        log.close()
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def last_log(self, chars: int = 3000) -> str:
        path = self.logs / f"{self.module}-{self.starts:03d}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def indexer_service(
    redis_url: str,
    bootstrap: str,
    topics: tuple[str, str],
    group_id: str,
    store: Any,
    prefix: str,
    logs: Path,
    **settings: Any,
) -> Service:
    """`python -m indexer` on one store, (items, dead-letter) topic pair and key prefix; store checked every 0.5 s."""
    items_topic, dlq_topic = topics
    return Service(
        "indexer",
        "HSNN_INDEXER_",
        {
            "redis_url": redis_url,
            "kafka_bootstrap_servers": bootstrap,
            "items_topic": items_topic,
            "dlq_topic": dlq_topic,
            "group_id": group_id,
            "store_dir": store.root,
            "key_prefix": prefix,
            "metrics_port": 0,
            "poll_interval_s": 0.5,
            **settings,
        },
        logs,
    )


def api_service(store: Any, logs: Path, port: int, items: tuple[str, str, str], **settings: Any) -> Service:
    """`python -m retrieval_api` on `store`, item events on `items` = (bootstrap, topic, bearer token)."""
    bootstrap, topic, token = items
    return Service(
        "retrieval_api",
        "HSNN_API_",
        {
            "host": "127.0.0.1",
            "port": port,
            "store_dir": store.root,
            "kafka_bootstrap_servers": bootstrap,
            "items_topic": topic,
            "items_token": token,
            "log_level": "WARNING",
            **settings,
        },
        logs,
    )


def wait_ready(service: Service, url: str, timeout: float = 120.0) -> None:
    """Until GET /readyz answers 200; raises with the service's log if it exits first."""
    import httpx

    def ready() -> bool:
        if not service.alive:
            raise RuntimeError(f"{service.module} exited:\n{service.last_log()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, f"{service.module} ready on {url}", 0.2)


def kill_broker(server: Any) -> None:
    """SIGKILL a devservers broker and reap it; `server.start()` restarts it on the same ports and data."""
    pid = server.pid
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    server.stop(timeout=10)
