"""Every Grafana panel query, run against a real Prometheus scraping the real services, returns labelled series.

The stack is the demo's, smaller: real Kafka and Redis (session fixtures), simulated traffic into fresh
topics, and the trainer, indexer and retrieval API as `python -m <service>` processes. Prometheus scrapes
them under the job names the compose stack uses (trainer, indexer, retrieval_api). Once the API serves a
promoted snapshot with its Redis index and has answered some requests, each query of
ops/grafana/dashboards/hsnn.json (with `$__rate_interval`-free PromQL as written there) must return at least
one series, and every series must carry each label its legend names (`{{outcome}}`, `{{partition}}`, ...):
a legend over a label the metric lacks renders one unlabelled line, which is the bug this test exists for.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_support import prometheus_binary, query, running_prometheus, targets_up, wait_for

from demo.probes import measure_recall
from demo.run import model_config_json
from demo.services import Service, service_env
from demo.traffic import Traffic
from devservers import KafkaServer, RedisServer
from devservers._proc import free_port
from feed.feed import FeedConfig, ensure_topics

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "dashboards" / "hsnn.json"
JOBS = ("trainer", "indexer", "retrieval_api")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query of every panel, rows included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels = panels + [inner for panel in panels for inner in panel.get("panels", [])]
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in panels for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def stack(
    kafka_server: KafkaServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Traffic, trainer, indexer and API on fresh topics and a fresh key prefix; yields their ports and the traffic."""
    prometheus_binary()  # skip (or fail under HSNN_REQUIRE_SERVERS=1) before starting anything
    work = tmp_path_factory.mktemp("dashboard")
    tag = secrets.token_hex(3)
    feed = FeedConfig(
        bootstrap=kafka_server.bootstrap_servers,
        rate=150,
        ads=300,
        users=300,
        items_topic=f"dash-{tag}.items",
        impressions_topic=f"dash-{tag}.impressions",
        chunk=100,
        progress=False,
    )
    ensure_topics(feed)
    traffic = Traffic(feed)
    model_config = work / "model.json"
    model_config.write_text(model_config_json(traffic.market))
    store, prefix = work / "snapshots", f"dash{tag}:"
    ports = {"trainer": free_port(), "indexer": free_port(), "retrieval_api": free_port()}
    common = {"KAFKA_BOOTSTRAP_SERVERS": feed.bootstrap, "STORE_DIR": store, "ITEMS_TOPIC": feed.items_topic}
    settings = {
        "trainer": common
        | {
            "IMPRESSIONS_TOPIC": feed.impressions_topic,
            "IMPRESSIONS_DLQ_TOPIC": feed.impressions_dlq,
            "ITEMS_DLQ_TOPIC": feed.items_dlq,
            "GROUP_ID": f"dash-{tag}-trainer",
            "MODEL_CONFIG_PATH": model_config,
            "BATCH_SIZE": 128,
            "SNAPSHOT_EVERY_SECONDS": 5,
            "EVAL_MIN_EVENTS": 20,
            "MAX_NE_REGRESSION": 10.0,
            "METRICS_PORT": ports["trainer"],
        },
        "indexer": common
        | {
            "REDIS_URL": redis_server.url,
            "DLQ_TOPIC": feed.items_dlq,
            "GROUP_ID": f"dash-{tag}-indexer",
            "KEY_PREFIX": prefix,
            "METRICS_PORT": ports["indexer"],
        },
        "retrieval_api": common
        | {
            "REDIS_URL": redis_server.url,
            "KEY_PREFIX": prefix,
            "HOST": "127.0.0.1",
            "PORT": ports["retrieval_api"],
            "BEAMS": "[8,32]",
            "RELOAD_INTERVAL_S": 0.5,
        },
    }
    env_prefix = {"trainer": "HSNN_TRAINER_", "indexer": "HSNN_INDEXER_", "retrieval_api": "HSNN_API_"}
    services = [
        Service(
            job,
            job,
            service_env({env_prefix[job] + name: value for name, value in settings[job].items()}),
            work / "logs" / f"{job}.log",
        )
        for job in JOBS
    ]
    traffic.start()
    for service in services:
        service.start()
    try:
        yield {"ports": ports, "traffic": traffic, "services": services, "work": work}
    finally:
        traffic.stop()
        for service in services:
            service.terminate()
        for service in services:
            service.wait(60)
        traffic.join(timeout=30)


def _api_serving(stack: dict[str, Any]) -> bool:
    for service in stack["services"]:
        if service.exited() is not None:
            raise AssertionError(f"{service.name} exited {service.exited()}:\n{service.tail(40)}")
    port = stack["ports"]["retrieval_api"]
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200


def test_every_dashboard_query_returns_series_with_its_legend_labels(stack: dict[str, Any], tmp_path: Path) -> None:
    wait_for(lambda: _api_serving(stack), 240, "the API to serve a promoted snapshot with its index", every=1)
    api = f"http://127.0.0.1:{stack['ports']['retrieval_api']}"
    jobs = {job: f"127.0.0.1:{port}" for job, port in stack["ports"].items()}
    with running_prometheus(jobs, tmp_path / "prometheus") as prometheus:
        wait_for(lambda: all(targets_up(prometheus).get(job) for job in JOBS), 60, "every service target up")
        assert measure_recall(api, stack["traffic"], k=10, users=8) is not None  # outcome="ok" requests
        httpx.post(f"{api}/retrieve", json={"user": {"dense": []}, "k": 5}, timeout=10)  # an error outcome too
        time.sleep(3)  # a few scrapes after the requests, so rate() has two samples each side

        def unmet() -> list[str]:
            problems = []
            for title, expr, legend in dashboard_targets():
                series = query(prometheus, expr)
                wanted = set(LEGEND_LABEL.findall(legend))
                if not series:
                    problems.append(f"{title}: no series for {expr}")
                    continue
                for one in series:
                    if missing := wanted - set(one["metric"]):
                        problems.append(f"{title}: legend {legend!r} needs {sorted(missing)}, got {one['metric']}")
                        break
                if "job" in wanted and {s["metric"]["job"] for s in series} != set(JOBS):
                    problems.append(f"{title}: {expr} lacks some services: {[s['metric'] for s in series]}")
            return problems

        deadline = time.monotonic() + 90
        while (problems := unmet()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not problems, "\n".join(problems)
