"""Events -> the model's tensors: users, ads and impressions stacked into `hsnn.features` batches.

Conversion trusts input that `streaming.validation` has checked: a caller that checked every row says so
with `checked=True` (the API's scorer, the trainer, the index store) and nothing is checked twice. Without
it, each row is checked here and the first problem raises `SchemaMismatch` naming the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from streaming.contracts import ImpressionEvent, ItemFeatures, Labels, UserFeatures
from streaming.validation import SchemaMismatch, item_problems, require_fit, user_problems


class UnknownAd(ValueError):
    """Impressions whose ad_id is not (yet) in the item catalogue."""

    def __init__(self, ad_ids: Sequence[int]) -> None:
        shown = ", ".join(str(a) for a in ad_ids[:10]) + (" ..." if len(ad_ids) > 10 else "")
        super().__init__(f"{len(ad_ids)} impression(s) reference ad ids missing from the item catalogue: {shown}")
        self.ad_ids = list(ad_ids)


def _pad_rows(rows: Sequence[Sequence[float]], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Keep the last `length` of each row, right-pad with 0, in one tensor call.

    One small tensor per row (the tests' `pad_id_lists`) dominated the conversion of a 1k-event batch.
    """
    padded = [[*row[-length:], *([0] * (length - len(row)))] if length else [] for row in rows]
    return torch.tensor(padded, dtype=dtype).reshape(len(rows), length)


def users_to_batch(users: Sequence[UserFeatures], schema: FeatureSchema, *, checked: bool = False) -> UserBatch:
    """Stack users into a UserBatch.

    - dense: (U, user_dense_dim).
    - sparse: every schema feature, (U, L) right-padded with 0, L the longest list in the batch (at
      least 1); a feature a user does not send is all 0 (missing).
    - history: the newest `schema.history_length` engagements (newest = last in the list), kept in
      list order (oldest first) and right-padded; an attribute an engagement does not carry is 0.
      Note that I2IF treats an engagement whose first history attribute is 0 as padding.
    - history_age: (U, history_length) hours, 0 where padded.
    """
    if not checked:
        for row, user in enumerate(users):
            require_fit(user_problems(user, schema), row)
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


def stack_items(
    ad_ids: Sequence[int],
    dense: Sequence[Sequence[float]],
    sparse: Sequence[Mapping[str, int]],
    schema: FeatureSchema,
) -> ItemBatch:
    """Checked ads, row for row, as an ItemBatch: dense (N, item_dense_dim), one id per schema sparse feature (N,).

    A sparse feature an ad does not send is 0 (missing); `item_id`, if in the schema, is the ad id.
    Shared by `items_to_batch` (events) and the index store (its catalogue's JSON), so both build the same rows.
    """
    count = len(ad_ids)
    batch_dense = torch.tensor([list(row) for row in dense], dtype=torch.float32).reshape(count, schema.item_dense_dim)
    batch_sparse = {}
    for name in schema.item_sparse:
        values = list(ad_ids) if name == "item_id" else [ids.get(name, 0) for ids in sparse]
        batch_sparse[name] = torch.tensor(values, dtype=torch.long).reshape(count)
    return ItemBatch(dense=batch_dense, sparse=batch_sparse)


def items_to_batch(
    items: Sequence[ItemFeatures], ad_ids: Sequence[int], schema: FeatureSchema, *, checked: bool = False
) -> ItemBatch:
    """Stack ads' features into an ItemBatch (see `stack_items`)."""
    if len(items) != len(ad_ids):
        raise ValueError(f"{len(items)} items but {len(ad_ids)} ad ids")
    if not checked:
        for row, (features, ad_id) in enumerate(zip(items, ad_ids, strict=True)):
            require_fit(item_problems(ad_id, features.dense, features.sparse, schema), row)
    return stack_items(ad_ids, [f.dense for f in items], [f.sparse for f in items], schema)


def impressions_to_batch(
    events: Sequence[ImpressionEvent],
    schema: FeatureSchema,
    items: Mapping[int, ItemFeatures],
    *,
    checked: bool = False,
) -> TrainingBatch:
    """Turn impressions into a TrainingBatch, joining each ad's features from the item catalogue by ad_id.

    Labels follow `schema.tasks` (each task must be a label field: click, conversion). Soft labels are
    set when at least one event has them; rows without a teacher get their hard labels as the target.
    Raises UnknownAd if an ad_id is not in `items`, SchemaMismatch if an unchecked event does not fit `schema`.
    """
    missing = list(dict.fromkeys(e.ad_id for e in events if e.ad_id not in items))
    if missing:
        raise UnknownAd(missing)
    for task in schema.tasks:
        if task not in Labels.model_fields:
            raise SchemaMismatch(
                "labels", f"schema task {task!r} has no label field (have {list(Labels.model_fields)})"
            )
    users = users_to_batch([e.user for e in events], schema, checked=checked)
    ad_ids = [e.ad_id for e in events]
    item_batch = items_to_batch([items[a] for a in ad_ids], ad_ids, schema, checked=checked)
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
