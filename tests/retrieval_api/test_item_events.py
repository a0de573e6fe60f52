"""POST /items/events with a fake producer: authentication, validation, acknowledgement handling."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from retrieval_api.app import create_app
from retrieval_api.items import ItemForwarder
from retrieval_api.schemas import ITEM_EVENTS_EXAMPLE
from retrieval_api.settings import ApiSettings
from streaming.events import ItemEvent, decode_item, encode

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CREATE = copy.deepcopy(ITEM_EVENTS_EXAMPLE["events"][0])  # the create of the OpenAPI example (ad 1207)
assert CREATE["op"] == "create" and CREATE["ad_id"] == 1207
EXPIRE = {"schema_version": 1, "op": "expire", "ad_id": 88, "event_time": 1767225010, "sequence": 4}


@dataclass
class Metadata:
    partition: int
    offset: int


class Future:
    def __init__(self, result: Metadata | None = None, error: Exception | None = None):
        self.result, self.error = result, error

    def get(self, timeout: float | None = None) -> Metadata:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class FakeProducer:
    """Records what was sent; fails the records whose ad id is in `fail`."""

    def __init__(self, fail: dict[int, Exception] | None = None):
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = fail or {}
        self.closed = False

    def send(self, topic: str, *, key: bytes, value: bytes) -> Future:
        self.sent.append((topic, key, value))
        ad_id = int(key)
        if ad_id in self.fail:
            return Future(error=self.fail[ad_id])
        return Future(Metadata(partition=ad_id % 2, offset=len(self.sent) - 1))

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def client_for(producer: FakeProducer | None = None, token: str | None = TOKEN, **overrides) -> TestClient:
    settings = ApiSettings(items_token=token, **overrides)
    return TestClient(create_app(settings, item_producer=producer or FakeProducer()))


def test_accepted_events_are_forwarded_keyed_by_ad_id_with_the_contract_bytes():
    producer = FakeProducer()
    with client_for(producer, items_topic="test.items") as client:
        response = client.post("/items/events", json={"events": [CREATE, EXPIRE]}, headers=AUTH)
        assert response.status_code == 202, response.text
        metrics = client.get("/metrics").text
    assert producer.closed  # the lifespan closes the producer
    body = response.json()
    assert body["accepted"] == 2 and body["topic"] == "test.items"
    assert body["records"] == [{"ad_id": 1207, "partition": 1, "offset": 0}, {"ad_id": 88, "partition": 0, "offset": 1}]
    events = [ItemEvent.model_validate(CREATE), ItemEvent.model_validate(EXPIRE)]
    assert producer.sent == [("test.items", str(e.ad_id).encode(), encode(e)) for e in events]
    assert [decode_item(value) for _, _, value in producer.sent] == events
    assert 'hsnn_api_item_events_total{outcome="acknowledged"} 2.0' in metrics


def test_no_configured_token_means_disabled_not_open():
    producer = FakeProducer()
    client = client_for(producer, token=None)
    for headers in ({}, AUTH):
        response = client.post("/items/events", json={"events": [CREATE]}, headers=headers)
        assert response.status_code == 503
        assert response.json()["detail"].startswith("item events disabled")
    assert client_for(producer, token="").post("/items/events", json={"events": [CREATE]}).status_code == 503
    assert producer.sent == []


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", TOKEN])
def test_missing_bearer_token_is_401_with_a_challenge(header):
    client = client_for()
    headers = {} if header is None else {"Authorization": header}
    response = client.post("/items/events", json={"events": [CREATE]}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"] == "a bearer token is required"


def test_wrong_token_is_403_and_auth_comes_before_validation():
    producer = FakeProducer()
    client = client_for(producer)
    for token in ("wrong", TOKEN + "x", TOKEN[:-1], "ünïcode"):
        header = f"Bearer {token}".encode("latin-1")  # HTTP header bytes; non-ASCII must not crash the comparison
        response = client.post("/items/events", json={"events": [CREATE]}, headers={"Authorization": header})
        assert response.status_code == 403, token
    # a stranger learns nothing about the contract: no 422 details before authentication
    assert client.post("/items/events", json={"events": [{"op": "nope"}]}).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert client.post("/items/events", json={"events": [{"op": "nope"}]}, headers=bad).status_code == 403
    assert producer.sent == []


def messages(response) -> str:
    assert response.status_code == 422, response.text
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"])


def test_invalid_batches_are_422_with_clear_messages():
    producer = FakeProducer()
    client = client_for(producer)
    post = lambda body: client.post("/items/events", json=body, headers=AUTH)  # noqa: E731
    assert "body.events: List should have at least 1 item" in messages(post({"events": []}))
    assert "at most 1000 items" in messages(post({"events": [EXPIRE] * 1001}))
    assert "body.events: Field required" in messages(post({"evnts": [CREATE]}))
    assert "Extra inputs are not permitted" in messages(post({"events": [CREATE], "colour": 1}))
    expire_with_features = {**EXPIRE, "features": CREATE["features"]}
    # `op` selects the shape: the error path names the op, then the field
    assert "body.events.1.expire.features: Input should be None" in messages(
        post({"events": [CREATE, expire_with_features]})
    )
    assert "body.events.0.create.features: Field required" in messages(post({"events": [{**EXPIRE, "op": "create"}]}))
    assert "body.events.0.update.features: Field required" in messages(post({"events": [{**EXPIRE, "op": "update"}]}))
    assert "body.events.0.expire.ad_id: Input should be a valid integer" in messages(
        post({"events": [{**EXPIRE, "ad_id": "88"}]})
    )
    assert "greater than or equal to 1" in messages(post({"events": [{**EXPIRE, "ad_id": 0}]}))
    assert "less than or equal to 9223372036854775807" in messages(post({"events": [{**EXPIRE, "ad_id": 2**64}]}))
    assert "valid integer" in messages(post({"events": [{**EXPIRE, "sequence": True}]}))  # a bool is not an integer
    assert "epoch milliseconds sent?" in messages(post({"events": [{**EXPIRE, "event_time": 1767225010000}]}))
    assert "Input tag 'delete' found using 'op' does not match any of the expected tags" in messages(
        post({"events": [{**EXPIRE, "op": "delete"}]})
    )
    assert "body.events.0.expire.schema_version: Input should be 1" in messages(
        post({"events": [{**EXPIRE, "schema_version": 2}]})
    )
    assert "body.events.0.create.features.dense.0" in messages(
        post({"events": [{**CREATE, "features": {"dense": ["x"], "sparse": {}}}]})
    )
    assert "less than or equal to 1000000" in messages(
        post({"events": [{**CREATE, "features": {"dense": [1e300], "sparse": {}}}]})
    )
    response = client.post("/items/events", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in json.dumps(response.json())
    assert producer.sent == []


def test_unacknowledged_events_are_503_and_named():
    producer = FakeProducer(fail={88: TimeoutError("no ack")})
    client = client_for(producer)
    third = {**CREATE, "ad_id": 5}
    response = client.post("/items/events", json={"events": [CREATE, EXPIRE, third]}, headers=AUTH)
    assert response.status_code == 503
    body = response.json()
    assert body["detail"].startswith("1 of 3 events were not acknowledged by Kafka; retry the batch")
    assert body["not_acknowledged"] == [{"index": 1, "ad_id": 88, "error": "not acknowledged within 2s (TimeoutError)"}]
    assert response.headers["retry-after"] == "1"
    metrics = client.get("/metrics").text
    assert 'hsnn_api_item_events_total{outcome="not_acknowledged"} 1.0' in metrics
    assert 'hsnn_api_item_events_total{outcome="acknowledged"} 2.0' in metrics


def test_producer_is_created_lazily_and_a_broker_outage_is_reported():
    calls = []

    def unreachable(settings):
        calls.append(settings.kafka_bootstrap_servers)
        raise ConnectionError("no brokers available")

    settings = ApiSettings(items_token=TOKEN, kafka_bootstrap_servers="127.0.0.1:1", kafka_ack_timeout_s=0.2)
    forwarder = ItemForwarder(settings, producer_factory=unreachable)
    assert calls == []  # nothing is created before the first event
    acknowledged, failed = forwarder.forward([ItemEvent.model_validate(CREATE), ItemEvent.model_validate(EXPIRE)])
    assert acknowledged == [] and [f.index for f in failed] == [0, 1]
    assert failed[0].error == "no Kafka producer: ConnectionError: no brokers available"
    _, failed = forwarder.forward([ItemEvent.model_validate(CREATE)])
    assert calls == ["127.0.0.1:1"]  # an outage costs one connection attempt per timeout, not one per request
    assert "no brokers available (retried after 0.2s)" in failed[0].error
    time.sleep(0.25)
    forwarder.forward([ItemEvent.model_validate(CREATE)])
    assert calls == ["127.0.0.1:1", "127.0.0.1:1"]  # retried once the timeout has passed


def test_token_comes_from_the_environment_and_never_from_a_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HSNN_API_ITEMS_TOKEN", "from-env")
    assert ApiSettings().items_token.get_secret_value() == "from-env"
    assert "from-env" not in repr(ApiSettings())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"api": {"items_token": "in-a-file", "max_batch": 8}}))
    monkeypatch.setenv("HSNN_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="items_token is a secret: set it in the environment"):
        ApiSettings()
    config.write_text(json.dumps({"api": {"max_batch": 8}}))
    assert ApiSettings().max_batch == 8


def test_openapi_documents_the_item_endpoint():
    schema = create_app(ApiSettings()).openapi()
    post = schema["paths"]["/items/events"]["post"]
    assert set(post["responses"]) >= {"202", "401", "403", "422", "503"}
    assert post["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["schemas"]["ItemEventsRequest"]["examples"]


def test_a_producer_that_acknowledges_nothing_is_replaced():
    """A killed and restarted broker can leave the producer stuck (chaos E2): dropped, the next batch reconnects."""
    stuck = FakeProducer(fail={CREATE["ad_id"]: TimeoutError("stuck"), EXPIRE["ad_id"]: TimeoutError("stuck")})
    fresh = FakeProducer()
    made = []

    def factory(settings):
        made.append(fresh)
        return fresh

    settings = ApiSettings(items_token=TOKEN, kafka_ack_timeout_s=0.2)
    forwarder = ItemForwarder(settings, producer=stuck, producer_factory=factory)
    acknowledged, failed = forwarder.forward([ItemEvent.model_validate(CREATE), ItemEvent.model_validate(EXPIRE)])
    assert acknowledged == [] and len(failed) == 2
    _, failed = forwarder.forward([ItemEvent.model_validate(CREATE)])
    assert made == [] and "acknowledged nothing" in failed[0].error  # one reconnection per timeout, not per request
    time.sleep(0.25)
    acknowledged, failed = forwarder.forward([ItemEvent.model_validate(CREATE)])
    assert made == [fresh] and len(acknowledged) == 1 and failed == []
