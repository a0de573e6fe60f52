"""Hostile input at the API boundary: 422 not 500, per-query isolation, 413 before buffering, auth before the body,
bounded Kafka waits that never hold up /retrieve."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from bench.loadgen import user_bodies
from hsnn.model import HSNN
from retrieval_api.app import create_app
from retrieval_api.batcher import Batcher, QueryFailed
from retrieval_api.scoring import PairScorer, Query
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource, ServingPair, ServingState
from streaming.events import UserFeatures
from worlds.planted import make_users, make_world, tiny_hsnn_config

BEAMS = [3, 3]
TOKEN = "hostile-input-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPIRE = {"schema_version": 1, "op": "expire", "ad_id": 88, "event_time": 1767225010.0, "sequence": 4}


@pytest.fixture(scope="module")
def pair() -> ServingPair:
    world = make_world(num_items=300, seed=5)
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4))).eval()
    index, version = CatalogIndexSource(Catalog(world.item_ids, world.items)).load(model, 1)
    return ServingPair(model=model, index=index, model_version=1, index_version=version)


@pytest.fixture(scope="module")
def bodies() -> list[dict]:
    world = make_world(num_items=300, seed=5)
    return user_bodies(make_users(world, 8, seed=2)[0], k=5)


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=30)


def post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def scenario():
        async with client_for(app) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"exclude_ad_ids": [10**30]}, "exclude_ad_ids"),
        ({"exclude_ad_ids": [2**63]}, "exclude_ad_ids"),
        ({"exclude_ad_ids": [-1]}, "exclude_ad_ids"),
        ({"exclude_ad_ids": [False]}, "exclude_ad_ids"),  # a JSON bool is not an integer
        ({"k": True}, "k"),
        ({"k": 5.5}, "k"),
        ({"k": "5"}, "k"),
        ({"deadline_ms": True}, "deadline_ms"),
    ],
)
def test_out_of_range_and_non_integer_numbers_are_422(pair, bodies, change, where):
    app = create_app(ApiSettings(beams=BEAMS), ServingState(pair))
    (response,) = post_all(app, [("/retrieve", {**bodies[0], **change})])
    assert response.status_code == 422, response.text
    assert where in str(response.json()["detail"][0]["loc"])


@pytest.mark.parametrize("value", [1e300, -1e300, 3.5e38, 1e7])
def test_dense_values_that_overflow_float32_or_pass_the_bound_are_422(pair, bodies, value):
    app = create_app(ApiSettings(beams=BEAMS), ServingState(pair))
    body = {**bodies[0], "user": {**bodies[0]["user"], "dense": [value, 0.0]}}
    (response,) = post_all(app, [("/retrieve", body)])
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-2:] == ["dense", 0]


@pytest.mark.parametrize(
    ("path", "replace", "where"),
    [
        ("/retrieve", ('"k": 5', '"k": 1e309'), "k"),
        ("/retrieve", ('"dense": [', '"dense": [-1e309, '), "dense"),
        ("/retrieve", ('"age_hours": ', '"age_hours": 1e999, "x": '), "age_hours"),
        ("/items/events", ('"event_time": 1767225010.0', '"event_time": 1e309'), "event_time"),
    ],
)
def test_numbers_beyond_float_range_are_422_not_500(pair, bodies, path, replace, where):
    """Python reads 1e309 as inf; echoing it back in the 422 must not break the JSON answer."""
    app = create_app(ApiSettings(beams=BEAMS, items_token=TOKEN), ServingState(pair))
    body = json.dumps(bodies[0] if path == "/retrieve" else {"events": [EXPIRE]})
    assert replace[0] in body
    raw = body.replace(replace[0], replace[1], 1)

    async def scenario():
        async with client_for(app) as client:
            headers = {"Content-Type": "application/json", **(AUTH if path == "/items/events" else {})}
            return await client.post(path, content=raw, headers=headers)

    response = asyncio.run(scenario())
    assert response.status_code == 422, response.text
    assert where in json.dumps(response.json()["detail"])


def test_schema_refusals_of_retrieve_count_as_invalid(pair, bodies):
    app = create_app(ApiSettings(beams=BEAMS, items_token=TOKEN), ServingState(pair))

    async def scenario():
        async with client_for(app) as client:
            await client.post("/retrieve", json={**bodies[0], "k": 0})
            await client.post("/retrieve", json={**bodies[0], "deadline_ms": True})
            await client.post("/items/events", json={"events": [{**EXPIRE, "ad_id": -1}]}, headers=AUTH)
            return (await client.get("/metrics")).text

    assert 'hsnn_api_errors_total{outcome="invalid"} 2.0' in asyncio.run(scenario())


def test_integral_numbers_are_integers_as_in_json_schema(pair, bodies):
    app = create_app(ApiSettings(beams=BEAMS), ServingState(pair))
    (response,) = post_all(app, [("/retrieve", {**bodies[0], "k": 5.0, "exclude_ad_ids": [7e0]})])
    assert response.status_code == 200, response.text
    assert len(response.json()["ads"]) == 5 and 7 not in {ad["ad_id"] for ad in response.json()["ads"]}


def test_the_dense_bound_is_configurable(pair, bodies):
    app = create_app(ApiSettings(beams=BEAMS, max_dense_magnitude=10), ServingState(pair))
    body = lambda v: {**bodies[0], "user": {**bodies[0]["user"], "dense": [0.0, v]}}  # noqa: E731
    fine, beyond = post_all(app, [("/retrieve", body(10.0)), ("/retrieve", body(-10.5))])
    assert fine.status_code == 200, fine.text
    assert beyond.status_code == 422 and "beyond the accepted magnitude 10" in beyond.text
    assert all(ad["score"] is not None for ad in fine.json()["ads"])


def test_31_valid_requests_beside_a_poisoned_one_all_get_200(pair, bodies):
    """The issue's scenario over HTTP: 32 concurrent requests, one with an id that overflows int64."""
    app = create_app(ApiSettings(beams=BEAMS, max_batch=32, max_wait_ms=50), ServingState(pair))
    requests = [("/retrieve", bodies[i % len(bodies)]) for i in range(31)]
    requests.insert(17, ("/retrieve", {**bodies[0], "exclude_ad_ids": [10**30]}))
    responses = post_all(app, requests)
    codes = [r.status_code for r in responses]
    assert codes.pop(17) == 422
    assert codes == [200] * 31


def test_a_query_that_fails_in_scoring_fails_alone(pair, bodies):
    """Past validation (submitted straight to the batcher), a poisoned query in a batch of 32 fails alone."""
    sizes: list[int] = []
    batcher = Batcher(PairScorer(ServingState(pair), BEAMS), max_batch=32, max_wait_ms=200, on_batch=sizes.append)
    users = [UserFeatures(**bodies[i % len(bodies)]["user"]) for i in range(32)]

    async def scenario():
        tasks = [
            batcher.submit(Query(user, 5, exclude=[10**30] if i == 9 else []), deadline_ms=None)
            for i, user in enumerate(users)
        ]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert sizes[0] == 32  # they really shared one micro-batch
    assert isinstance(outcomes[9], QueryFailed)
    good = [o for i, o in enumerate(outcomes) if i != 9]
    assert all(len(answer.result.item_ids) == 5 for answer in good)


def test_declared_oversized_bodies_are_413_without_reading_them():
    app = create_app(ApiSettings(beams=BEAMS, max_body_bytes=4096, items_token=TOKEN))
    read: list[int] = []

    async def scenario(path: str, headers: dict[str, str]):
        async def receive():
            read.append(1)
            return {"type": "http.request", "body": b"x" * 4096, "more_body": True}

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        raw = [(k.lower().encode(), v.encode()) for k, v in {**headers, "content-length": "200000000"}.items()]
        scope = {"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}
        scope |= {"http_version": "1.1", "scheme": "http", "server": ("api", 80), "client": ("t", 1), "root_path": ""}
        await app(scope, receive, send)
        return sent[0]["status"]

    assert asyncio.run(scenario("/retrieve", {})) == 413
    assert asyncio.run(scenario("/items/events", AUTH)) == 413
    assert read == []  # not one chunk of the body was pulled in


def test_streamed_oversized_bodies_are_413_after_at_most_the_limit():
    limit, chunk = 64 << 10, 8 << 10
    app = create_app(ApiSettings(beams=BEAMS, max_body_bytes=limit, items_token=TOKEN))
    produced = []

    async def body():  # no Content-Length: a chunked upload of 50 MB
        for _ in range((50 << 20) // chunk):
            produced.append(chunk)
            yield b" " * chunk

    async def scenario(path: str, headers: dict[str, str]):
        async with client_for(app) as client:
            return await client.post(path, content=body(), headers={"Content-Type": "application/json", **headers})

    for path, headers in (("/retrieve", {}), ("/items/events", AUTH)):
        produced.clear()
        response = asyncio.run(scenario(path, headers))
        assert response.status_code == 413, response.text
        assert f"at most {limit} bytes" in response.json()["detail"]
        assert sum(produced) <= limit + 2 * chunk


def test_item_events_authenticate_before_the_body_is_read():
    app = create_app(ApiSettings(items_token=TOKEN))
    pulled: list[int] = []

    async def scenario(headers: dict[str, str]) -> int:
        async def receive():
            pulled.append(1)
            return {"type": "http.request", "body": b'{"events": [', "more_body": False}

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        scope = {"type": "http", "method": "POST", "path": "/items/events", "headers": raw, "query_string": b""}
        scope |= {"http_version": "1.1", "scheme": "http", "server": ("api", 80), "client": ("t", 1), "root_path": ""}
        await app(scope, receive, send)
        return sent[0]["status"]

    assert asyncio.run(scenario({})) == 401
    assert asyncio.run(scenario({"Authorization": "Bearer wrong"})) == 403
    assert pulled == []
    assert asyncio.run(scenario(AUTH)) == 422  # with the right token the (broken) body is read and refused
    assert pulled == [1]


class StuckProducer:
    """A producer whose every call blocks (a broker that accepted the connection and went silent)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def send(self, topic, *, key, value):
        self.release.wait(30)
        raise TimeoutError("metadata never came")

    def close(self, timeout=None):
        pass


def test_kafka_outage_answers_503_in_time_and_never_holds_up_retrieve(pair, bodies):
    release = threading.Event()
    created: list[float] = []

    def slow_bootstrap(settings):  # like kafka-python's constructor against a dead broker
        created.append(time.monotonic())
        release.wait(30)
        raise ConnectionError("Unable to bootstrap")

    settings = ApiSettings(beams=BEAMS, items_token=TOKEN, kafka_ack_timeout_s=0.5, kafka_workers=2, max_wait_ms=1)
    app = create_app(settings, ServingState(pair))
    app.state.forwarder._factory = slow_bootstrap
    events = {"events": [EXPIRE] * 1000}

    async def scenario():
        async with client_for(app) as client:

            async def post_items():
                started = time.monotonic()
                response = await client.post("/items/events", json=events, headers=AUTH)
                return response, time.monotonic() - started

            async def retrieve_latencies():
                latencies = []
                for i in range(20):
                    started = time.monotonic()
                    response = await client.post("/retrieve", json=bodies[i % len(bodies)])
                    assert response.status_code == 200
                    latencies.append(time.monotonic() - started)
                return latencies

            items = [asyncio.create_task(post_items()) for _ in range(8)]
            latencies = await retrieve_latencies()
            return await asyncio.gather(*items), latencies

    try:
        answers, latencies = asyncio.run(scenario())
    finally:
        release.set()
    for response, elapsed in answers:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert elapsed < 0.5 + 3.0, elapsed  # the timeout plus slack for a busy machine, never the 30 s bootstrap
        assert len(response.json()["not_acknowledged"]) == 1000
    assert max(latencies) < 3.0, latencies  # /retrieve never waited for Kafka (blocked for 30 s)
    assert len(created) == 1  # one bootstrap attempt for all 8 batches
    details = " ".join(r.json()["not_acknowledged"][0]["error"] for r, _ in answers)
    assert "already waiting for Kafka" in details  # more batches than Kafka threads: refused at once


def test_a_silent_broker_is_bounded_too(pair):
    release = threading.Event()
    settings = ApiSettings(beams=BEAMS, items_token=TOKEN, kafka_ack_timeout_s=0.3)
    app = create_app(settings, ServingState(pair), item_producer=StuckProducer(release))

    async def scenario():
        async with client_for(app) as client:
            return await client.post("/items/events", json={"events": [EXPIRE] * 10}, headers=AUTH)

    try:
        started = time.monotonic()
        response = asyncio.run(scenario())
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert response.status_code == 503 and elapsed < 0.3 + 3.0, elapsed  # the send blocks for 30 s
    assert response.json()["not_acknowledged"][0]["error"] == "not acknowledged within 0.3s"


def test_openapi_discriminates_item_events_by_op_and_documents_limits():
    schema = create_app(ApiSettings()).openapi()
    components = schema["components"]["schemas"]
    events = components["ItemEventsRequest"]["properties"]["events"]["items"]
    assert events["discriminator"]["propertyName"] == "op"
    assert set(events["discriminator"]["mapping"]) == {"create", "update", "expire"}
    assert "features" in components["ItemUpsert"]["required"]
    assert "features" not in components["ItemExpire"].get("required", [])
    for path in ("/retrieve", "/items/events"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "413" in responses and "Retry-After" in responses["503"]["headers"]
    ids = components["RetrieveRequest"]["properties"]["exclude_ad_ids"]["items"]
    assert ids["minimum"] == 1 and ids["maximum"] == 2**63 - 1


class AckingProducer:
    class Acked:
        partition, offset = 0, 0

        def get(self, timeout=None):
            return self

    def send(self, topic, *, key, value):
        return self.Acked()

    def close(self, timeout=None):
        pass


def test_item_events_still_work_after_the_app_restarts():
    """The Kafka threads are released on shutdown and created again on the next start."""
    from fastapi.testclient import TestClient

    app = create_app(ApiSettings(items_token=TOKEN))
    app.state.forwarder._factory = lambda settings: AckingProducer()  # a new producer after each close
    for _ in range(2):
        with TestClient(app) as client:
            response = client.post("/items/events", json={"events": [EXPIRE]}, headers=AUTH)
            assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("literal", "status"), [("NaN", 400), ("Infinity", 400), ("-Infinity", 400), ('"NaN"', 422), ('"1e300"', 422)]
)
def test_non_finite_literals_are_not_json_and_number_strings_are_422(pair, bodies, literal, status):
    """Python's JSON reader accepts NaN/Infinity literals; the boundary refuses them as malformed JSON."""
    app = create_app(ApiSettings(beams=BEAMS), ServingState(pair))
    body = json.dumps({**bodies[0], "user": {**bodies[0]["user"], "dense": ["__X__", 0.0]}})
    raw = body.replace('"__X__"', literal)

    async def scenario():
        async with client_for(app) as client:
            return await client.post("/retrieve", content=raw, headers={"Content-Type": "application/json"})

    response = asyncio.run(scenario())
    assert response.status_code == status, response.text
