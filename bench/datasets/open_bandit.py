"""Open Bandit Dataset (ZOZOTOWN) small sample: real impressions with click labels, as HSNN tensors.

Every row of `<campaign>.csv` is one item shown in one of three slots, with its click and the
logging policy's propensity. There is no user id, only four hashed user-feature columns and a
per-item "affinity" (clicks in the past) vector. Meant for log loss / normalised entropy and
calibration checks: with 34-80 items per campaign it is too small for retrieval recall.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets._common import Vocabulary, bucket_count, datasets_dir, parse_floats, row_batches, standardize
from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch

OBD_DIR = "open-bandit-obd"
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
USER_COLUMNS = [f"user_feature_{k}" for k in range(4)]
ITEM_CATEGORICAL = ["item_feature_1", "item_feature_2", "item_feature_3"]
AFFINITY_PREFIX = "user-item_affinity_"


@dataclass
class OpenBanditData:
    """All loaded impressions, sorted by time; row i of `users`/`items`/`labels` is impression i."""

    schema: FeatureSchema
    users: UserBatch  # per impression: hashed user features + position; dense = log1p(affinity) vector
    items: ItemBatch  # per impression: the shown item's features
    labels: Tensor  # (N, 1) click
    item_keys: Tensor  # (N,) item feature id (catalogue row + 1)
    propensity: np.ndarray  # (N,) logging policy's probability of this item in this slot
    timestamp: np.ndarray  # (N,) seconds since the epoch (UTC)
    source: np.ndarray  # (N,) index into `files`
    files: list[tuple[str, str]]  # (policy, campaign) per source index
    catalogue: ItemBatch  # every item of the loaded campaigns once; row r has item_id r + 1
    catalogue_keys: list[tuple[str, int]]  # (campaign, item_id in the file) per catalogue row

    def __len__(self) -> int:
        return len(self.labels)

    def base_ctr(self, rows: np.ndarray | None = None) -> float:
        """Clicks / impressions: the constant prediction normalised entropy is measured against."""
        labels = self.labels if rows is None else self.labels[torch.from_numpy(np.asarray(rows))]
        return float(labels.mean())

    def base_ctr_by_file(self) -> dict[tuple[str, str], float]:
        return {key: self.base_ctr(np.flatnonzero(self.source == i)) for i, key in enumerate(self.files)}


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader)]
        rows = [row for row in reader if any(row)]  # csv yields [] for a blank line
    return header, rows


def _first_seen_ids(values: Sequence[str]) -> np.ndarray:
    """Ids 1.. in order of first appearance. The hashed strings differ between the random and bts
    copies of the same campaign, but only by relabelling: numbering categories by first appearance
    in item order gives both copies the same ids."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(v, len(seen) + 1) for v in values], dtype=np.int64)


def _item_context(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """item_context.csv -> (item ids, item_feature_0, (items, 3) categorical ids), in item id order."""
    header, rows = _read_csv(path)
    col = {name: i for i, name in enumerate(header)}
    rows.sort(key=lambda r: int(r[col["item_id"]]))
    item_ids = np.array([int(r[col["item_id"]]) for r in rows], dtype=np.int64)
    feature0 = parse_floats([r[col["item_feature_0"]] for r in rows])
    categorical = np.stack([_first_seen_ids([r[col[c]] for r in rows]) for c in ITEM_CATEGORICAL], axis=1)
    return item_ids, feature0, categorical


def _catalogue_row(row_of: dict[tuple[str, int], int], campaign: str, item: str) -> int:
    key = (campaign, int(item))
    if key not in row_of:
        raise ValueError(f"{campaign}: item {item} is shown in the log but missing from item_context.csv")
    return row_of[key]


def _timestamp(value: str) -> float:
    return datetime.fromisoformat(value.strip()).timestamp()


def load_open_bandit(
    root: str | Path | None = None,
    policies: Sequence[str] = POLICIES,
    campaigns: Sequence[str] = ("all",),
    history_length: int = 8,
) -> OpenBanditData:
    """Load `<policy>/<campaign>/<campaign>.csv` + item_context.csv for every pair asked for.

    Mapping:
    - items are keyed by (campaign, item_id): campaigns number their items separately, so item 0
      of "men" and item 0 of "all" are different catalogue rows. Item sparse features: item_id
      (catalogue row + 1) and item_feature_1..3 (categories numbered per campaign, see
      `_first_seen_ids`); item dense: item_feature_0, standardised.
    - users: user_feature_0..3 (hashed strings -> ids, shared across files) and the slot
      `position` (1-3) as user-side sparse features; user dense: log1p of the affinity vector,
      one column per catalogue row (0 for other campaigns' items).
    - history: the items with positive affinity (past clicks), the strongest last, capped at
      `history_length`; ages are 0 (the data give no click times).
    - labels: (N, 1) click; task "click".
    """
    root = Path(root) if root is not None else datasets_dir() / OBD_DIR
    campaigns = list(dict.fromkeys(campaigns))
    files = [(p, c) for p in dict.fromkeys(policies) for c in campaigns]
    if not files:
        raise ValueError("no policy / campaign selected")

    # Catalogue: one block of rows per campaign, item features checked identical across policies.
    offsets: dict[str, int] = {}
    keys: list[tuple[str, int]] = []
    feature0, categorical = [], []
    shift = np.zeros(len(ITEM_CATEGORICAL), dtype=np.int64)
    for campaign in campaigns:
        contexts = [_item_context(root / p / campaign / "item_context.csv") for p in dict.fromkeys(policies)]
        for other in contexts[1:]:
            if not all(np.array_equal(a, b) for a, b in zip(contexts[0], other, strict=True)):
                raise ValueError(f"{campaign}: item_context.csv differs between policies beyond relabelling")
        ids, f0, cat = contexts[0]
        offsets[campaign] = len(keys)
        keys += [(campaign, int(i)) for i in ids]
        feature0.append(f0)
        # Categories of different campaigns never share an id: each campaign gets the next ids.
        categorical.append(np.where(cat > 0, cat + shift, 0))
        shift = shift + cat.max(axis=0)
    num_items = len(keys)
    row_of = {key: r for r, key in enumerate(keys)}
    cat_ids = np.concatenate(categorical)
    catalogue = ItemBatch(
        dense=torch.from_numpy(standardize(np.concatenate(feature0))).unsqueeze(1),
        sparse={
            "item_id": torch.arange(1, num_items + 1),
            **{name: torch.from_numpy(cat_ids[:, k]) for k, name in enumerate(ITEM_CATEGORICAL)},
        },
    )

    impressions = []
    for source, (policy, campaign) in enumerate(files):
        header, rows = _read_csv(root / policy / campaign / f"{campaign}.csv")
        col = {name: i for i, name in enumerate(header)}
        affinity = np.zeros((len(rows), num_items), dtype=np.float32)
        at = [i for i, name in enumerate(header) if name.startswith(AFFINITY_PREFIX)]
        targets = [_catalogue_row(row_of, campaign, header[i][len(AFFINITY_PREFIX) :]) for i in at]
        cells = np.array([r[at[0] : at[-1] + 1] for r in rows]) if at else np.zeros((len(rows), 0), dtype=str)
        block = cells[:, np.array(at, dtype=np.int64) - (at[0] if at else 0)]
        try:
            values = block.astype(np.float64)
        except ValueError:  # some empty or odd cells: the slow, forgiving parser
            values = np.stack([parse_floats(list(column)) for column in block.T], axis=1)
        affinity[:, targets] = np.nan_to_num(values)
        impressions.append(
            {
                "time": np.array([_timestamp(r[col["timestamp"]]) for r in rows]),
                "item_row": np.array([_catalogue_row(row_of, campaign, r[col["item_id"]]) for r in rows]),
                "position": np.array([int(r[col["position"]]) for r in rows], dtype=np.int64),
                "click": np.array([float(r[col["click"]]) > 0 for r in rows], dtype=np.float32),
                "propensity": parse_floats([r[col["propensity_score"]] for r in rows]),
                "user": [[r[col[c]] for r in rows] for c in USER_COLUMNS],
                "affinity": affinity,
                "source": np.full(len(rows), source, dtype=np.int64),
            }
        )
    return _assemble(impressions, catalogue, keys, files, history_length)


def _assemble(
    impressions: list[dict],
    catalogue: ItemBatch,
    keys: list[tuple[str, int]],
    files: list[tuple[str, str]],
    history_length: int,
) -> OpenBanditData:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([part[name] for part in impressions])

    time, source = cat("time"), cat("source")
    order = np.lexsort((np.arange(len(time)), source, time))
    item_rows = cat("item_row")[order]
    affinity = cat("affinity")[order]
    user_sparse, user_buckets = {}, {}
    for k, name in enumerate(USER_COLUMNS):
        values = [v for part in impressions for v in part["user"][k]]
        vocabulary = Vocabulary(values)
        user_sparse[name] = torch.from_numpy(vocabulary.encode(values)[order]).unsqueeze(1)
        user_buckets[name] = bucket_count(len(vocabulary), [name])
    position = cat("position")[order]
    user_sparse["position"] = torch.from_numpy(position).unsqueeze(1)
    user_buckets["position"] = bucket_count(int(position.max()), ["position"])

    # History: items clicked before (affinity > 0), weakest first so the strongest is "newest".
    strength = np.where(affinity > 0, affinity, -np.inf)
    ranked = np.argsort(strength, axis=1, kind="stable")[:, -history_length:]
    valid = np.take_along_axis(strength, ranked, axis=1) > -np.inf
    order_valid = np.argsort(~valid, axis=1, kind="stable")  # left-align the real entries
    ranked = np.take_along_axis(ranked, order_valid, axis=1)
    valid = np.take_along_axis(valid, order_valid, axis=1)
    history_rows = torch.from_numpy(ranked)
    mask = torch.from_numpy(valid)
    history = {
        name: torch.where(mask, catalogue.sparse[name][history_rows], 0) for name in ["item_id", *ITEM_CATEGORICAL]
    }
    num_items = len(keys)
    item_vocab = {name: int(catalogue.sparse[name].max()) for name in ITEM_CATEGORICAL}
    schema = FeatureSchema(
        user_dense_dim=num_items,
        user_sparse=user_buckets,
        item_dense_dim=1,
        item_sparse={
            "item_id": bucket_count(num_items, ["item_id", "history_item_id"]),
            **{name: bucket_count(v, [name, f"history_{name}"]) for name, v in item_vocab.items()},
        },
        history_attributes=["item_id", *ITEM_CATEGORICAL],
        interaction_attributes=["item_id", *ITEM_CATEGORICAL],
        history_length=history_length,
        tasks=["click"],
    )
    rows = torch.from_numpy(item_rows)
    return OpenBanditData(
        schema=schema,
        users=UserBatch(
            dense=torch.from_numpy(np.log1p(affinity)),
            sparse=user_sparse,
            history=history,
            history_age=torch.zeros(len(order), history_length),
        ),
        items=catalogue.select(rows),
        labels=torch.from_numpy(cat("click")[order]).unsqueeze(1),
        item_keys=rows + 1,
        propensity=cat("propensity")[order],
        timestamp=time[order],
        source=source[order],
        files=files,
        catalogue=catalogue,
        catalogue_keys=keys,
    )


def impression_batch(data: OpenBanditData, rows: np.ndarray) -> TrainingBatch:
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return TrainingBatch(
        users=data.users.select(index),
        items=data.items.select(index),
        labels=data.labels[index],
        item_keys=data.item_keys[index],
    )


def open_bandit_batches(
    data: OpenBanditData, batch_size: int, rows: np.ndarray | None = None, shuffle: bool = False, seed: int = 0
) -> Iterator[TrainingBatch]:
    """Batches over `rows` (default: every impression), in time order unless `shuffle`."""
    return row_batches(len(data), lambda chunk: impression_batch(data, chunk), batch_size, rows, shuffle, seed)
