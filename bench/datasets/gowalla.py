"""Gowalla check-ins in the NGCF/LightGCN text format, as HSNN tensors.

Each line of train.txt / valid.txt / test.txt is `user item item ...` (0-based remap ids, space
separated). The data are implicit positives only: no impressions, labels, timestamps or item
attributes. Training batches therefore pair every positive with sampled negatives, and the
schema has no dense features. Feature ids are the file ids + 1, because 0 means padding.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets._common import as_index_array, bucket_count, datasets_dir, last_items
from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch, hash_ids

GOWALLA_DIR = "gowalla-ngcf"
_GROUP_SALT = zlib.crc32(b"gowalla.item_group") % 65_521


@dataclass
class Interactions:
    """Per-user item lists in CSR form: user u's items are `items[indptr[u]:indptr[u + 1]]`, oldest first.

    Items are 0-based catalogue rows (the file's remap ids). "Oldest first" is the file's order
    within a line; Gowalla has no timestamps, so this is a convention, not time.
    """

    indptr: np.ndarray  # (num_users + 1,) int64
    items: np.ndarray  # (nnz,) int64
    num_items: int
    _keys: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.items)

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def owners(self) -> np.ndarray:
        """(nnz,) the user of every entry."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), self.counts())

    def users_with_items(self) -> np.ndarray:
        return np.flatnonzero(self.counts() > 0)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Vectorised membership test of (user, item) pairs, by binary search in sorted pair keys."""
        if self._keys is None:
            self._keys = np.sort(self.owners() * self.num_items + self.items)
        if len(self._keys) == 0:
            return np.zeros(np.broadcast(users, items).shape, dtype=bool)
        query = np.asarray(users, dtype=np.int64) * self.num_items + np.asarray(items, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._keys, query), len(self._keys) - 1)
        return self._keys[at] == query


class ImplicitSplit:
    """Sizes and a leak check shared by the implicit-feedback data sets (needs `train` and `eval`)."""

    train: Interactions
    eval: Interactions

    @property
    def num_users(self) -> int:
        return self.train.num_users

    @property
    def num_items(self) -> int:
        return self.train.num_items

    def split_summary(self) -> dict[str, int]:
        owners = self.eval.owners()
        return {
            "users": self.num_users,
            "items": self.num_items,
            "train_interactions": self.train.nnz,
            "eval_interactions": self.eval.nnz,
            "eval_users": len(self.eval.users_with_items()),
            "eval_in_train": int(self.train.contains(owners, self.eval.items).sum()),
        }


@dataclass
class GowallaData(ImplicitSplit):
    """Everything the benchmark needs from one Gowalla split, already in the core's tensor types."""

    schema: FeatureSchema
    train: Interactions  # training positives per user
    eval: Interactions  # held-out positives per user (valid.txt, or the test file given by path)
    items: ItemBatch  # the whole catalogue, row r = file item id r
    item_ids: Tensor  # (N,) feature id of each catalogue row: file id + 1
    user_org_ids: np.ndarray | None  # SNAP user id per user row, from user_list.txt when present
    item_org_ids: np.ndarray | None  # SNAP location id per item row, from item_list.txt when present
    train_files: list[Path]
    eval_file: Path

    def summary(self) -> dict[str, int]:
        return self.split_summary()


def read_interaction_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse `user item item ...` lines into parallel (user, item) arrays in file order.

    Also returns the user id of every non-blank line, so a line holding only a user id still
    counts that user. Blank lines are skipped; a non-integer or negative token is an error naming
    its line.
    """
    path = Path(path)
    users: list[str] = []
    counts: list[int] = []
    tokens: list[str] = []
    with path.open() as handle:
        for line in handle:
            parts = line.split()
            if parts:
                users.append(parts[0])
                counts.append(len(parts) - 1)
                tokens.extend(parts[1:])
    try:
        user_ids = np.array(users, dtype=np.int64)
        items = np.array(tokens, dtype=np.int64)
    except ValueError:
        _raise_bad_line(path)
        raise
    if (user_ids < 0).any() or (items < 0).any():
        _raise_bad_line(path)
    return np.repeat(user_ids, counts), items, user_ids


def _raise_bad_line(path: Path) -> None:
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            for token in line.split():
                if not token.isdigit():
                    raise ValueError(f"{path}:{lineno}: expected non-negative integer ids, got {token!r}")


def to_interactions(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> Interactions:
    """Group pairs by user, keeping file order; a repeated (user, item) keeps its last position."""
    position = np.arange(len(users))
    order = np.lexsort((-position, items, users))
    users, items, position = users[order], items[order], position[order]
    first = np.ones(len(users), dtype=bool)
    first[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    users, items, position = users[first], items[first], position[first]
    order = np.lexsort((position, users))
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
    return Interactions(indptr=indptr, items=items[order], num_items=num_items)


def _read_id_list(path: Path) -> np.ndarray | None:
    """`org_id remap_id` table -> org id per remap id (None if the file is absent)."""
    if not path.exists():
        return None
    table = np.loadtxt(path, dtype=np.int64, skiprows=1, ndmin=2)
    out = np.full(int(table[:, 1].max()) + 1, -1, dtype=np.int64)
    out[table[:, 1]] = table[:, 0]
    return out


def id_buckets(count: int) -> int:
    """Table rows for ids 1..count: `hash_ids` permutes ids below buckets - 1, so count + 2 rows give
    every id its own row (no collisions, no unused headroom) and keep row 0 for padding."""
    return count + 2


def load_gowalla(
    root: str | Path | None = None,
    test_path: str | Path | None = None,
    train_with_valid: bool | None = None,
    history_length: int = 32,
    item_groups: int = 0,
    user_buckets: int | None = None,
    item_buckets: int | None = None,
) -> GowallaData:
    """Load Gowalla; by default train.txt -> training positives and valid.txt -> eval positives.

    With `test_path` (the official test.txt, kept out of the shared folder) the eval positives come
    from that file and, unless `train_with_valid=False`, training uses train.txt + valid.txt: that
    union is the NGCF/LightGCN training set, the protocol of the published numbers.

    The data have no item attributes. `item_groups > 0` adds an `item_group` feature derived from a
    salted hash of the item id: it carries no information about the item, it only gives I2IF a
    coarse attribute to exercise. Contiguous id ranges are *not* used as groups: the remap ids were
    handed out in order of first appearance over train + valid, so an id range would encode which
    user first visited the item, and leak valid.txt positives. With no groups, `item_id` is both the
    history and the interaction attribute (the validator accepts it).

    Id tables default to one row per id (`id_buckets`).
    """
    root = Path(root) if root is not None else datasets_dir() / GOWALLA_DIR
    if train_with_valid is None:
        train_with_valid = test_path is not None
    train_files = [root / "train.txt"] + ([root / "valid.txt"] if train_with_valid else [])
    eval_file = Path(test_path) if test_path is not None else root / "valid.txt"
    if eval_file.resolve() in {p.resolve() for p in train_files}:
        raise ValueError(f"{eval_file} is both a training and the evaluation file")

    parts = [read_interaction_file(p) for p in [*train_files, eval_file]]
    train_users = np.concatenate([u for u, _, _ in parts[:-1]])
    train_items = np.concatenate([i for _, i, _ in parts[:-1]])
    eval_users, eval_items, _ = parts[-1]

    user_org_ids = _read_id_list(root / "user_list.txt")
    item_org_ids = _read_id_list(root / "item_list.txt")
    listed_users = [len(a) - 1 for a in (user_org_ids,) if a is not None]
    listed_items = [len(a) - 1 for a in (item_org_ids,) if a is not None]
    num_users = 1 + max([int(lines.max()) for _, _, lines in parts if len(lines)] + listed_users + [-1])
    num_items = 1 + max([int(i.max()) for _, i, _ in parts if len(i)] + listed_items + [-1])

    schema = gowalla_schema(num_users, num_items, history_length, item_groups, user_buckets, item_buckets)
    item_ids = torch.arange(1, num_items + 1, dtype=torch.long)
    sparse = {"item_id": item_ids}
    if item_groups:
        sparse["item_group"] = hash_ids(item_ids, item_groups + 1, _GROUP_SALT)
    return GowallaData(
        schema=schema,
        train=to_interactions(train_users, train_items, num_users, num_items),
        eval=to_interactions(eval_users, eval_items, num_users, num_items),
        items=ItemBatch(dense=torch.zeros(num_items, 0), sparse=sparse),
        item_ids=item_ids,
        user_org_ids=user_org_ids,
        item_org_ids=item_org_ids,
        train_files=train_files,
        eval_file=eval_file,
    )


def gowalla_schema(
    num_users: int,
    num_items: int,
    history_length: int = 32,
    item_groups: int = 0,
    user_buckets: int | None = None,
    item_buckets: int | None = None,
) -> FeatureSchema:
    """No dense features; sparse user_id, item_id (+ item_group); one task, "click"."""
    item_sparse = {"item_id": item_buckets or id_buckets(num_items)}
    if item_groups:
        item_sparse["item_group"] = bucket_count(item_groups, ["item_group", "history_item_group"])
    return FeatureSchema(
        user_dense_dim=0,
        user_sparse={"user_id": user_buckets or id_buckets(num_users)},
        item_dense_dim=0,
        item_sparse=item_sparse,
        history_attributes=list(item_sparse),
        interaction_attributes=["item_group"] if item_groups else ["item_id"],
        history_length=history_length,
        tasks=["click"],
    )


def sample_negatives(train: Interactions, users: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(len(users), count) items drawn uniformly from the catalogue minus each user's train positives.

    Rejection sampling: draw uniformly from all catalogue rows, redraw the ones that are train
    positives of that user, until none is. Draws are with replacement (a negative may repeat).
    Held-out positives are not excluded: the sampler must not look at evaluation data.
    """
    users = np.asarray(users, dtype=np.int64)
    full = train.counts()[users] >= train.num_items
    if full.any():
        raise ValueError(f"user {int(users[full][0])} has every catalogue item as a positive; no negative exists")
    candidates = rng.integers(0, train.num_items, size=(len(users), count))
    owners = np.broadcast_to(users[:, None], candidates.shape)
    bad = train.contains(owners, candidates)
    while bad.any():
        redraw = rng.integers(0, train.num_items, size=int(bad.sum()))
        candidates[bad] = redraw
        still = train.contains(owners[bad], redraw)
        bad[bad] = still
    return candidates


def _user_batch(data: GowallaData, users: np.ndarray, drop: np.ndarray | None) -> UserBatch:
    length = data.schema.history_length
    positions, valid = last_items(data.train.indptr, data.train.items, users, length, drop)
    values = data.train.items[positions] + 1 if data.train.nnz else np.zeros_like(positions)
    history = torch.from_numpy(np.where(valid, values, 0))
    histories = {"item_id": history}
    if "item_group" in data.items.sparse:
        groups = data.items.sparse["item_group"]
        histories["item_group"] = torch.where(history > 0, groups[(history - 1).clamp(min=0)], 0)
    return UserBatch(
        dense=torch.zeros(len(users), 0),
        sparse={"user_id": torch.from_numpy(users + 1).unsqueeze(1)},
        history=histories,
        # No timestamps in Gowalla: every engagement is "now", so I2IF recency is 1 for any match.
        history_age=torch.zeros(len(users), length),
    )


def user_batch(data: GowallaData, user_rows: Tensor | np.ndarray | Sequence[int]) -> UserBatch:
    """Users for evaluation: history = the newest `history_length` of all their train items."""
    return _user_batch(data, as_index_array(user_rows), drop=None)


def training_batches(
    data: GowallaData, batch_size: int, negatives_per_positive: int, seed: int
) -> Iterator[TrainingBatch]:
    """One epoch of (positive + sampled negatives) batches, in a seeded random order.

    Every train (user, item) pair is used once as a positive. `batch_size` counts positives: a
    batch has `batch_size * (1 + negatives_per_positive)` rows (the last batch may be smaller),
    laid out in blocks, row `p * (1 + k)` is positive p and the next k rows its negatives.
    Negatives come from `sample_negatives` (uniform over items the user has no train positive
    on, with replacement). Labels are (rows, 1) for the single task "click".

    History: the user's other train items, newest `history_length` of them. The positive itself
    is left out (else the label sits in the input). The negatives of a positive get the very same
    history, so history length or content cannot tell a positive row from a negative one.
    Same seed, same batch size -> identical batches; pass seed + epoch for a new epoch.
    """
    return implicit_training_batches(
        data, lambda users, drop: _user_batch(data, users, drop), batch_size, negatives_per_positive, seed
    )


def implicit_training_batches(
    data,
    make_users: Callable[[np.ndarray, np.ndarray], UserBatch],
    batch_size: int,
    negatives_per_positive: int,
    seed: int,
) -> Iterator[TrainingBatch]:
    """The positive + sampled-negatives layout shared by the implicit-feedback loaders (see training_batches).

    `data` needs `train` (Interactions), `items` and `item_ids`; `make_users(users, drop)` builds each
    positive's user rows with the train slot `drop` left out of its history.
    """
    if batch_size < 1 or negatives_per_positive < 0:
        raise ValueError("batch_size must be >= 1 and negatives_per_positive >= 0")
    rng = np.random.default_rng(seed)
    train = data.train
    owners = train.owners()
    slot = np.arange(train.nnz) - train.indptr[owners]
    order = rng.permutation(train.nnz)
    width = 1 + negatives_per_positive
    for start in range(0, train.nnz, batch_size):
        picked = order[start : start + batch_size]
        users = owners[picked]
        negatives = sample_negatives(train, users, negatives_per_positive, rng)
        item_rows = np.concatenate([train.items[picked][:, None], negatives], axis=1).reshape(-1)
        labels = torch.zeros(len(picked), width)
        labels[:, 0] = 1.0
        per_positive = make_users(users, slot[picked])
        repeat = torch.arange(len(picked)).repeat_interleave(width)
        rows = torch.from_numpy(item_rows)
        yield TrainingBatch(
            users=per_positive.select(repeat),
            items=data.items.select(rows),
            labels=labels.reshape(-1, 1),
            item_keys=data.item_ids[rows],
        )
