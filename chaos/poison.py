"""E5 (event and API side): numeric poison is rejected where it enters, so consumers dead-letter it.

Every poisoned record is a finite JSON number that breaks float32 (1e300 becomes inf), a literal past
the double range (1e309, which Python reads as inf), a non-finite token, or a value past the contract's
magnitude bound, placed in each numeric field of impressions, item events and retrieval requests.
Pass: every poisoned record raises `MalformedEvent` (the trainer and indexer route exactly those to
their dead-letter topics, and the letter builds), every poisoned request is 422 with nothing
forwarded to Kafka, and the clean controls beside them all pass (no over-rejection).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch

from chaos.report import ExperimentResult
from chaos.world import BEAMS, StatusCounter, planted_world, request_bodies, tiny_model
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource, ServingPair, ServingState
from streaming.events import (
    IMPRESSIONS_TOPIC,
    MAX_FEATURE_MAGNITUDE,
    MalformedEvent,
    dead_letter_record,
    decode_impression,
    decode_item,
    read_dead_letter,
)

T0 = 1_767_225_000.0
TOKEN = "chaos-e5-token"
POISON_NUMBERS = [1e300, -1e300, 3.5e38, -3.5e38, 1e39, MAX_FEATURE_MAGNITUDE * 2]
POISON_TOKENS = ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"]  # written into the raw JSON
MARK = 123456.789  # placeholder value replaced by a poison token in the raw JSON

IMPRESSION = {
    "schema_version": 1,
    "event_id": "e5-1",
    "event_time": T0,
    "user": {"dense": [0.1, -0.2], "history": [{"attributes": {"item_id": 3}, "age_hours": 2.0}]},
    "ad_id": 7,
    "labels": {"click": 1, "conversion": 0},
    "soft_labels": {"click": 0.4, "conversion": 0.1},
}
ITEM = {
    "schema_version": 1,
    "op": "create",
    "ad_id": 7,
    "event_time": T0,
    "sequence": 1,
    "features": {"dense": [0.5, 1.5, -0.5, 0.25], "sparse": {"advertiser": 3}},
}

Setter = Callable[[dict[str, Any], Any], None]
IMPRESSION_FIELDS: dict[str, Setter] = {
    "user.dense": lambda e, v: e["user"]["dense"].__setitem__(1, v),
    "user.history.age_hours": lambda e, v: e["user"]["history"][0].__setitem__("age_hours", v),
    "event_time": lambda e, v: e.__setitem__("event_time", v),
    "soft_labels.click": lambda e, v: e["soft_labels"].__setitem__("click", v),
}
ITEM_FIELDS: dict[str, Setter] = {
    "features.dense": lambda e, v: e["features"]["dense"].__setitem__(2, v),
    "event_time": lambda e, v: e.__setitem__("event_time", v),
}


def poisoned_records(template: dict, fields: dict[str, Setter]) -> list[tuple[str, bytes]]:
    """(label, raw JSON) for every field x every poison value."""
    records = []
    for name, put in fields.items():
        for value in POISON_NUMBERS:
            if name == "event_time" and abs(value) < 1e11:
                continue  # 2e6 epoch seconds is a valid (if old) time, not poison
            event = copy.deepcopy(template)
            put(event, value)
            records.append((f"{name}={value:g}", json.dumps(event).encode()))
        for token in POISON_TOKENS:
            event = copy.deepcopy(template)
            put(event, MARK)
            raw = json.dumps(event).replace(repr(MARK), token).encode()
            records.append((f"{name}={token}", raw))
    return records


def _decode_side(checks: dict[str, Any]) -> tuple[int, int, int]:
    """Returns (poison injected, poison accepted, controls rejected)."""
    injected = accepted = controls_rejected = 0
    for decode, template, fields, topic in (
        (decode_impression, IMPRESSION, IMPRESSION_FIELDS, IMPRESSIONS_TOPIC),
        (decode_item, ITEM, ITEM_FIELDS, "hsnn.items"),
    ):
        try:
            decode(json.dumps(template).encode())
        except MalformedEvent:
            controls_rejected += 1
        for label, raw in poisoned_records(template, fields):
            injected += 1
            try:
                decode(raw)
                accepted += 1
                checks.setdefault("accepted", []).append(f"{topic}: {label}")
            except MalformedEvent as err:
                letter = read_dead_letter(dead_letter_record(raw, err.reason, topic, 0, injected))
                assert letter.source_topic == topic
    return injected, accepted, controls_rejected


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, topic: str, *, key: bytes, value: bytes) -> Any:
        self.sent.append(value)
        raise RuntimeError("E5 never expects a poisoned event to be sent")

    def close(self, timeout: float | None = None) -> None:
        pass


async def _api_side(checks: dict[str, Any]) -> tuple[int, int, int, int]:
    """Returns (poison injected, poison accepted, controls rejected, 5xx)."""
    world = planted_world()
    model = tiny_model(0)
    index, version = CatalogIndexSource(Catalog(world.item_ids, world.items)).load(model, 1)
    pair = ServingPair(model=model, index=index, model_version=1, index_version=version)
    producer = RecordingProducer()
    app = create_app(ApiSettings(beams=BEAMS, items_token=TOKEN), ServingState(pair), item_producer=producer)
    counter = StatusCounter(app)
    body = request_bodies(world, 1)[0]
    requests: list[tuple[str, str, Any]] = [("control", "/retrieve", body)]  # payload: a dict, or raw JSON text
    for value in POISON_NUMBERS:
        poisoned = copy.deepcopy(body)
        poisoned["user"]["dense"][0] = value
        requests.append((f"retrieve dense={value:g}", "/retrieve", poisoned))
        aged = copy.deepcopy(body)
        aged["user"]["history"][0]["age_hours"] = abs(value)
        requests.append((f"retrieve age_hours={abs(value):g}", "/retrieve", aged))
        item = copy.deepcopy(ITEM)
        ITEM_FIELDS["features.dense"](item, value)
        requests.append((f"items dense={value:g}", "/items/events", {"events": [item]}))
    requests.append(("retrieve exclude_ad_ids=1e30", "/retrieve", {**body, "exclude_ad_ids": [10**30]}))
    for literal in ("1e309", "-1e309"):  # raw bodies: json.dumps cannot write them
        marked = copy.deepcopy(body)
        marked["user"]["dense"][0] = MARK
        requests.append((f"retrieve dense={literal}", "/retrieve", json.dumps(marked).replace(repr(MARK), literal)))
        item = copy.deepcopy(ITEM)
        ITEM_FIELDS["features.dense"](item, MARK)
        raw_events = json.dumps({"events": [item]}).replace(repr(MARK), literal)
        requests.append((f"items dense={literal}", "/items/events", raw_events))
    injected = accepted = controls_rejected = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=counter), base_url="http://api") as client:
        for label, path, payload in requests:
            content = payload if isinstance(payload, str) else json.dumps(payload)
            response = await client.post(path, content=content, headers=headers)
            if label == "control":
                controls_rejected += response.status_code != 200
                continue
            injected += 1
            if response.status_code != 422:
                accepted += 1
                checks.setdefault("accepted", []).append(f"{label}: {response.status_code}")
    checks["forwarded_to_kafka"] = len(producer.sent)
    return injected, accepted + len(producer.sent), controls_rejected, counter.server_errors


def run_e5() -> ExperimentResult:
    started = time.monotonic()
    torch.set_num_threads(1)
    result = ExperimentResult("e5", "numeric poison rejected at validation (event + API side)", "python -m chaos e5")
    injected, accepted, controls = _decode_side(result.checks)
    api_injected, api_accepted, api_controls, server_errors = asyncio.run(_api_side(result.checks))
    result.runs = 1
    result.faults_injected = injected + api_injected
    result.http_5xx = server_errors
    result.lost = controls + api_controls  # clean records refused beside the poison
    result.checks.update(poison_accepted=accepted + api_accepted, records=injected, requests=api_injected)
    return result.finish(accepted + api_accepted == 0 and result.lost == 0 and server_errors == 0, started)
