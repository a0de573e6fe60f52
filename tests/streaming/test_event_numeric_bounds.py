"""Numeric poison is rejected by wire validation: every number that reaches a float32 tensor stays finite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streaming.events import (
    MAX_AGE_HOURS,
    MAX_FEATURE_MAGNITUDE,
    ItemEventByOp,
    ItemExpire,
    ItemUpsert,
    MalformedEvent,
    decode_impression,
    decode_item,
    encode,
)

T0 = 1_700_000_000.0


def impression(dense: list[float], age_hours: float = 1.0) -> dict:
    return {
        "schema_version": 1,
        "event_id": "imp-1",
        "event_time": T0,
        "user": {"dense": dense, "history": [{"attributes": {"item_id": 3}, "age_hours": age_hours}]},
        "ad_id": 7,
        "labels": {"click": 1, "conversion": 0},
    }


def item(dense: list[float]) -> dict:
    return {
        "schema_version": 1,
        "op": "create",
        "ad_id": 7,
        "event_time": T0,
        "sequence": 1,
        "features": {"dense": dense, "sparse": {}},
    }


def raw(payload: dict) -> bytes:
    return json.dumps(payload).encode()


# finite as a Python float, but not in float32 (or far beyond any normalised feature)
POISON = [1e300, -1e300, 3.5e38, 1e39, MAX_FEATURE_MAGNITUDE * 1.0001]


@pytest.mark.parametrize("value", POISON)
def test_dense_values_beyond_the_magnitude_bound_are_malformed(value):
    with pytest.raises(MalformedEvent, match=r"user\.dense\.1"):
        decode_impression(raw(impression([0.5, value])))
    with pytest.raises(MalformedEvent, match=r"features\.dense\.0"):
        decode_item(raw(item([value])))


def test_values_at_the_bound_pass_and_stay_finite_in_float32():
    event = decode_impression(raw(impression([MAX_FEATURE_MAGNITUDE, -MAX_FEATURE_MAGNITUDE], MAX_AGE_HOURS)))
    assert np.isfinite(np.asarray(event.user.dense, dtype=np.float32)).all()
    assert decode_item(raw(item([-MAX_FEATURE_MAGNITUDE]))).features.dense == [-MAX_FEATURE_MAGNITUDE]


@pytest.mark.parametrize("age", [1e300, MAX_AGE_HOURS * 2, -1.0])
def test_history_age_is_bounded(age):
    with pytest.raises(MalformedEvent, match="age_hours"):
        decode_impression(raw(impression([0.0, 0.0], age)))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_constants_are_malformed(token):
    text = raw(impression([0.0, 0.0])).replace(b"[0.0, 0.0]", f"[0.0, {token}]".encode())
    with pytest.raises(MalformedEvent):
        decode_impression(text)


def test_op_specific_item_events_encode_like_item_events():
    from pydantic import TypeAdapter

    events = TypeAdapter(list[ItemEventByOp]).validate_python(
        [item([1.0]), {"schema_version": 1, "op": "expire", "ad_id": 7, "event_time": T0, "sequence": 2}]
    )
    assert [type(e) for e in events] == [ItemUpsert, ItemExpire]
    assert [decode_item(encode(e)) for e in events] == [decode_item(raw(e.model_dump())) for e in events]
    schema = TypeAdapter(ItemEventByOp).json_schema()
    assert "features" in schema["$defs"]["ItemUpsert"]["required"]
    assert "features" not in schema["$defs"]["ItemExpire"].get("required", [])
    assert schema["discriminator"]["propertyName"] == "op"
