"""Versioned event contracts: what travels on Kafka, what the simulator emits, what the API accepts.

There is one parser. The trainer (impressions), the indexer (items), the simulator feed and the
API's item-event endpoint all go through `decode_impression` / `decode_item`, which either return
a validated model or raise `MalformedEvent` -- nothing else -- so a consumer loop needs a single
`except MalformedEvent` to route bad bytes to the dead-letter topic (`dead_letter_record`).

Validation happens in two stages:

1. Wire validation (`decode_*`): JSON shape, types, ranges, versions. Schema-independent, so a
   record is accepted or rejected the same way by every reader whatever model it serves.
2. Schema validation (`check_user_features`, `check_item_features`, and the `*_to_batch`
   conversions): feature names and dense widths against a `FeatureSchema`. Errors are
   `SchemaMismatch` (a `ValueError`) naming the field and, in a batch, the row. Consumers that
   want to dead-letter one event instead of failing a batch call the `check_*` functions per
   event before batching.

The field-by-field contract, with examples and the ordering rules for item events, is
docs/events.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch

# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------

IMPRESSIONS_TOPIC = "hsnn.impressions"  # key: event_id; time-retained, not compacted
ITEMS_TOPIC = "hsnn.items"  # key: ad id (decimal ASCII); compacted: the latest record per ad is the ad's state
IMPRESSIONS_DLQ = "hsnn.impressions.dlq"
ITEMS_DLQ = "hsnn.items.dlq"
SNAPSHOTS_TOPIC = "hsnn.snapshots"  # one JSON notice per promoted snapshot (the store's pointer is the truth)

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS: frozenset[int] = frozenset({1})

# --------------------------------------------------------------------------------------------
# Limits (bounded so that one hostile or buggy record cannot allocate unbounded memory)
# --------------------------------------------------------------------------------------------

MAX_ID = 2**63 - 1  # ids become torch.long
MAX_EVENT_ID_LENGTH = 128
MAX_DENSE = 4096
MAX_SPARSE_FEATURES = 64
MAX_IDS_PER_FEATURE = 1024
MAX_HISTORY = 1024  # engagements accepted on the wire; the schema's history_length is what is kept
MAX_EVENT_TIME = 1e11  # epoch seconds; anything larger is almost certainly epoch milliseconds
MAX_RECORD_BYTES = 1 << 20
# Dense feature values are bounded well inside float32 (max ~3.4e38): a value such as 1e300 is a
# finite JSON number but becomes inf in float32, and one such impression turns every weight NaN
# in a single train step. Real features are normalised; 1e6 leaves room for raw counts.
MAX_FEATURE_MAGNITUDE = 1e6
MAX_AGE_HOURS = 1e6  # ~114 years: also kept far from float32 overflow

Id = Annotated[int, Field(ge=0, le=MAX_ID)]
AdId = Annotated[int, Field(ge=1, le=MAX_ID)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureValue = Annotated[float, Field(ge=-MAX_FEATURE_MAGNITUDE, le=MAX_FEATURE_MAGNITUDE, allow_inf_nan=False)]
FeatureName = Annotated[str, Field(min_length=1, max_length=128)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# The upper bound is checked by `_check_event_time` (for its clearer message) and published in the JSON schema.
EventTime = Annotated[float, Field(gt=0, allow_inf_nan=False, json_schema_extra={"exclusiveMaximum": MAX_EVENT_TIME})]


class EventModel(BaseModel):
    """Unknown fields are errors and no type coercion happens ("1" is not 1, true is not 1, 2.0 is not 2)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_event_time(value: float) -> float:
    if value >= MAX_EVENT_TIME:
        raise ValueError(f"{value!r} is too large for epoch seconds (epoch milliseconds sent?)")
    return value


# --------------------------------------------------------------------------------------------
# Payload models
# --------------------------------------------------------------------------------------------


class Engagement(EventModel):
    """One past engagement of the user: the engaged item's attributes and how long ago it happened."""

    attributes: dict[FeatureName, Id] = Field(
        max_length=MAX_SPARSE_FEATURES,
        description="Item attribute name (a schema history attribute) -> id; absent or 0 means unknown.",
    )
    age_hours: Annotated[float, Field(ge=0, le=MAX_AGE_HOURS, allow_inf_nan=False)]


class UserFeatures(EventModel):
    """The user side of an impression, and the body of a retrieval request."""

    dense: list[FeatureValue] = Field(max_length=MAX_DENSE)
    sparse: dict[FeatureName, Annotated[list[Id], Field(max_length=MAX_IDS_PER_FEATURE)]] = Field(
        default_factory=dict, max_length=MAX_SPARSE_FEATURES
    )
    history: list[Engagement] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="Oldest first: the last engagement in the list is the newest.",
    )


class ItemFeatures(EventModel):
    """An ad's features. A schema's `item_id` feature is filled from the ad id, so it need not be sent."""

    dense: list[FeatureValue] = Field(max_length=MAX_DENSE)
    sparse: dict[FeatureName, Id] = Field(default_factory=dict, max_length=MAX_SPARSE_FEATURES)


class Labels(EventModel):
    click: int = Field(ge=0, le=1)
    conversion: int = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _conversion_needs_click(self) -> Labels:
        if self.conversion > self.click:
            raise ValueError("conversion=1 requires click=1")
        return self


class SoftLabels(EventModel):
    """Teacher probabilities per task, for distillation."""

    click: Probability
    conversion: Probability


class ImpressionEvent(EventModel):
    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=MAX_EVENT_ID_LENGTH)
    event_time: EventTime
    user: UserFeatures
    ad_id: AdId
    labels: Labels
    soft_labels: SoftLabels | None = None

    _event_time_range = field_validator("event_time")(_check_event_time)


class ItemEvent(EventModel):
    """A change to one ad. `features` is required for create/update and forbidden for expire.

    Update is a full replacement, not a patch: the items topic is compacted, so the latest record
    per ad must describe the ad on its own.
    """

    schema_version: Literal[1] = 1
    op: Literal["create", "update", "expire"]
    ad_id: AdId
    event_time: EventTime
    sequence: int = Field(ge=0, le=MAX_ID, description="Per-ad version; higher wins (see `supersedes`).")
    features: ItemFeatures | None = None

    _event_time_range = field_validator("event_time")(_check_event_time)

    @model_validator(mode="after")
    def _features_match_op(self) -> ItemEvent:
        if self.op == "expire" and self.features is not None:
            raise ValueError("features must be absent for op 'expire'")
        if self.op != "expire" and self.features is None:
            raise ValueError(f"features are required for op {self.op!r}")
        return self


class ItemUpsert(ItemEvent):
    """A create or update: `features` required. The same event as `ItemEvent`, typed per op for published schemas."""

    op: Literal["create", "update"]
    features: ItemFeatures


class ItemExpire(ItemEvent):
    """An expire: no `features`."""

    op: Literal["expire"]
    features: None = None


ItemEventByOp = Annotated[ItemUpsert | ItemExpire, Field(discriminator="op")]
"""An item event whose JSON schema says, per `op`, whether `features` is required (the API's request body)."""

Event = ImpressionEvent | ItemEvent


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MalformedEvent(Exception):
    """A record that cannot be decoded into an event. `reason` is one human-readable line."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw

    def __repr__(self) -> str:
        return f"MalformedEvent({self.reason!r}, raw={len(self.raw)} bytes)"


class SchemaMismatch(ValueError):
    """A well-formed event that does not fit the model's FeatureSchema."""

    def __init__(self, field: str, message: str, row: int | None = None) -> None:
        where = field if row is None else f"[{row}].{field}"
        super().__init__(f"{where}: {message}")
        self.field = field
        self.row = row


class UnknownAd(ValueError):
    """Impressions whose ad_id is not (yet) in the item catalogue."""

    def __init__(self, ad_ids: Sequence[int]) -> None:
        shown = ", ".join(str(a) for a in ad_ids[:10]) + (" ..." if len(ad_ids) > 10 else "")
        super().__init__(f"{len(ad_ids)} impression(s) reference ad ids missing from the item catalogue: {shown}")
        self.ad_ids = list(ad_ids)


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------


def encode(event: Event) -> bytes:
    """Compact UTF-8 JSON. Absent optional fields are left out rather than written as null."""
    return event.model_dump_json(exclude_none=True).encode("utf-8")


def event_key(event: Event) -> bytes:
    """The Kafka record key: the ad id for item events (compaction key), the event id for impressions."""
    if isinstance(event, ItemEvent):
        return str(event.ad_id).encode("ascii")
    return event.event_id.encode("utf-8")


def decode_impression(raw: bytes) -> ImpressionEvent:
    """Parse one `hsnn.impressions` record value; raises MalformedEvent (only) if it is not a valid event."""
    return _decode(raw, ImpressionEvent)


def decode_item(raw: bytes) -> ItemEvent:
    """Parse one `hsnn.items` record value (also the API's item-event body); raises MalformedEvent (only)."""
    return _decode(raw, ItemEvent)


def _decode(raw: bytes, model: type[EventModel]) -> Any:
    # Only MalformedEvent may escape: the catch-all turns a parser bug into a dead letter, not a crash.
    fast = _decode_fast(raw, model)
    if fast is not None:
        return fast
    try:
        payload = _parse_json(raw)
        _check_version(payload, raw)
        return model.model_validate(payload)
    except MalformedEvent:
        raise
    except ValidationError as err:
        raise MalformedEvent(f"invalid {model.__name__}: {summarise_validation_error(err)}", _as_bytes(raw)) from None
    except Exception as err:  # the contract is "MalformedEvent or a valid event", whatever went wrong
        raise MalformedEvent(
            f"could not decode {model.__name__}: {type(err).__name__}: {err}", _as_bytes(raw)
        ) from None


def _decode_fast(raw: object, model: type[EventModel]) -> Any | None:
    """The valid event straight from the bytes (pydantic's JSON parser, no Python dicts), or None.

    None sends the record down the strict path, which names what is wrong. The fast path accepts only
    what the strict path accepts too, with one exception: a key repeated within one JSON object, which
    the strict path refuses and this parser resolves to the last value (every reader in this system
    decodes with this function, so no two of them read such a record differently). That check costs more
    than the rest of the decode together.
    """
    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_RECORD_BYTES or _NON_FINITE.search(raw):
        return None
    try:
        event = model.model_validate_json(raw)
    except Exception:  # ValidationError, or anything else: the strict path decides and explains
        return None
    return event if "schema_version" in event.model_fields_set else None


_NON_FINITE = re.compile(rb"NaN|Infinity")  # JSON constants the strict parser refuses (inside a string too: rare)


def _as_bytes(raw: object) -> bytes:
    return bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else repr(raw).encode("utf-8", "replace")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(raw: bytes) -> dict[str, Any]:
    if raw is None:
        raise MalformedEvent("empty record (null value)", b"")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedEvent(f"record value must be bytes, got {type(raw).__name__}", _as_bytes(raw))
    raw = bytes(raw)
    if not raw:
        raise MalformedEvent("empty record", raw)
    if len(raw) > MAX_RECORD_BYTES:
        raise MalformedEvent(f"record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit", raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedEvent(f"not UTF-8: invalid byte at position {err.start}", raw) from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise MalformedEvent(f"not JSON: {err.msg} at line {err.lineno} column {err.colno}", raw) from None
    except (ValueError, RecursionError) as err:
        raise MalformedEvent(f"not JSON: {err}", raw) from None
    if not isinstance(payload, dict):
        raise MalformedEvent(f"expected a JSON object, got {_json_type(payload)}", raw)
    return payload


def _check_version(payload: dict[str, Any], raw: bytes) -> None:
    if "schema_version" not in payload:
        raise MalformedEvent("missing schema_version", raw)
    version = payload["schema_version"]
    if type(version) is not int:
        raise MalformedEvent(f"schema_version must be an integer, got {_json_type(version)}", raw)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise MalformedEvent(
            f"unsupported schema_version {version} (this reader supports {sorted(SUPPORTED_SCHEMA_VERSIONS)})", raw
        )


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def summarise_validation_error(err: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one line: `path: message (got value); ...`."""
    parts = []
    for item in err.errors()[:limit]:
        loc = ".".join(str(p) for p in item["loc"]) or "(event)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("missing", "extra_forbidden"):
            msg = "unknown field (not allowed)" if item["type"] == "extra_forbidden" else "required field missing"
            parts.append(f"{loc}: {msg}")
            continue
        got = item.get("input")
        if isinstance(got, (dict, list)) or item["type"] in ("value_error", "assertion_error"):
            parts.append(f"{loc}: {msg}")
        else:
            shown = repr(got)
            parts.append(f"{loc}: {msg} (got {shown[:40] + '...' if len(shown) > 40 else shown})")
    extra = err.error_count() - limit
    return "; ".join(parts) + (f"; and {extra} more error(s)" if extra > 0 else "")


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


class DeadLetter(EventModel):
    """A record that could not be processed, as published to a `*.dlq` topic."""

    dead_letter_version: Literal[1] = 1
    source_topic: str
    partition: int | None = None
    offset: int | None = None
    reason: str
    failed_at: float
    raw_base64: str = Field(description="The original bytes, or their first DEAD_LETTER_RAW_BYTES if truncated.")
    key_base64: str | None = None
    raw_length: int | None = Field(None, description="Length of the original value in bytes.")
    raw_sha256: str | None = Field(None, description="sha256 hex of the whole original value.")
    raw_truncated: bool = False

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_base64, validate=True)

    @property
    def key(self) -> bytes | None:
        return None if self.key_base64 is None else base64.b64decode(self.key_base64, validate=True)


DEAD_LETTER_RAW_BYTES = 16 << 10  # prefix of the original kept in a letter: far below any broker's message limit
DEAD_LETTER_REASON_CHARS = 1000


def dead_letter_record(
    raw: bytes,
    reason: str,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    failed_at: float | None = None,
    key: bytes | None = None,
) -> bytes:
    """The DLQ record value: the original bytes (base64, so any bytes survive) plus where and why they failed.

    Only the first DEAD_LETTER_RAW_BYTES of the original (and of its key) are kept, with the full
    length and sha256: a letter that embedded a near-1 MiB record whole would exceed the broker's
    message size, fail every send and stall whoever waits for the DLQ acknowledgement. The source
    partition and offset still point at the whole record while it is retained.
    `partition`/`offset` are None for records that never had a Kafka position (e.g. a simulator feed).
    `key` is the original record key, kept so a replay can re-publish under the same key.
    """
    raw = bytes(raw)
    kept = raw[:DEAD_LETTER_RAW_BYTES]
    record = DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        reason=reason[:DEAD_LETTER_REASON_CHARS],
        failed_at=time.time() if failed_at is None else failed_at,
        raw_base64=base64.b64encode(kept).decode("ascii"),
        key_base64=None if key is None else base64.b64encode(bytes(key)[:DEAD_LETTER_RAW_BYTES]).decode("ascii"),
        raw_length=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        raw_truncated=len(kept) < len(raw),
    )
    return record.model_dump_json(exclude_none=True).encode("utf-8")


def read_dead_letter(record: bytes) -> DeadLetter:
    """Parse a DLQ record (for replay tooling); raises ValueError if it is not one."""
    try:
        letter = DeadLetter.model_validate_json(record)
        _ = letter.raw, letter.key
    except (ValidationError, binascii.Error) as err:
        raise ValueError(f"not a dead-letter record: {err}") from None
    return letter


# --------------------------------------------------------------------------------------------
# Item event ordering
# --------------------------------------------------------------------------------------------


def version_of(event: ItemEvent) -> tuple[int, float]:
    """The order of item events for one ad: by sequence, then event_time as the tie-break."""
    return (event.sequence, event.event_time)


def supersedes(incoming: ItemEvent, current: ItemEvent | None) -> bool:
    """Whether `incoming` should replace the state recorded by `current` (last writer wins).

    Strictly greater versions win, so replaying or duplicating an event changes nothing, and an
    older event arriving late is dropped. An expire is a tombstone that keeps its version: only a
    later (higher-versioned) create or update revives the ad.
    """
    if current is not None and incoming.ad_id != current.ad_id:
        raise ValueError(f"cannot order events of different ads ({incoming.ad_id} vs {current.ad_id})")
    return current is None or version_of(incoming) > version_of(current)


# --------------------------------------------------------------------------------------------
# Schema-aware conversion to tensors
# --------------------------------------------------------------------------------------------


def check_user_features(user: UserFeatures, schema: FeatureSchema, row: int | None = None) -> None:
    """Raise SchemaMismatch if `user` does not fit `schema` (dense width, sparse and attribute names)."""
    if len(user.dense) != schema.user_dense_dim:
        raise SchemaMismatch(
            "user.dense", f"has {len(user.dense)} values, the schema needs user_dense_dim={schema.user_dense_dim}", row
        )
    unknown = sorted(set(user.sparse) - set(schema.user_sparse))
    if unknown:
        raise SchemaMismatch(
            f"user.sparse.{unknown[0]}", f"unknown user sparse feature (schema has {sorted(schema.user_sparse)})", row
        )
    allowed = set(schema.history_attributes)
    for h, engagement in enumerate(user.history):
        if not allowed.issuperset(engagement.attributes):
            unknown = min(set(engagement.attributes) - allowed)
            raise SchemaMismatch(
                f"user.history.{h}.attributes.{unknown}",
                f"unknown history attribute (schema has {schema.history_attributes})",
                row,
            )


def check_item_features(features: ItemFeatures, ad_id: int, schema: FeatureSchema, row: int | None = None) -> None:
    """Raise SchemaMismatch if `features` do not fit `schema`.

    `item_id`, when the schema has it, is the ad id: sending it in `sparse` is allowed only with the same value.
    """
    if len(features.dense) != schema.item_dense_dim:
        raise SchemaMismatch(
            "features.dense",
            f"ad {ad_id} has {len(features.dense)} values, the schema needs item_dense_dim={schema.item_dense_dim}",
            row,
        )
    unknown = sorted(set(features.sparse) - set(schema.item_sparse))
    if unknown:
        raise SchemaMismatch(
            f"features.sparse.{unknown[0]}",
            f"ad {ad_id} has an unknown item sparse feature (schema has {sorted(schema.item_sparse)})",
            row,
        )
    if "item_id" in features.sparse and features.sparse["item_id"] != ad_id:
        raise SchemaMismatch(
            "features.sparse.item_id", f"is {features.sparse['item_id']} but item_id is the ad id ({ad_id})", row
        )


def _pad_rows(rows: Sequence[Sequence[float]], length: int, dtype: torch.dtype) -> torch.Tensor:
    """`hsnn.features.pad_id_lists` semantics (keep the last `length`, right-pad with 0) in one tensor call.

    pad_id_lists builds one small tensor per row, which dominated the conversion of a 1k-event batch.
    """
    padded = [[*row[-length:], *([0] * (length - len(row)))] if length else [] for row in rows]
    return torch.tensor(padded, dtype=dtype).reshape(len(rows), length)


def users_to_batch(users: Sequence[UserFeatures], schema: FeatureSchema) -> UserBatch:
    """Stack users into a UserBatch.

    - dense: (U, user_dense_dim).
    - sparse: every schema feature, (U, L) right-padded with 0, L the longest list in the batch (at
      least 1); a feature a user does not send is all 0 (missing).
    - history: the newest `schema.history_length` engagements (newest = last in the list), kept in
      list order (oldest first) and right-padded; an attribute an engagement does not carry is 0.
      Note that I2IF treats an engagement whose first history attribute is 0 as padding.
    - history_age: (U, history_length) hours, 0 where padded.
    """
    for row, user in enumerate(users):
        check_user_features(user, schema, row)
    count = len(users)
    dense = torch.tensor([list(u.dense) for u in users], dtype=torch.float32).reshape(count, schema.user_dense_dim)
    sparse = {}
    for name in schema.user_sparse:
        lists = [u.sparse.get(name, []) for u in users]
        sparse[name] = _pad_rows(lists, max((len(ids) for ids in lists), default=0) or 1, torch.long)
    length = schema.history_length
    kept = [u.history[-length:] for u in users]
    history = {
        attribute: _pad_rows([[e.attributes.get(attribute, 0) for e in events] for events in kept], length, torch.long)
        for attribute in schema.history_attributes
    }
    history_age = _pad_rows([[e.age_hours for e in events] for events in kept], length, torch.float32)
    return UserBatch(dense=dense, sparse=sparse, history=history, history_age=history_age)


def items_to_batch(items: Sequence[ItemFeatures], ad_ids: Sequence[int], schema: FeatureSchema) -> ItemBatch:
    """Stack ads into an ItemBatch: dense (N, item_dense_dim), one id per schema sparse feature (N,).

    A sparse feature an ad does not send is 0 (missing); `item_id`, if in the schema, is the ad id.
    """
    if len(items) != len(ad_ids):
        raise ValueError(f"{len(items)} items but {len(ad_ids)} ad ids")
    for row, (features, ad_id) in enumerate(zip(items, ad_ids, strict=True)):
        if isinstance(ad_id, bool) or not isinstance(ad_id, int) or not 1 <= ad_id <= MAX_ID:
            raise SchemaMismatch("ad_id", f"must be an integer in [1, 2^63), got {ad_id!r}", row)
        check_item_features(features, ad_id, schema, row)
    count = len(items)
    dense = torch.tensor([list(f.dense) for f in items], dtype=torch.float32).reshape(count, schema.item_dense_dim)
    sparse = {}
    for name in schema.item_sparse:
        values = list(ad_ids) if name == "item_id" else [f.sparse.get(name, 0) for f in items]
        sparse[name] = torch.tensor(values, dtype=torch.long).reshape(count)
    return ItemBatch(dense=dense, sparse=sparse)


def impressions_to_batch(
    events: Sequence[ImpressionEvent], schema: FeatureSchema, items: Mapping[int, ItemFeatures]
) -> TrainingBatch:
    """Turn impressions into a TrainingBatch, joining each ad's features from the item catalogue by ad_id.

    Labels follow `schema.tasks` (each task must be a label field: click, conversion). Soft labels are
    set when at least one event has them; rows without a teacher get their hard labels as the target.
    Raises UnknownAd if an ad_id is not in `items`, SchemaMismatch if an event does not fit `schema`.
    """
    missing = list(dict.fromkeys(e.ad_id for e in events if e.ad_id not in items))
    if missing:
        raise UnknownAd(missing)
    for task in schema.tasks:
        if task not in Labels.model_fields:
            raise SchemaMismatch(
                "labels", f"schema task {task!r} has no label field (have {list(Labels.model_fields)})"
            )
    users = users_to_batch([e.user for e in events], schema)
    ad_ids = [e.ad_id for e in events]
    item_batch = items_to_batch([items[a] for a in ad_ids], ad_ids, schema)
    labels = torch.tensor(
        [[float(getattr(e.labels, task)) for task in schema.tasks] for e in events], dtype=torch.float32
    ).reshape(len(events), len(schema.tasks))
    soft_labels = None
    if any(e.soft_labels is not None for e in events):
        soft_labels = torch.tensor(
            [[float(getattr(e.soft_labels or e.labels, task)) for task in schema.tasks] for e in events],
            dtype=torch.float32,
        )
    return TrainingBatch(
        users=users,
        items=item_batch,
        labels=labels,
        soft_labels=soft_labels,
        item_keys=torch.tensor(ad_ids, dtype=torch.long),
    )
