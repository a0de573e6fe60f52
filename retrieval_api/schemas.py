"""Request and response bodies of the retrieval API.

The models check what can be checked without a model (types, ranges, unknown keys). Whether
a request fits the *loaded* model (dense width, sparse feature names, history attributes) is
checked by `streaming.validation.user_problems` against that model's `FeatureSchema`, and
reported as a 422 in the same shape FastAPI uses for its own validation errors (`retrieval_api.errors`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from streaming.contracts import AdId, ItemEventByOp, UserFeatures

USER_EXAMPLE = {
    "dense": [0.12, -1.3],
    "sparse": {"segment": [3], "age_bucket": [2]},
    "history": [
        {"attributes": {"item_id": 17, "advertiser": 5, "category": 1}, "age_hours": 2.5},
        {"attributes": {"item_id": 240, "advertiser": 33, "category": 5}, "age_hours": 40.0},
    ],
}


class Strict(BaseModel):
    """Unknown fields are rejected: a misspelt field must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RetrieveRequest(Strict):
    """Retrieve the top-k ads for one user.

    Strict types: JSON `true` is not the integer 1 and `"5"` is not 5; `5.0` is 5, as JSON Schema reads it
    (retrieval_api.routing), and `5.5` is refused.
    """

    user: UserFeatures = Field(
        description="The user, in the same contract as impression events (streaming.events): history oldest first.",
        examples=[USER_EXAMPLE],
    )
    k: int = Field(100, ge=1, le=1000, description="How many ads to return.")
    exclude_ad_ids: list[AdId] = Field(
        default_factory=list,
        max_length=10_000,
        description="Ads that must not be returned (e.g. already shown); ad ids, 1 to 2^63-1.",
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Give up with 504 if scoring has not started this many milliseconds after arrival.",
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user": USER_EXAMPLE, "k": 10, "exclude_ad_ids": [42], "deadline_ms": 50}]},
    )


class ScoredAd(Strict):
    ad_id: int = Field(description="Raw ad id.")
    score: float = Field(description="Calibrated click probability.")


class Cost(Strict):
    """Work done for this query by the layer-wise search."""

    nodes_scored: int = Field(description="Index nodes scored, over all levels.")
    items_scored: int = Field(description="Ads scored at the item level.")
    flops: int = Field(description="FLOPs of the per-pair parts (interaction tower + over-arch).")


class RetrieveResponse(Strict):
    ads: list[ScoredAd] = Field(description="Best first.")
    model_version: int = Field(description="Snapshot version of the model that scored this request.")
    index_version: int = Field(description="Version of the index it was scored against (always pinned together).")
    cost: Cost

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "ads": [{"ad_id": 812, "score": 0.31}, {"ad_id": 77, "score": 0.27}],
                    "model_version": 7,
                    "index_version": 7,
                    "cost": {"nodes_scored": 40, "items_scored": 310, "flops": 1_250_000},
                }
            ]
        },
    )


MAX_ITEM_EVENTS = 1000

ITEM_EVENTS_EXAMPLE = {
    "events": [
        {
            "schema_version": 1,
            "op": "create",
            "ad_id": 1207,
            "event_time": 1767225000.0,
            "sequence": 1,
            "features": {"dense": [0.8, -0.1, 1.9, 0.05], "sparse": {"advertiser": 204, "category": 12}},
        },
        {"schema_version": 1, "op": "expire", "ad_id": 88, "event_time": 1767225010.0, "sequence": 4},
    ]
}


class ItemEventsRequest(Strict):
    """Ad changes to forward to the items topic (the contract of docs/events.md)."""

    events: list[ItemEventByOp] = Field(
        min_length=1,
        max_length=MAX_ITEM_EVENTS,
        description=f"1 to {MAX_ITEM_EVENTS} item events, validated like `streaming.events.decode_item`; `op` selects "
        "the shape (create/update carry `features`, expire does not).",
    )

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [ITEM_EVENTS_EXAMPLE]})


class RecordPosition(Strict):
    ad_id: int
    partition: int
    offset: int


class ItemEventsAccepted(Strict):
    """Every event was acknowledged by all in-sync replicas of the topic."""

    accepted: int = Field(description="Events written.")
    topic: str
    records: list[RecordPosition] = Field(description="Where each event landed, in request order.")


class UnacknowledgedEvent(Strict):
    index: int = Field(description="Position of the event in the request's `events`.")
    ad_id: int
    error: str


class ItemEventsFailed(Strict):
    """Some events were not acknowledged. Retrying the whole batch is safe: replays are idempotent by `sequence`."""

    detail: str
    not_acknowledged: list[UnacknowledgedEvent]


class Problem(Strict):
    """Error body for 429, 503 and 504 (FastAPI's `{"detail": ...}` shape)."""

    detail: str
