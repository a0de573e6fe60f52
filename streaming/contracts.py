"""Versioned event contracts: the topics, the bounds, and the models of what travels on Kafka.

These are the shapes every reader agrees on (the trainer, the indexer, the simulator feed, the API's
bodies). Turning bytes into them is `streaming.codec`; whether one fits a model's FeatureSchema is
`streaming.validation`; stacking checked ones into tensors is `streaming.tensors`. The field-by-field
contract, with examples and the ordering rules for item events, is docs/events.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
