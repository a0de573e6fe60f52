"""E10: the runbook's rollback (docs/operations.md), then an expire, against real Kafka and Redis.

Snapshot 1 is promoted, ads are created through POST /items/events, the indexer builds the
index and the API serves it from Redis. Snapshot 2 is promoted and served. Then the runbook:
`PROMOTED` is pointed back at 1; the indexer rebuilds the index with model 1 (a new, higher
index version) and the API must follow the pointer down. After it, an expire and a create go
through the API. Pass: the API answers with model 1, the expired ad is gone and the created
one is retrievable (deltas keep applying after the rollback), and no request got a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from chaos.report import ExperimentResult
from chaos.world import StatusCounter, planted_world, request_bodies, tiny_model, wait_until
from indexer.metrics import IndexerMetrics
from indexer.service import Indexer
from indexer.settings import IndexerSettings
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import ServingState
from streaming.events import ItemEvent, ItemFeatures
from streaming.snapshots import SnapshotStore

log = logging.getLogger("chaos.e10")
TOKEN = "chaos-e10-token"
ADS = 60
WIDE_BEAMS = [8, 32]  # every node of the tiny (8, 4) index: a retrieval returns every live ad
# E10 is about following pointers: an untrained tiny model over 60 ads builds lopsided nodes, which an
# indexer with a node-balance gate would (rightly) refuse to flip live; that gate is not under test here.
_NO_BALANCE_GATE = {"max_node_over_mean": 1e9} if "max_node_over_mean" in IndexerSettings.model_fields else {}


def item_event(world, row: int, sequence: int, op: str = "create") -> dict[str, Any]:
    features = None
    if op != "expire":
        sparse = {name: int(world.items.sparse[name][row]) for name in world.items.sparse if name != "item_id"}
        features = ItemFeatures(dense=world.items.dense[row].tolist(), sparse=sparse)
    event = ItemEvent(
        op=op, ad_id=int(world.item_ids[row]), event_time=time.time(), sequence=sequence, features=features
    )
    return event.model_dump(mode="json", exclude_none=True)


async def _scenario(app, store: SnapshotStore, world, result: ExperimentResult) -> dict[str, Any]:
    counter = StatusCounter(app)
    body = {**request_bodies(world, 1)[0], "k": 1000}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    checks: dict[str, Any] = {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=counter), base_url="http://api", timeout=30) as client,
    ):
        created = await client.post(
            "/items/events", json={"events": [item_event(world, r, 1) for r in range(ADS)]}, headers=headers
        )
        assert created.status_code == 202, created.text
        answer: dict[str, Any] = {}

        def serving(model_version: int, ads: set[int] | None = None, gone: int | None = None):
            async def check() -> bool:
                response = await client.post("/retrieve", json=body)
                if response.status_code != 200:
                    return False
                answer.update(response.json())
                ids = {ad["ad_id"] for ad in answer["ads"]}
                return (
                    answer["model_version"] == model_version
                    and (ads is None or ads <= ids)
                    and (gone is None or gone not in ids)
                )

            return check

        first_ads = {int(a) for a in world.item_ids[:ADS]}
        checks["index_built_s"] = await wait_until(serving(1, first_ads), 120, "the index of snapshot 1 served")
        counter.statuses.clear()  # the 503s before the first index are readiness, not the experiment's
        store.promote(store.write(tiny_model(1), parent=1).version)
        checks["promoted_2_s"] = await wait_until(serving(2), 120, "snapshot 2 served")
        index_before = answer["index_version"]

        store.promote(1)  # the runbook, step 2: point PROMOTED back at the good version
        result.faults_injected += 1
        checks["rolled_back_s"] = await wait_until(serving(1), 120, "the rollback to snapshot 1 served")
        checks["index_versions"] = [index_before, answer["index_version"]]

        expired, fresh = int(world.item_ids[0]), int(world.item_ids[ADS])
        events = [item_event(world, 0, 2, op="expire"), item_event(world, ADS, 1)]
        response = await client.post("/items/events", json={"events": events}, headers=headers)
        assert response.status_code == 202, response.text
        checks["expire_applied_s"] = await wait_until(
            serving(1, {fresh}, gone=expired), 60, "the expire and create after the rollback"
        )
        checks["served_after"] = {"model_version": answer["model_version"], "index_version": answer["index_version"]}
        checks["expired_ad_served"] = expired in {ad["ad_id"] for ad in answer["ads"]}
    result.http_5xx = counter.server_errors
    checks["statuses"] = {str(k): v for k, v in sorted(counter.statuses.items())}
    return checks


def run_e10(kafka, redis_url: str) -> ExperimentResult:
    """`kafka`: a devservers KafkaServer (topics are created here); `redis_url`: a live Redis."""
    started = time.monotonic()
    result = ExperimentResult("e10", "runbook rollback, then an expire", "python -m chaos e10")
    world = planted_world()
    tag = uuid.uuid4().hex[:8]
    items_topic, dlq_topic = f"chaos.items.{tag}", f"chaos.items.dlq.{tag}"
    kafka.create_topics([items_topic, dlq_topic], partitions=1, compacted={items_topic})
    with tempfile.TemporaryDirectory(prefix="chaos-e10-") as tmp:
        store = SnapshotStore(Path(tmp) / "store")
        store.promote(store.write(tiny_model(0)).version)
        prefix = f"e10-{tag}:"
        indexer = Indexer(
            IndexerSettings(
                redis_url=redis_url,
                kafka_bootstrap_servers=kafka.bootstrap_servers,
                items_topic=items_topic,
                dlq_topic=dlq_topic,
                group_id=f"chaos-indexer-{tag}",
                store_dir=str(store.root),
                key_prefix=prefix,
                poll_timeout_ms=50,
                poll_interval_s=0.1,
                metrics_port=0,
                **_NO_BALANCE_GATE,
            ),
            metrics=IndexerMetrics(),
        )
        stop = threading.Event()
        loop = threading.Thread(target=indexer.run, args=(stop,), name="chaos-e10-indexer", daemon=True)
        loop.start()
        settings = ApiSettings(
            beams=WIDE_BEAMS,
            max_wait_ms=1,
            store_dir=str(store.root),
            redis_url=redis_url,
            key_prefix=prefix,
            reload_interval_s=0.1,
            delta_interval_s=0.1,
            items_token=TOKEN,
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            items_topic=items_topic,
            kafka_ack_timeout_s=10,  # a fresh broker may still be electing the topic's leader
        )
        try:
            result.checks = asyncio.run(_scenario(create_app(settings, ServingState()), store, world, result))
            ok = True
        except (TimeoutError, AssertionError) as err:
            result.checks["error"] = f"{type(err).__name__}: {err}"
            ok = False
        finally:
            stop.set()
            loop.join(timeout=30)
            indexer.close()
    result.runs = 1
    checks = result.checks
    passed = (
        ok
        and checks.get("served_after", {}).get("model_version") == 1
        and checks.get("expired_ad_served") is False
        and checks["index_versions"][1] > checks["index_versions"][0]
        and result.http_5xx == 0
    )
    return result.finish(passed, started)
