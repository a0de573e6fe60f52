"""hsnn_client against the real app (schema, retrieve, 422, auth) and against scripted answers (retries)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from hsnn.model import HSNN
from hsnn_client import AsyncRetrievalClient, RequestRejected, RetrievalClient, RetryPolicy, Unavailable
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, ServingState, load_pair_from_store
from streaming.snapshots import SnapshotStore
from streaming.version import package_version
from worlds.planted import make_world, tiny_hsnn_config

TOKEN = "client-test-token"
CREATE = {
    "schema_version": 1,
    "op": "expire",
    "ad_id": 88,
    "event_time": 1767225010.0,
    "sequence": 4,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServingState:
    """A tiny HSNN over 200 planted ads, loaded as snapshot 1."""
    world = make_world(num_items=200, seed=9)
    torch.manual_seed(1)
    store = SnapshotStore(tmp_path_factory.mktemp("client-store"))
    store.write(HSNN(tiny_hsnn_config(num_nodes=(8, 4))))
    return ServingState(load_pair_from_store(store, 1, Catalog(item_ids=world.item_ids, items=world.items)))


@pytest.fixture
def api(served: ServingState) -> Iterator[RetrievalClient]:
    app = create_app(ApiSettings(beams=[8, 4], max_wait_ms=0, items_token=TOKEN), served)
    with TestClient(app, base_url="http://api") as http, RetrievalClient(http_client=http, items_token=TOKEN) as client:
        yield client


def test_schema_then_a_request_built_from_it(api: RetrievalClient) -> None:
    schema = api.schema()
    assert (schema.model_version, schema.index_version) == (1, 1)
    answer = api.retrieve({"dense": [0.0] * schema.features.user_dense_dim}, k=5)
    assert len(answer.ads) == 5 and answer.model_version == 1
    assert [ad.score for ad in answer.ads] == sorted((ad.score for ad in answer.ads), reverse=True)


def test_a_request_that_does_not_fit_the_model_raises_with_the_field(api: RetrievalClient) -> None:
    with pytest.raises(RequestRejected) as rejected:
        api.retrieve({"dense": [0.0] * 999}, k=5)
    assert rejected.value.status == 422 and rejected.value.detail[0]["loc"] == ["body", "user", "dense"]


def test_a_wrong_token_is_rejected_not_retried(served: ServingState) -> None:
    app = create_app(ApiSettings(items_token=TOKEN), served)
    with TestClient(app, base_url="http://api") as http, pytest.raises(RequestRejected) as rejected:
        RetrievalClient(http_client=http, items_token="wrong").send_item_events([CREATE])
    assert rejected.value.status == 403


def test_the_api_reports_the_version_written_in_pyproject(api: RetrievalClient) -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    written = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert api.http.get("/openapi.json").json()["info"]["version"] == package_version() == written


def scripted(answers: list[httpx.Response | Exception], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle)


ACCEPTED = {"accepted": 1, "topic": "hsnn.items", "records": [{"ad_id": 88, "partition": 0, "offset": 7}]}


def test_retries_honour_retry_after_then_succeed() -> None:
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503, json={"detail": "not acknowledged"}, headers={"Retry-After": "2"}),
        httpx.ConnectError("refused"),
        httpx.Response(429, json={"detail": "queue full"}, headers={"Retry-After": "60"}),
        httpx.Response(202, json=ACCEPTED),
    ]
    slept: list[float] = []
    http = httpx.Client(transport=scripted(answers, seen), base_url="http://api")
    client = RetrievalClient(
        http_client=http, items_token=TOKEN, sleep=slept.append, retry=RetryPolicy(backoff_s=0.5, max_delay_s=30)
    )
    assert client.send_item_events([CREATE]).records[0].offset == 7
    assert slept == [2.0, 1.0, 30.0]  # Retry-After; back-off after a connection error; Retry-After capped
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in seen)
    assert json.loads(seen[0].content)["events"][0]["ad_id"] == 88


def test_gives_up_with_the_last_answer() -> None:
    answers = [httpx.Response(503, json={"detail": "no model"}, headers={"Retry-After": "0"}) for _ in range(3)]
    http = httpx.Client(transport=scripted(answers, []), base_url="http://api")
    client = RetrievalClient(http_client=http, retry=RetryPolicy(attempts=3), sleep=lambda _: None)
    with pytest.raises(Unavailable) as failed:
        client.schema()
    assert failed.value.status == 503 and failed.value.detail == "no model" and not answers


def test_async_client_retries_the_same_way(served: ServingState) -> None:
    app = create_app(ApiSettings(beams=[8, 4], max_wait_ms=0), served)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> tuple[int, int]:
        real = httpx.ASGITransport(app=app)
        calls = 0

        async def flaky(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls == 1:
                return httpx.Response(429, json={"detail": "busy"}, headers={"Retry-After": "1"})
            return await real.handle_async_request(request)

        http = httpx.AsyncClient(transport=httpx.MockTransport(flaky), base_url="http://api")
        async with AsyncRetrievalClient(http_client=http, sleep=sleep) as client:
            schema = await client.schema()
            answer = await client.retrieve({"dense": [0.0] * schema.features.user_dense_dim}, k=3)
        return len(answer.ads), calls

    async def with_lifespan() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            return await scenario()

    assert asyncio.run(with_lifespan()) == (3, 3)
    assert slept == [1.0]
