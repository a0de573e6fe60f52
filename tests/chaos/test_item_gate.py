"""What chaos E9 changed in POST /items/events: while Kafka is known to be down, batches are refused at the gate.

After a failure (no producer could be created, or one acknowledged nothing of a batch) and until
Kafka acknowledges a record again, the request gate answers 503 before the body is read, except
for one request per `kafka_ack_timeout_s` that goes through to try again. The token is still
checked first. `python -m chaos e9` is the full experiment (a real broker stopped under load).
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from retrieval_api.app import create_app
from retrieval_api.items import ItemForwarder
from retrieval_api.settings import ApiSettings

TOKEN = "gate-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPIRE = {"schema_version": 1, "op": "expire", "ad_id": 88, "event_time": 1767225010, "sequence": 4}
TIMEOUT_S = 0.3


class Acked:
    partition, offset = 0, 7

    def get(self, timeout: float | None = None) -> Acked:
        return self


class Broker:
    """A producer factory whose broker is down until `up` is set; counts connection attempts."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0

    def __call__(self, settings: ApiSettings) -> Broker:
        self.attempts += 1
        if not self.up:
            raise ConnectionError("no brokers available")
        return self

    def send(self, topic: str, *, key: bytes, value: bytes) -> Acked:
        return Acked()

    def close(self, timeout: float | None = None) -> None:
        pass


def gated_client() -> tuple[TestClient, Broker]:
    app = create_app(ApiSettings(items_token=TOKEN, kafka_ack_timeout_s=TIMEOUT_S))
    broker = Broker()
    forwarder: ItemForwarder = app.state.forwarder
    forwarder._factory = broker
    return TestClient(app), broker


def post(client: TestClient, body: object, headers: dict[str, str] = AUTH):
    return client.post("/items/events", json=body, headers=headers)


def test_while_kafka_is_down_batches_are_refused_before_their_body_is_read():
    client, broker = gated_client()
    with client:
        first = post(client, {"events": [EXPIRE] * 3})
        assert first.status_code == 503 and len(first.json()["not_acknowledged"]) == 3  # went to Kafka and failed
        assert broker.attempts == 1
        # Refused at the gate: the body is not even read (not JSON at all here), and no connection is tried.
        gated = client.post("/items/events", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
        assert gated.status_code == 503 and gated.headers["retry-after"] == "1"
        assert "Kafka is unavailable" in gated.json()["detail"] and "no brokers available" in gated.json()["detail"]
        assert broker.attempts == 1
        # The token is still checked first.
        assert post(client, {"events": [EXPIRE]}, headers={}).status_code == 401
        assert post(client, {"events": [EXPIRE]}, headers={"Authorization": "Bearer wrong"}).status_code == 403
        # One request per timeout goes through to try again; the others are still refused at the gate.
        time.sleep(TIMEOUT_S + 0.05)
        retried = post(client, {"events": [EXPIRE]})
        assert retried.status_code == 503 and "not_acknowledged" in retried.json() and broker.attempts == 2
        assert "detail" in post(client, {"events": [EXPIRE]}).json() and broker.attempts == 2
        # Back up: the request let through connects, and the first acknowledgement reopens the gate.
        broker.up = True
        time.sleep(TIMEOUT_S + 0.05)
        assert post(client, {"events": [EXPIRE]}).status_code == 202 and broker.attempts == 3
        assert [post(client, {"events": [EXPIRE]}).status_code for _ in range(3)] == [202, 202, 202]


def test_a_claim_that_never_reaches_kafka_lapses():
    """The request let through may fail validation (422) and never try Kafka: the next one tries after a timeout."""
    client, broker = gated_client()
    with client:
        assert post(client, {"events": [EXPIRE]}).status_code == 503 and broker.attempts == 1
        time.sleep(TIMEOUT_S + 0.05)
        assert post(client, {"events": [{"op": "expire"}]}).status_code == 422  # the claim, spent on a bad batch
        assert "detail" in post(client, {"events": [EXPIRE]}).json()  # still refused at the gate
        time.sleep(TIMEOUT_S + 0.05)
        assert "not_acknowledged" in post(client, {"events": [EXPIRE]}).json() and broker.attempts == 2
