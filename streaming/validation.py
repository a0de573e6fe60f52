"""One validator: does a user or an item fit the model's FeatureSchema?

Decoding (`streaming.codec`) checks what needs no model: JSON shape, types, bounds. Whether a user or an
ad fits *this* model (dense widths, sparse feature and history attribute names, item_id = ad id) is
checked here, once per user or ad, and comes back as `Problem`s -- a field path and a message -- so each
reader answers in its own way from the same findings: the API as a 422, the trainer and the indexer as
a dead letter (`SchemaMismatch`), the index store by leaving the ad out of a build. Tensor conversion
(`streaming.tensors`) trusts input checked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hsnn.config import FeatureSchema
from streaming.contracts import (
    MAX_FEATURE_MAGNITUDE,
    MAX_HISTORY,
    MAX_ID,
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    UserFeatures,
)


@dataclass(frozen=True)
class Problem:
    """One way a user or an ad does not fit: `path` is the field within the event or request that carries it
    (`("user", "dense")`, `("features", "sparse", "brand")`), `message` says what is wrong."""

    path: tuple[str | int, ...]
    message: str

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.path)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SchemaMismatch(ValueError):
    """A well-formed event that does not fit the model's FeatureSchema (raised where one problem is enough)."""

    def __init__(self, field: str, message: str, row: int | None = None) -> None:
        where = field if row is None else f"[{row}].{field}"
        super().__init__(f"{where}: {message}")
        self.field = field
        self.row = row

    @classmethod
    def first_of(cls, problems: Sequence[Problem], row: int | None = None) -> SchemaMismatch:
        return cls(problems[0].field, problems[0].message, row)


@dataclass(frozen=True)
class UserLimits:
    """Bounds a service may set tighter than the wire contract (the API's `max_history`, `max_dense_magnitude`).

    The defaults are the wire's own bounds, which decoding already enforces, so they add no check.
    """

    max_history: int = MAX_HISTORY
    max_dense_magnitude: float = MAX_FEATURE_MAGNITUDE


WIRE_LIMITS = UserLimits()


def user_problems(user: UserFeatures, schema: FeatureSchema, limits: UserLimits = WIRE_LIMITS) -> list[Problem]:
    """Everything about `user` that does not fit `schema` or `limits` (empty when it fits).

    Each unknown history attribute is reported once, at its first engagement, not once per engagement.
    """
    problems: list[Problem] = []
    if len(user.dense) != schema.user_dense_dim:
        problems.append(
            Problem(
                ("user", "dense"),
                f"has {len(user.dense)} values, the schema needs user_dense_dim={schema.user_dense_dim}",
            )
        )
    if limits.max_dense_magnitude < MAX_FEATURE_MAGNITUDE:  # the wire bound itself is checked by decoding
        for position, value in enumerate(user.dense):
            if abs(value) > limits.max_dense_magnitude:
                problems.append(
                    Problem(
                        ("user", "dense", position),
                        f"{value!r} is beyond the accepted magnitude {limits.max_dense_magnitude:g}",
                    )
                )
                break
    problems += [
        Problem(
            ("user", "sparse", name),
            f"unknown user sparse feature {name!r} (the schema has {sorted(schema.user_sparse)})",
        )
        for name in user.sparse
        if name not in schema.user_sparse
    ]
    if len(user.history) > limits.max_history:
        problems.append(
            Problem(
                ("user", "history"),
                f"history has {len(user.history)} events; at most {limits.max_history} are accepted",
            )
        )
    known, reported = set(schema.history_attributes), set()
    for position, engagement in enumerate(user.history):
        if known.issuperset(engagement.attributes):
            continue
        for name in engagement.attributes:
            if name not in known and name not in reported:
                reported.add(name)
                problems.append(
                    Problem(
                        ("user", "history", position, "attributes", name),
                        f"unknown history attribute {name!r} (the schema has {sorted(known)})",
                    )
                )
    return problems


def item_problems(
    ad_id: int, dense: Sequence[float], sparse: Mapping[str, int], schema: FeatureSchema
) -> list[Problem]:
    """Everything about ad `ad_id` (its dense values and sparse ids) that does not fit `schema`.

    `item_id`, when the schema has it, is the ad id: sending it in `sparse` is allowed only with the same value.
    Takes the parts rather than an `ItemFeatures` so the index store checks its stored JSON with the same call.
    """
    if isinstance(ad_id, bool) or not isinstance(ad_id, int) or not 1 <= ad_id <= MAX_ID:
        return [Problem(("ad_id",), f"must be an integer in [1, 2^63), got {ad_id!r}")]
    problems: list[Problem] = []
    if len(dense) != schema.item_dense_dim:
        problems.append(
            Problem(
                ("features", "dense"),
                f"ad {ad_id} has {len(dense)} values, the schema needs item_dense_dim={schema.item_dense_dim}",
            )
        )
    problems += [
        Problem(
            ("features", "sparse", name),
            f"ad {ad_id} has an unknown item sparse feature {name!r} (the schema has {sorted(schema.item_sparse)})",
        )
        for name in sparse
        if name not in schema.item_sparse
    ]
    if sparse.get("item_id", ad_id) != ad_id:
        problems.append(
            Problem(("features", "sparse", "item_id"), f"is {sparse['item_id']} but item_id is the ad id ({ad_id})")
        )
    return problems


def require_fit(problems: Sequence[Problem], row: int | None = None) -> None:
    """Raise SchemaMismatch naming the first problem, if there is one (for callers that stop at the first)."""
    if problems:
        raise SchemaMismatch.first_of(problems, row)


def check_user_features(user: UserFeatures, schema: FeatureSchema, row: int | None = None) -> None:
    """Raise SchemaMismatch (the first problem) if `user` does not fit `schema`."""
    require_fit(user_problems(user, schema), row)


def impression_problems(event: ImpressionEvent, features: ItemFeatures, schema: FeatureSchema) -> list[Problem]:
    """An impression's user and its ad (`features`, joined from the catalogue) against `schema`: the trainer's check."""
    return user_problems(event.user, schema) + item_problems(event.ad_id, features.dense, features.sparse, schema)


def item_event_problems(event: ItemEvent, schema: FeatureSchema) -> list[Problem]:
    """A create/update's features against `schema` (an expire carries none): the indexer's check."""
    if event.features is None:
        return []
    return item_problems(event.ad_id, event.features.dense, event.features.sparse, schema)
