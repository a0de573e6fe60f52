"""The event layer's one import: contracts, wire codec, validation and tensor conversion by their public names.

What lives where (so each module stays one job):

- `streaming.contracts`: topics, bounds and the event models (what travels on Kafka, what the API accepts),
  and the ordering of item events (`supersedes`).
- `streaming.codec`: bytes <-> events (`decode_*` raise only `MalformedEvent`) and the dead-letter record.
- `streaming.validation`: whether a user or an ad fits a model's FeatureSchema, as structured `Problem`s.
- `streaming.tensors`: checked events stacked into the model's batches.

The field-by-field contract, with examples and the ordering rules for item events, is docs/events.md.
"""

from __future__ import annotations

from streaming.codec import (
    DEAD_LETTER_RAW_BYTES,
    DEAD_LETTER_REASON_CHARS,
    DeadLetter,
    MalformedEvent,
    dead_letter_record,
    decode_impression,
    decode_item,
    encode,
    event_key,
    read_dead_letter,
    summarise_validation_error,
)
from streaming.contracts import (
    IMPRESSIONS_DLQ,
    IMPRESSIONS_TOPIC,
    ITEMS_DLQ,
    ITEMS_TOPIC,
    MAX_AGE_HOURS,
    MAX_DENSE,
    MAX_EVENT_ID_LENGTH,
    MAX_EVENT_TIME,
    MAX_FEATURE_MAGNITUDE,
    MAX_HISTORY,
    MAX_ID,
    MAX_IDS_PER_FEATURE,
    MAX_RECORD_BYTES,
    MAX_SPARSE_FEATURES,
    SCHEMA_VERSION,
    SNAPSHOTS_TOPIC,
    SUPPORTED_SCHEMA_VERSIONS,
    AdId,
    Engagement,
    Event,
    EventModel,
    ImpressionEvent,
    ItemEvent,
    ItemEventByOp,
    ItemExpire,
    ItemFeatures,
    ItemUpsert,
    Labels,
    SoftLabels,
    UserFeatures,
    supersedes,
    version_of,
)
from streaming.tensors import UnknownAd, impressions_to_batch, items_to_batch, users_to_batch
from streaming.validation import Problem, SchemaMismatch, check_user_features

__all__ = [
    "DEAD_LETTER_RAW_BYTES",
    "DEAD_LETTER_REASON_CHARS",
    "IMPRESSIONS_DLQ",
    "IMPRESSIONS_TOPIC",
    "ITEMS_DLQ",
    "ITEMS_TOPIC",
    "MAX_AGE_HOURS",
    "MAX_DENSE",
    "MAX_EVENT_ID_LENGTH",
    "MAX_EVENT_TIME",
    "MAX_FEATURE_MAGNITUDE",
    "MAX_HISTORY",
    "MAX_ID",
    "MAX_IDS_PER_FEATURE",
    "MAX_RECORD_BYTES",
    "MAX_SPARSE_FEATURES",
    "SCHEMA_VERSION",
    "SNAPSHOTS_TOPIC",
    "SUPPORTED_SCHEMA_VERSIONS",
    "AdId",
    "DeadLetter",
    "Engagement",
    "Event",
    "EventModel",
    "ImpressionEvent",
    "ItemEvent",
    "ItemEventByOp",
    "ItemExpire",
    "ItemFeatures",
    "ItemUpsert",
    "Labels",
    "MalformedEvent",
    "Problem",
    "SchemaMismatch",
    "SoftLabels",
    "UnknownAd",
    "UserFeatures",
    "check_user_features",
    "dead_letter_record",
    "decode_impression",
    "decode_item",
    "encode",
    "event_key",
    "impressions_to_batch",
    "items_to_batch",
    "read_dead_letter",
    "summarise_validation_error",
    "supersedes",
    "users_to_batch",
    "version_of",
]
