"""The retrieval API end to end: validation, readiness, equality with exhaustive scoring, batching, hot swap."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from bench.exhaustive import retrieve_exhaustive
from hsnn.features import UserBatch
from hsnn.model import HSNN
from hsnn.serving import retrieve
from hsnn.training import train
from retrieval_api.app import create_app
from retrieval_api.batcher import Batcher, Overloaded
from retrieval_api.scoring import PairScorer, Query
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, ServingState, load_pair_from_store
from streaming.events import UserFeatures, users_to_batch
from streaming.snapshots import CorruptSnapshot, SnapshotStore
from worlds.planted import make_batches, make_users, make_world, tiny_hsnn_config, user_json

WIDE = [8, 32]  # every node of a (8, 4) index: layer-wise search then equals exhaustive scoring
NUM_USERS = 8


@pytest.fixture(scope="module")
def api_world():
    return make_world(num_items=400, seed=3)


@pytest.fixture(scope="module")
def store(api_world, tmp_path_factory) -> SnapshotStore:
    """Two snapshots: version 1, and version 2 trained a little further (so they rank differently)."""
    torch.manual_seed(0)
    batches = make_batches(api_world, 16, 128, seed=2, users_per_batch=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and robust to a busy machine
    try:
        first = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
        train(first, batches[:12])
        second = copy.deepcopy(first)
        train(second, batches[12:])
    finally:
        torch.set_num_threads(threads)
    store = SnapshotStore(tmp_path_factory.mktemp("snapshots"))
    assert store.write(first).version == 1
    assert store.write(second, parent=1).version == 2
    return store


@pytest.fixture(scope="module")
def pairs(store, api_world):
    catalog = Catalog(item_ids=api_world.item_ids, items=api_world.items)
    return {version: load_pair_from_store(store, version, catalog) for version in (1, 2)}


@pytest.fixture(scope="module")
def users(api_world) -> UserBatch:
    return make_users(api_world, NUM_USERS, seed=11)[0]


def make_client(pair=None, **overrides) -> tuple[httpx.AsyncClient, ServingState, object]:
    state = ServingState(pair)
    app = create_app(ApiSettings(**{"beams": WIDE, "max_wait_ms": 5, **overrides}), state)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    return client, state, app


def run(coro):
    return asyncio.run(coro)


def test_validation_errors_are_422_with_a_message(pairs, users):
    client = TestClient(make_client(pairs[1])[2])
    good = {"user": user_json(users, 0), "k": 5}
    assert client.post("/retrieve", json=good).status_code == 200

    def problem(body: dict) -> str:
        response = client.post("/retrieve", json=body)
        assert response.status_code == 422, response.text
        return " | ".join(f"{e['loc']}: {e['msg']}" for e in response.json()["detail"])

    assert "'k'" in problem({**good, "k": 0}) and "greater than or equal to 1" in problem({**good, "k": 0})
    assert "Extra inputs are not permitted" in problem({**good, "colour": "red"})
    assert "has 3 values, the schema needs user_dense_dim=2" in problem(
        {**good, "user": {**good["user"], "dense": [0.0] * 3}}
    )
    bad_sparse = {**good["user"], "sparse": {"segment": [1], "colour": [4]}}
    assert "unknown user sparse feature 'colour'" in problem({**good, "user": bad_sparse})
    bad_history = {**good["user"], "history": [{"attributes": {"brand": 3}, "age_hours": 1.0}]}
    assert "unknown history attribute 'brand'" in problem({**good, "user": bad_history})
    negative = {**good["user"], "sparse": {"segment": [-1]}}
    assert "greater than or equal to 0" in problem({**good, "user": negative})


def test_history_length_is_capped_by_settings(pairs, users):
    client = TestClient(make_client(pairs[1], max_history=2)[2])
    body = {"user": user_json(users, 0), "k": 5}
    body["user"]["history"] = [{"attributes": {"advertiser": 1}, "age_hours": 1.0}] * 3
    response = client.post("/retrieve", json=body)
    assert response.status_code == 422
    assert "at most 2 are accepted" in response.json()["detail"][0]["msg"]


def test_ready_only_once_a_pair_is_loaded(pairs, users):
    _, state, app = make_client()
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and "no model/index pair" in response.json()["detail"]
        assert client.post("/retrieve", json={"user": user_json(users, 0)}).status_code == 503
        state.swap(pairs[1])
        assert client.get("/readyz").status_code == 200
        assert client.post("/retrieve", json={"user": user_json(users, 0)}).status_code == 200


def test_wide_beams_equal_exhaustive_top_k(pairs, users):
    pair = pairs[1]
    client = TestClient(make_client(pair)[2])
    for row in range(NUM_USERS):
        response = client.post("/retrieve", json={"user": user_json(users, row), "k": 20, "exclude_ad_ids": [7]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model_version"], body["index_version"]) == (1, 1)
        exclude = [torch.tensor([7])]
        expected = retrieve_exhaustive(pair.model, pair.index, users.select(torch.tensor([row])), 20, exclude)[0]
        assert [ad["ad_id"] for ad in body["ads"]] == expected.item_ids.tolist()
        torch.testing.assert_close(torch.tensor([ad["score"] for ad in body["ads"]]), expected.scores)
        assert body["cost"]["items_scored"] == pair.index.num_items - 1
        assert body["cost"]["nodes_scored"] > 0 and body["cost"]["flops"] > 0


def test_request_users_convert_like_planted_users(pairs, users):
    converted = users_to_batch([UserFeatures(**user_json(users, r)) for r in range(NUM_USERS)], pairs[1].schema)
    pair = pairs[1]
    a = retrieve(pair.model, pair.index, converted, k=10, beams=[2, 2])
    b = retrieve(pair.model, pair.index, users, k=10, beams=[2, 2])
    assert [r.item_ids.tolist() for r in a] == [r.item_ids.tolist() for r in b]


def test_concurrent_requests_match_sequential_ones(pairs, users):
    client, _, app = make_client(pairs[1], beams=[3, 3], max_wait_ms=20)
    bodies = [{"user": user_json(users, row % NUM_USERS), "k": 5 + row} for row in range(16)]

    async def scenario():
        async with client:
            sequential = [await client.post("/retrieve", json=body) for body in bodies]
            concurrent = await asyncio.gather(*(client.post("/retrieve", json=body) for body in bodies))
        return sequential, concurrent

    sequential, concurrent = run(scenario())
    for one, many, body in zip(sequential, concurrent, bodies, strict=True):
        assert one.status_code == many.status_code == 200
        ids = [ad["ad_id"] for ad in one.json()["ads"]]
        assert ids == [ad["ad_id"] for ad in many.json()["ads"]] and len(ids) == body["k"]
    batches = app.state.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name == "hsnn_api_batch_size_count")
    assert count < 2 * len(bodies)  # the concurrent ones were scored together


def test_a_full_queue_answers_429(pairs, users):
    client, _, app = make_client(pairs[1], queue_size=1, max_batch=1, max_wait_ms=0)
    body = {"user": user_json(users, 0), "k": 5}

    async def scenario():
        async with client:
            return await asyncio.gather(*(client.post("/retrieve", json=body) for _ in range(12)))

    responses = run(scenario())
    assert {r.status_code for r in responses} == {200, 429}, [r.status_code for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["detail"] == "1 requests are already waiting; retry later"
    text = TestClient(app).get("/metrics").text
    assert 'hsnn_api_errors_total{outcome="overloaded"}' in text


def test_overloaded_batcher_says_why(pairs, users):
    batcher = Batcher(PairScorer(ServingState(pairs[1]), beams=WIDE), queue_size=1, max_wait_ms=0)
    user = UserFeatures(**user_json(users, 0))

    async def scenario():
        first = asyncio.create_task(batcher.submit(Query(user, 5)))
        await asyncio.sleep(0)  # first is queued, the worker has not taken it yet
        with pytest.raises(Overloaded, match="already waiting; retry later"):
            await batcher.submit(Query(user, 5))
        answer = await first
        await batcher.stop()
        return answer

    assert len(run(scenario()).result.item_ids) == 5


def test_deadline_passed_in_the_queue_answers_504(pairs, users):
    """A request queued behind a batch in flight whose deadline passes before scoring starts gets 504 (an idle
    service scores a lone request at once, so the worker is kept busy by a slowed-down first batch)."""
    client, _, app = make_client(pairs[1], max_wait_ms=100)
    batcher = app.state.batcher
    fast = batcher.score

    def slow(queries):
        time.sleep(0.3)
        return fast(queries)

    batcher.score = slow
    body = {"user": user_json(users, 0)}

    async def scenario():
        async with client:
            first = asyncio.create_task(client.post("/retrieve", json=body))
            await asyncio.sleep(0.1)  # the first request is being scored
            late = await client.post("/retrieve", json={**body, "deadline_ms": 1})
            return await first, late, await client.post("/retrieve", json={**body, "deadline_ms": 5000})

    first, late, relaxed = run(scenario())
    assert first.status_code == 200 and relaxed.status_code == 200
    assert late.status_code == 504
    assert "deadline passed" in late.json()["detail"]


def test_metrics_are_exposed(pairs, users):
    with TestClient(make_client(pairs[2])[2]) as client:
        client.post("/retrieve", json={"user": user_json(users, 0), "k": 3})
        client.post("/retrieve", json={"user": user_json(users, 0), "k": 0})
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "hsnn_api_request_latency_seconds_bucket",
        "hsnn_api_batch_size_bucket",
        "hsnn_api_queue_depth",
        "hsnn_api_model_version 2.0",
        "hsnn_api_index_version 2.0",
        "hsnn_api_model_loaded_timestamp_seconds",
        "hsnn_api_errors_total",
    ):
        assert name in text, name


def test_hot_swap_mid_load_never_mixes_versions(pairs, users):
    client, state, _ = make_client(pairs[1], beams=[3, 3], max_batch=4, max_wait_ms=1)
    k = 10
    expected = {
        version: [r.item_ids.tolist() for r in retrieve(pair.model, pair.index, users, k=k, beams=[3, 3])]
        for version, pair in pairs.items()
    }
    assert expected[1] != expected[2], "the two snapshots should rank differently"
    rows = [r % NUM_USERS for r in range(48)]

    async def scenario():
        async with client:
            post = lambda row: client.post("/retrieve", json={"user": user_json(users, row), "k": k})  # noqa: E731
            first = [asyncio.create_task(post(row)) for row in rows[:24]]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            state.swap(pairs[2])
            second = [asyncio.create_task(post(row)) for row in rows[24:]]
            responses = await asyncio.gather(*first, *second)
            after = await post(0)
        return responses, after

    responses, after = run(scenario())
    seen = set()
    for row, response in zip(rows, responses, strict=True):
        body = response.json()
        versions = (body["model_version"], body["index_version"])
        assert versions in {(1, 1), (2, 2)}
        seen.add(versions[0])
        assert [ad["ad_id"] for ad in body["ads"]] == expected[versions[0]][row]
    assert seen == {1, 2}
    assert after.json()["model_version"] == 2


def test_openapi_documents_the_endpoints():
    schema = create_app(ApiSettings(beams=WIDE)).openapi()
    assert {"/retrieve", "/livez", "/readyz", "/metrics"} <= set(schema["paths"])
    assert set(schema["paths"]["/retrieve"]["post"]["responses"]) >= {"200", "422", "429", "503", "504"}
    request = schema["components"]["schemas"]["RetrieveRequest"]
    assert request["additionalProperties"] is False and request["examples"]


def test_corrupt_snapshot_is_refused(store, api_world, tmp_path):
    copy_store = SnapshotStore(tmp_path)
    model, _ = store.load(1)
    copy_store.write(model)
    weights = copy_store.path(1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(CorruptSnapshot):
        load_pair_from_store(copy_store, 1, Catalog(api_world.item_ids, api_world.items))


def test_pairs_are_immutable_and_device_falls_back(pairs, monkeypatch, caplog):
    with pytest.raises(dataclasses.FrozenInstanceError):
        pairs[1].model_version = 3  # type: ignore[misc]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hsnn.retrieval_api"):
        assert ApiSettings(device="cuda").resolved_device() == "cpu"
    assert "no GPU" in caplog.text
