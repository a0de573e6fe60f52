"""Event contracts: wire round trips, one error type for every bad record, DLQ records, tensor conversion."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from hsnn.config import FeatureSchema
from streaming.events import (
    IMPRESSIONS_TOPIC,
    ITEMS_TOPIC,
    Engagement,
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    Labels,
    MalformedEvent,
    SchemaMismatch,
    SoftLabels,
    UnknownAd,
    UserFeatures,
    dead_letter_record,
    decode_impression,
    decode_item,
    encode,
    event_key,
    impressions_to_batch,
    items_to_batch,
    read_dead_letter,
    supersedes,
    users_to_batch,
)
from worlds.planted import SCHEMA

T0 = 1_700_000_000.0

# A small schema so hand-computed tensors stay readable: history keeps the newest 3 engagements.
SMALL = FeatureSchema(
    user_dense_dim=2,
    user_sparse={"segment": 16, "interests": 64},
    item_dense_dim=3,
    item_sparse={"item_id": 1000, "advertiser": 100, "category": 10},
    history_attributes=["item_id", "advertiser", "category"],
    interaction_attributes=["advertiser", "category"],
    history_length=3,
    tasks=["click", "conversion"],
)


def impression(**overrides) -> ImpressionEvent:
    fields = {
        "event_id": "imp-1",
        "event_time": T0,
        "user": UserFeatures(
            dense=[0.5, -1.0],
            sparse={"segment": [3]},
            history=[Engagement(attributes={"item_id": 11, "advertiser": 2, "category": 1}, age_hours=5.0)],
        ),
        "ad_id": 42,
        "labels": Labels(click=1, conversion=0),
    }
    return ImpressionEvent(**(fields | overrides))


def item_event(**overrides) -> ItemEvent:
    fields = {
        "op": "create",
        "ad_id": 42,
        "event_time": T0,
        "sequence": 1,
        "features": ItemFeatures(dense=[0.1, 0.2, 0.3], sparse={"advertiser": 7, "category": 2}),
    }
    return ItemEvent(**(fields | overrides))


def as_dict(event) -> dict:
    return json.loads(encode(event))


def to_bytes(payload: dict) -> bytes:
    return json.dumps(payload).encode()


# ---------------------------------------------------------------------------- wire format


def test_round_trip_impression_and_item():
    event = impression(soft_labels=SoftLabels(click=0.7, conversion=0.1))
    raw = encode(event)
    assert b" " not in raw  # compact
    assert decode_impression(raw) == event
    for op, features in [("create", item_event().features), ("update", item_event().features), ("expire", None)]:
        item = item_event(op=op, features=features)
        assert decode_item(encode(item)) == item
    assert "features" not in as_dict(item_event(op="expire", features=None))
    assert "soft_labels" not in as_dict(impression())
    assert event_key(item_event()) == b"42"
    assert event_key(impression()) == b"imp-1"
    assert IMPRESSIONS_TOPIC == "hsnn.impressions" and ITEMS_TOPIC == "hsnn.items"


def test_round_trip_keeps_unicode_and_large_ids():
    event = impression(event_id="imp-é✓", ad_id=2**63 - 1)
    assert decode_impression(encode(event)) == event


def _impression_with(path: list, value) -> bytes:
    payload = as_dict(impression())
    target = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return to_bytes(payload)


MALFORMED_IMPRESSIONS = {
    "not utf-8": (b"\xff\xfe{}", "not UTF-8"),
    "not json": (b'{"schema_version": 1,', "not JSON"),
    "json array": (b"[1, 2]", "expected a JSON object"),
    "empty": (b"", "empty record"),
    "nan": (_impression_with(["event_time"], "NAN_PLACEHOLDER").replace(b'"NAN_PLACEHOLDER"', b"NaN"), "NaN"),
    "string for int": (_impression_with(["ad_id"], "42"), "ad_id"),
    "bool for int": (_impression_with(["labels", "click"], True), "labels.click"),
    "float for int": (_impression_with(["ad_id"], 42.0), "ad_id"),
    "string dense": (_impression_with(["user", "dense"], ["a", 1.0]), "user.dense.0"),
    "negative ad id": (_impression_with(["ad_id"], -5), "ad_id"),
    "zero ad id": (_impression_with(["ad_id"], 0), "ad_id"),
    "negative sparse id": (_impression_with(["user", "sparse", "segment"], [3, -1]), "user.sparse.segment.1"),
    "negative attribute id": (
        _impression_with(["user", "history", 0, "attributes", "advertiser"], -2),
        "user.history.0.attributes.advertiser",
    ),
    "negative age": (_impression_with(["user", "history", 0, "age_hours"], -1.0), "age_hours"),
    "conversion without click": (_impression_with(["labels"], {"click": 0, "conversion": 1}), "requires click"),
    "label not 0/1": (_impression_with(["labels", "click"], 2), "labels.click"),
    "unknown field": (_impression_with(["campaign"], 9), "campaign: unknown field"),
    "unknown nested field": (_impression_with(["user", "age"], 30), "user.age: unknown field"),
    "missing field": (to_bytes({k: v for k, v in as_dict(impression()).items() if k != "labels"}), "labels: required"),
    "empty event id": (_impression_with(["event_id"], ""), "event_id"),
    "long event id": (_impression_with(["event_id"], "x" * 129), "event_id"),
    "event time in ms": (_impression_with(["event_time"], T0 * 1000), "milliseconds"),
    "event time zero": (_impression_with(["event_time"], 0), "event_time"),
    "id beyond int64": (_impression_with(["ad_id"], 2**63), "ad_id"),
    "soft label above 1": (_impression_with(["soft_labels"], {"click": 1.5, "conversion": 0.0}), "soft_labels.click"),
    "wrong schema_version": (_impression_with(["schema_version"], 2), "unsupported schema_version 2"),
    "string schema_version": (_impression_with(["schema_version"], "1"), "schema_version must be an integer"),
    "missing schema_version": (
        to_bytes({k: v for k, v in as_dict(impression()).items() if k != "schema_version"}),
        "missing schema_version",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_IMPRESSIONS))
def test_malformed_impression_names_the_problem(case):
    raw, expected = MALFORMED_IMPRESSIONS[case]
    with pytest.raises(MalformedEvent) as info:
        decode_impression(raw)
    assert expected in info.value.reason
    assert "\n" not in info.value.reason
    assert info.value.raw == raw


def test_a_repeated_key_resolves_to_its_last_value_in_every_reader():
    """The fast decode (straight from bytes) does not look for repeated keys; all readers share it, so they agree."""
    raw = encode(impression()).replace(b'"ad_id":42', b'"ad_id":42,"ad_id":43')
    assert decode_impression(raw).ad_id == 43
    assert decode_impression(raw) == decode_impression(bytearray(raw))


MALFORMED_ITEMS = {
    "create without features": ({"op": "create", "features": None}, "features are required for op 'create'"),
    "update without features": ({"op": "update", "features": None}, "features are required for op 'update'"),
    "expire with features": ({"op": "expire"}, "features must be absent for op 'expire'"),
    "unknown op": ({"op": "delete"}, "op:"),
    "negative sequence": ({"sequence": -1}, "sequence"),
    "negative item sparse id": ({"features": {"dense": [], "sparse": {"category": -3}}}, "features.sparse.category"),
    "infinite dense": ({"features": {"dense": [1e400], "sparse": {}}}, "features.dense.0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_ITEMS))
def test_malformed_item_names_the_problem(case):
    changes, expected = MALFORMED_ITEMS[case]
    payload = as_dict(item_event())
    payload.update(changes)
    payload = {k: v for k, v in payload.items() if v is not None}
    raw = to_bytes(payload).replace(b"Infinity", b"1e400")  # json.dumps writes inf as Infinity
    with pytest.raises(MalformedEvent) as info:
        decode_item(raw)
    assert expected in info.value.reason


def test_decoders_raise_only_malformed_event():
    weird = [None, "a str", b"null", b"1", b'"x"', b"[" * 100_000, b"{}", b"\x00", b"{" + b" " * 10 + b"}"]
    for raw in weird:
        for decode in (decode_impression, decode_item):
            with pytest.raises(MalformedEvent):
                decode(raw)
    # an item record is not an impression and vice versa
    with pytest.raises(MalformedEvent, match="invalid ImpressionEvent: event_id: required field missing"):
        decode_impression(encode(item_event()))
    with pytest.raises(MalformedEvent, match="unknown field"):
        decode_item(encode(impression()))


def test_dead_letter_keeps_the_original_bytes():
    raw = b"\xff\x00not json at all\n\x80"
    with pytest.raises(MalformedEvent) as info:
        decode_impression(raw)
    record = dead_letter_record(raw, info.value.reason, IMPRESSIONS_TOPIC, 3, 1234, failed_at=T0, key=b"\x00k")
    payload = json.loads(record)
    assert base64.b64decode(payload["raw_base64"]) == raw
    letter = read_dead_letter(record)
    assert letter.raw == raw
    assert (letter.source_topic, letter.partition, letter.offset) == (IMPRESSIONS_TOPIC, 3, 1234)
    assert letter.reason == info.value.reason and letter.failed_at == T0 and letter.key == b"\x00k"
    positionless = read_dead_letter(dead_letter_record(b"", "empty", ITEMS_TOPIC, None, None))
    assert positionless.raw == b"" and positionless.key is None and positionless.partition is None
    with pytest.raises(ValueError):
        read_dead_letter(b"{}")


def test_examples_in_the_schema_doc_are_valid():
    text = (Path(__file__).resolve().parents[2] / "docs" / "events.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)
    kinds = []
    for block in blocks:
        raw = block.encode()
        payload = json.loads(raw)
        if "dead_letter_version" in payload:
            kinds.append("dead letter")
            assert read_dead_letter(raw).source_topic == ITEMS_TOPIC
        elif "op" in payload:
            kinds.append(decode_item(raw).op)
        else:
            kinds.append(type(decode_impression(raw)).__name__)
    assert kinds == ["ImpressionEvent", "create", "expire", "dead letter"]


# ---------------------------------------------------------------------------- item ordering


def test_item_ordering_is_last_writer_wins_and_idempotent():
    created = item_event(sequence=1)
    updated = item_event(op="update", sequence=2, event_time=T0 + 10)
    expired = item_event(op="expire", sequence=3, features=None, event_time=T0 + 20)
    revived = item_event(op="create", sequence=4, event_time=T0 + 30)
    assert supersedes(created, None)
    assert supersedes(updated, created) and not supersedes(created, updated)  # late arrival dropped
    assert not supersedes(updated, updated)  # replay is a no-op
    assert supersedes(expired, updated) and not supersedes(updated, expired)  # tombstone holds
    assert supersedes(revived, expired)
    assert supersedes(item_event(sequence=1, event_time=T0 + 1), created)  # same sequence: event_time breaks ties
    with pytest.raises(ValueError, match="different ads"):
        supersedes(item_event(ad_id=1), item_event(ad_id=2))


# ---------------------------------------------------------------------------- tensors


def test_impressions_to_batch_hand_built():
    old_to_new = [
        Engagement(attributes={"item_id": 1, "advertiser": 1, "category": 1}, age_hours=50.0),
        Engagement(attributes={"item_id": 2, "advertiser": 2, "category": 1}, age_hours=40.0),
        Engagement(attributes={"item_id": 3, "category": 2}, age_hours=30.0),  # advertiser missing
        Engagement(attributes={"item_id": 4, "advertiser": 4, "category": 3}, age_hours=20.0),
    ]
    users = [
        UserFeatures(dense=[1.0, 2.0], sparse={"segment": [5], "interests": [7, 8, 9]}, history=old_to_new),
        UserFeatures(dense=[3.0, 4.0], sparse={}, history=[]),  # every sparse feature missing, no history
    ]
    events = [
        impression(event_id="a", user=users[0], ad_id=100, labels=Labels(click=1, conversion=1)),
        impression(
            event_id="b",
            user=users[1],
            ad_id=200,
            labels=Labels(click=0, conversion=0),
            soft_labels=SoftLabels(click=0.25, conversion=0.05),
        ),
    ]
    catalogue = {
        100: ItemFeatures(dense=[0.1, 0.2, 0.3], sparse={"advertiser": 7, "category": 2}),
        200: ItemFeatures(dense=[0.4, 0.5, 0.6], sparse={"category": 3}),  # advertiser missing
        300: ItemFeatures(dense=[0.0, 0.0, 0.0], sparse={}),  # not impressed: ignored
    }
    batch = impressions_to_batch(events, SMALL, catalogue)

    assert len(batch) == 2
    u, i = batch.users, batch.items
    assert torch.equal(u.dense, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(u.sparse["segment"], torch.tensor([[5], [0]]))
    assert torch.equal(u.sparse["interests"], torch.tensor([[7, 8, 9], [0, 0, 0]]))
    # newest 3 of 4 kept (the oldest, item 1, dropped), oldest first, right-padded
    assert torch.equal(u.history["item_id"], torch.tensor([[2, 3, 4], [0, 0, 0]]))
    assert torch.equal(u.history["advertiser"], torch.tensor([[2, 0, 4], [0, 0, 0]]))
    assert torch.equal(u.history["category"], torch.tensor([[1, 2, 3], [0, 0, 0]]))
    assert torch.equal(u.history_age, torch.tensor([[40.0, 30.0, 20.0], [0.0, 0.0, 0.0]]))
    assert u.history_age.dtype == torch.float32 and u.history["item_id"].dtype == torch.long

    assert torch.allclose(i.dense, torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    assert torch.equal(i.sparse["item_id"], torch.tensor([100, 200]))  # the ad id
    assert torch.equal(i.sparse["advertiser"], torch.tensor([7, 0]))
    assert torch.equal(i.sparse["category"], torch.tensor([2, 3]))
    assert all(v.shape == (2,) and v.dtype == torch.long for v in i.sparse.values())

    assert torch.equal(batch.labels, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # the row without a teacher falls back to its hard labels
    assert torch.allclose(batch.soft_labels, torch.tensor([[1.0, 1.0], [0.25, 0.05]]))
    assert torch.equal(batch.item_keys, torch.tensor([100, 200]))
    assert impressions_to_batch(events[:1], SMALL, catalogue).soft_labels is None


def test_short_history_is_right_padded():
    user = UserFeatures(dense=[0.0, 0.0], history=[Engagement(attributes={"item_id": 9}, age_hours=1.5)])
    batch = users_to_batch([user], SMALL)
    assert torch.equal(batch.history["item_id"], torch.tensor([[9, 0, 0]]))
    assert torch.equal(batch.history["category"], torch.tensor([[0, 0, 0]]))
    assert torch.equal(batch.history_age, torch.tensor([[1.5, 0.0, 0.0]]))


def pad_id_lists(lists: list[list[int]], length: int) -> torch.Tensor:
    """The padding rule row by row (keep the newest `length`, right-pad with 0): the reference for `_pad_rows`."""
    out = torch.zeros(len(lists), length, dtype=torch.long)
    for row, ids in enumerate(lists):
        kept = list(ids)[-length:]
        if kept:
            out[row, : len(kept)] = torch.as_tensor(kept, dtype=torch.long)
    return out


def test_padding_matches_pad_id_lists():
    lists = [[4, 5, 6, 7, 8], [], [9]]
    history = [[Engagement(attributes={"item_id": i}, age_hours=float(i)) for i in ids] for ids in lists]
    users = [
        UserFeatures(dense=[0.0, 0.0], sparse={"interests": ids}, history=h)
        for ids, h in zip(lists, history, strict=True)
    ]
    batch = users_to_batch(users, SMALL)
    assert torch.equal(batch.sparse["interests"], pad_id_lists(lists, 5))
    assert torch.equal(batch.history["item_id"], pad_id_lists(lists, SMALL.history_length))
    assert torch.equal(batch.history_age, pad_id_lists(lists, SMALL.history_length).float())


def test_schema_mismatches_are_named():
    catalogue = {42: ItemFeatures(dense=[0.1, 0.2, 0.3], sparse={})}
    wrong_user_dense = impression(user=UserFeatures(dense=[1.0, 2.0, 3.0]))
    with pytest.raises(SchemaMismatch, match=r"\[0\]\.user\.dense: has 3 values.*user_dense_dim=2"):
        impressions_to_batch([wrong_user_dense], SMALL, catalogue)
    with pytest.raises(SchemaMismatch, match=r"\[1\]\.features\.dense: ad 5 has 2 values.*item_dense_dim=3"):
        items_to_batch([catalogue[42], ItemFeatures(dense=[1.0, 2.0])], [42, 5], SMALL)
    with pytest.raises(SchemaMismatch, match=r"user\.sparse\.country: unknown user sparse feature"):
        users_to_batch([UserFeatures(dense=[0.0, 0.0], sparse={"country": [1]})], SMALL)
    with pytest.raises(SchemaMismatch, match=r"user\.history\.0\.attributes\.brand: unknown history attribute"):
        users_to_batch(
            [UserFeatures(dense=[0.0, 0.0], history=[Engagement(attributes={"brand": 1}, age_hours=0)])], SMALL
        )
    with pytest.raises(SchemaMismatch, match=r"features\.sparse\.brand"):
        items_to_batch([ItemFeatures(dense=[0.0] * 3, sparse={"brand": 1})], [1], SMALL)
    with pytest.raises(SchemaMismatch, match=r"features\.sparse\.item_id: is 8 but item_id is the ad id"):
        items_to_batch([ItemFeatures(dense=[0.0] * 3, sparse={"item_id": 8})], [1], SMALL)
    assert items_to_batch([ItemFeatures(dense=[0.0] * 3, sparse={"item_id": 1})], [1], SMALL).sparse["item_id"] == 1
    with pytest.raises(UnknownAd, match="missing from the item catalogue: 43"):
        impressions_to_batch([impression(ad_id=43)], SMALL, catalogue)
    with pytest.raises(ValueError, match="2 items but 1 ad ids"):
        items_to_batch([catalogue[42], catalogue[42]], [42], SMALL)
    ctr_only = SMALL.model_copy(update={"tasks": ["dwell"]})
    with pytest.raises(SchemaMismatch, match="task 'dwell' has no label field"):
        impressions_to_batch([impression(user=UserFeatures(dense=[0.0, 0.0]))], ctr_only, catalogue)


def test_planted_users_survive_the_event_round_trip(world):
    """UserBatch -> UserFeatures events -> bytes -> UserBatch is exact on the planted schema."""
    from worlds.planted import make_users

    users, _ = make_users(world, 6, seed=3)
    events = []
    for row in range(len(users)):
        valid = users.history["item_id"][row] > 0
        history = [
            Engagement(
                attributes={a: int(users.history[a][row, h]) for a in SCHEMA.history_attributes},
                age_hours=float(users.history_age[row, h]),
            )
            for h in torch.nonzero(valid).flatten().tolist()
        ]
        features = UserFeatures(
            dense=users.dense[row].tolist(),
            sparse={name: users.sparse[name][row].tolist() for name in SCHEMA.user_sparse},
            history=history,
        )
        wire = impression(event_id=f"u{row}", user=features)
        events.append(decode_impression(encode(wire)).user)
    rebuilt = users_to_batch(events, SCHEMA)
    assert torch.equal(rebuilt.dense, users.dense)
    for name in SCHEMA.user_sparse:
        assert torch.equal(rebuilt.sparse[name], users.sparse[name])
    for name in SCHEMA.history_attributes:
        assert torch.equal(rebuilt.history[name], users.history[name])
    assert torch.equal(rebuilt.history_age, users.history_age)


def test_batch_from_events_trains_the_model():
    from hsnn.model import HSNN
    from worlds.planted import tiny_hsnn_config

    torch.manual_seed(0)
    catalogue = {a: ItemFeatures(dense=[0.1 * a] * 4, sparse={"advertiser": a, "category": a % 5 + 1}) for a in (1, 2)}
    events = [
        impression(
            event_id=str(n),
            ad_id=n % 2 + 1,
            user=UserFeatures(
                dense=[0.0, 1.0],
                sparse={"segment": [n + 1], "age_bucket": [2]},
                history=[Engagement(attributes={"item_id": 2, "advertiser": 2, "category": 3}, age_hours=1.0)] * n,
            ),
            labels=Labels(click=n % 2, conversion=0),
        )
        for n in range(4)
    ]
    batch = impressions_to_batch(events, SCHEMA, catalogue)
    model = HSNN(tiny_hsnn_config())
    loss = model(batch).losses["total"]
    loss.backward()
    assert torch.isfinite(loss)
