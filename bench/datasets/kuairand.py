"""KuaiRand-Pure (Kuaishou short videos) in its official CSV layout, as HSNN tensors.

Two parts. `load_kuairand_features` reads the user and video feature tables (present in the shared
copy). `load_kuairand_logs` reads impression logs (`log_*_pure.csv`, not in the shared copy) and
joins each impression with both tables. A log row is one shown video: is_click = 0 rows are real
negatives, so no negative sampling is needed. The item hierarchy HSNN can index is
video -> author -> tag.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets._common import (
    Vocabulary,
    bucket_count,
    datasets_dir,
    normalize_category,
    parse_floats,
    row_batches,
    standardize,
)
from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch

KUAIRAND_DIR = "kuairand-pure-features"
USER_FILE = "user_features_pure.csv"
VIDEO_FILE = "video_features_basic_pure.csv"

# Numeric columns (log1p for the heavy-tailed counts and durations, then standardised). Every
# other column except the id is categorical; the `*_range` columns are the official bucketings.
USER_NUMERIC = {"follow_user_num": True, "fans_user_num": True, "friend_user_num": True, "register_days": True}
VIDEO_NUMERIC = {"video_duration": True, "server_width": False, "server_height": False}
HISTORY_ATTRIBUTES = ["video_id", "author_id", "tag"]
INTERACTION_ATTRIBUTES = ["author_id", "tag"]
REQUIRED_LOG_COLUMNS = ("user_id", "video_id", "time_ms", "is_click")
MS_PER_HOUR = 3_600_000.0


@dataclass
class FeatureTable:
    """One entity table as tensors. Rows follow the file; one extra all-zero last row stands in for
    ids the table does not know (a log may name a user or video with no features)."""

    id_column: str
    ids: np.ndarray  # (R,) raw ids, as in the file
    dense: Tensor  # (R + 1, D) float32, standardised; missing -> 0
    dense_names: list[str]
    sparse: dict[str, Tensor]  # column -> (R + 1,) long ids in 1..V, 0 = missing; id column = raw id + 1
    vocabularies: dict[str, Vocabulary]
    dropped: list[str]  # columns with a single value (they carry nothing)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_for(self, raw_ids: np.ndarray) -> np.ndarray:
        """Table row of each raw id; unknown ids map to the all-zero last row."""
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        at = np.minimum(np.searchsorted(sorted_ids, raw_ids), len(sorted_ids) - 1)
        found = sorted_ids[at] == raw_ids
        return np.where(found, order[at], len(self.ids))

    def sparse_ids(
        self, rows: np.ndarray, raw_ids: np.ndarray, names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Sparse features of `rows` (all, or just `names`); the id column comes from the raw ids, so
        it is set even when the row is the unknown one."""
        index = torch.from_numpy(rows)
        names = list(self.sparse) if names is None else list(names)
        out = {name: self.sparse[name][index] for name in names if name != self.id_column}
        if self.id_column in names:
            out[self.id_column] = torch.from_numpy(raw_ids + 1)
        return {name: out[name] for name in names}


@dataclass
class KuaiRandFeatures:
    users: FeatureTable
    videos: FeatureTable

    def catalogue(self) -> tuple[ItemBatch, np.ndarray]:
        """Every video of the feature table as an ItemBatch, plus its raw video ids."""
        rows = np.arange(len(self.videos))
        sparse = self.videos.sparse_ids(rows, self.videos.ids)
        return ItemBatch(dense=self.videos.dense[: len(rows)], sparse=sparse), self.videos.ids


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader)]
        rows = [row for row in reader if any(row)]  # csv yields [] for a blank line
    bad = [i for i, row in enumerate(rows) if len(row) != len(header)]
    if bad:
        raise ValueError(f"{path}: row {bad[0] + 2} has a different number of cells than the header")
    return header, rows


def _first_tag(value: str) -> str:
    """A video may list several tags ("39,68"); the single-id item feature keeps the first."""
    return value.split(",")[0].strip()


def load_feature_table(path: Path, id_column: str, numeric: dict[str, bool]) -> FeatureTable:
    """CSV -> FeatureTable. Categorical columns: sorted vocabulary -> ids 1..V, empty -> 0.
    Numeric: (log1p if marked) standardised, missing -> 0 plus a `<col>_missing` 0/1 column."""
    header, rows = _read_table(path)
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    if id_column not in columns or not rows:
        raise ValueError(f"{path}: no {id_column!r} column or no rows")
    ids = np.array([int(float(v)) for v in columns[id_column]], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate {id_column}")
    dense, dense_names, sparse, vocabularies, dropped = [], [], {}, {}, []
    for name, values in columns.items():
        if name == id_column:
            continue
        if name in numeric:
            x = parse_floats(values)
            present = x[~np.isnan(x)]
            if len(np.unique(present)) <= 1:
                dropped.append(name)
                continue
            dense.append(standardize(x, log=numeric[name]))
            dense_names.append(name)
            if np.isnan(x).any():
                dense.append(np.isnan(x).astype(np.float32))
                dense_names.append(f"{name}_missing")
            continue
        cleaned = [normalize_category(_first_tag(v) if name == "tag" else v) for v in values]
        vocabulary = Vocabulary(cleaned)
        if len(vocabulary) <= 1:
            dropped.append(name)
            continue
        vocabularies[name] = vocabulary
        sparse[name] = torch.from_numpy(np.append(vocabulary.encode(cleaned), 0))
    matrix = np.stack(dense, axis=1) if dense else np.zeros((len(ids), 0), dtype=np.float32)
    matrix = np.concatenate([matrix, np.zeros((1, matrix.shape[1]), dtype=np.float32)])
    sparse[id_column] = torch.from_numpy(np.append(ids + 1, 0))
    return FeatureTable(
        id_column=id_column,
        ids=ids,
        dense=torch.from_numpy(matrix),
        dense_names=dense_names,
        sparse=sparse,
        vocabularies=vocabularies,
        dropped=dropped,
    )


def load_kuairand_features(root: str | Path | None = None) -> KuaiRandFeatures:
    """Read user_features_pure.csv and video_features_basic_pure.csv from `root`."""
    root = Path(root) if root is not None else datasets_dir() / KUAIRAND_DIR
    return KuaiRandFeatures(
        users=load_feature_table(root / USER_FILE, "user_id", USER_NUMERIC),
        videos=load_feature_table(root / VIDEO_FILE, "video_id", VIDEO_NUMERIC),
    )


def kuairand_schema(
    features: KuaiRandFeatures, history_length: int = 32, tasks: Sequence[str] = ("click",)
) -> FeatureSchema:
    """Schema matching the feature tables. Id columns get about 2 rows per id (some hash collisions);
    small vocabularies get a collision-free table (see `bucket_count`)."""
    users, videos = features.users, features.videos

    def buckets(table: FeatureTable, name: str, history: bool) -> int:
        names = [name, f"history_{name}"] if history else [name]
        if name == table.id_column:
            return bucket_count(int(table.ids.max(initial=0)) + 1, names, factor=2)
        return bucket_count(len(table.vocabularies[name]), names)

    return FeatureSchema(
        user_dense_dim=users.dense.shape[1],
        user_sparse={name: buckets(users, name, False) for name in users.sparse},
        item_dense_dim=videos.dense.shape[1],
        item_sparse={name: buckets(videos, name, name in HISTORY_ATTRIBUTES) for name in videos.sparse},
        history_attributes=list(HISTORY_ATTRIBUTES),
        interaction_attributes=list(INTERACTION_ATTRIBUTES),
        history_length=history_length,
        tasks=list(tasks),
    )


@dataclass
class KuaiRandLogs:
    """Impressions from one or more log files, sorted by time, joined with the feature tables.

    History of impression i: the same user's clicked videos with time_ms strictly before i's
    (from all loaded files), newest `history_length`, with their ages in hours. Clicks at the same
    millisecond as i are not history, so a row never sees its own label.
    """

    schema: FeatureSchema
    features: KuaiRandFeatures
    user_ids: np.ndarray  # (N,) raw
    video_ids: np.ndarray  # (N,) raw
    user_rows: np.ndarray  # (N,) rows in features.users (len = unknown)
    video_rows: np.ndarray  # (N,) rows in features.videos (len = unknown)
    time_ms: np.ndarray  # (N,) int64, non-decreasing
    labels: Tensor  # (N, tasks) float 0/1
    label_columns: list[str]
    source: np.ndarray  # (N,) index into `files`
    files: list[Path]
    skipped_rows: int  # rows dropped for a missing or unparsable required value
    click_index: np.ndarray  # impressions with is_click = 1, sorted by (user, time)
    history_start: np.ndarray  # (N,) into click_index: the user's first click
    history_end: np.ndarray  # (N,) into click_index: one past the user's last click before time_ms

    def __len__(self) -> int:
        return len(self.time_ms)

    def rows_from(self, file_index: int) -> np.ndarray:
        return np.flatnonzero(self.source == file_index)

    def base_rate(self, rows: np.ndarray | None = None) -> Tensor:
        """Mean label per task: the constant predictor that normalised entropy divides by."""
        labels = self.labels if rows is None else self.labels[torch.from_numpy(rows)]
        return labels.mean(dim=0)


def _number_column(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (int64 values, ok mask); fast path for clean integer columns."""
    try:
        return np.array(values, dtype=np.int64), np.ones(len(values), dtype=bool)
    except ValueError:
        x = parse_floats(values)
        ok = np.isfinite(x)
        return np.where(ok, x, 0).astype(np.int64), ok


def _read_log(path: Path, label_columns: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
    wanted = list(dict.fromkeys([*REQUIRED_LOG_COLUMNS, *label_columns]))
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader)]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (have {header})")
        at = [header.index(c) for c in wanted]
        cells: list[list[str]] = [[] for _ in wanted]
        width = max(at) + 1
        for row in reader:
            if len(row) < width:
                if any(cell.strip() for cell in row):
                    for out in cells:
                        out.append("")  # short row: dropped below as unparsable
                continue
            for out, i in zip(cells, at, strict=True):
                out.append(row[i])
    parsed, ok = {}, np.ones(len(cells[0]), dtype=bool)
    for name, values in zip(wanted, cells, strict=True):
        parsed[name], good = _number_column(values)
        ok &= good
    return {name: values[ok] for name, values in parsed.items()}, int((~ok).sum())


def load_kuairand_logs(
    root: str | Path | None,
    log_files: Sequence[str | Path],
    features: KuaiRandFeatures | None = None,
    label_columns: Sequence[str] = ("is_click",),
    history_length: int = 32,
) -> KuaiRandLogs:
    """Read official-format log CSVs (paths absolute or relative to `root`) and join the features.

    Only user_id, video_id, time_ms and is_click are required; other columns are ignored unless
    named in `label_columns` (e.g. "long_view", "is_like"). Label values > 0 count as 1. Task names
    in the schema are the label columns, with is_click called "click". Rows missing a required
    value are skipped and counted. Sorting is by (time_ms, user, video, file, line), so the order
    is the same on every run.
    """
    root = Path(root) if root is not None else datasets_dir() / KUAIRAND_DIR
    features = features or load_kuairand_features(root)
    label_columns = list(dict.fromkeys(label_columns))
    files = [Path(f) if Path(f).is_absolute() else root / f for f in log_files]
    parts, skipped = [], 0
    for index, path in enumerate(files):
        columns, dropped = _read_log(path, label_columns)
        columns["source"] = np.full(len(columns["user_id"]), index, dtype=np.int64)
        parts.append(columns)
        skipped += dropped
    data = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    line = np.arange(len(data["user_id"]))
    order = np.lexsort((line, data["source"], data["video_id"], data["user_id"], data["time_ms"]))
    data = {name: values[order] for name, values in data.items()}

    user_ids, time_ms = data["user_id"], data["time_ms"]
    clicked = data["is_click"] > 0
    # Clicks grouped by user then time; a user's history before t is a contiguous slice.
    _, user_key = np.unique(user_ids, return_inverse=True)
    span = int(time_ms.max(initial=0) - time_ms.min(initial=0)) + 1
    key = user_key.astype(np.int64) * span + (time_ms - time_ms.min(initial=0))
    click_index = np.flatnonzero(clicked)
    click_index = click_index[np.argsort(key[click_index], kind="stable")]
    click_keys = key[click_index]
    history_end = np.searchsorted(click_keys, key, side="left")
    history_start = np.searchsorted(click_keys, user_key.astype(np.int64) * span, side="left")

    labels = np.stack([(data[c] > 0).astype(np.float32) for c in label_columns], axis=1)
    tasks = ["click" if c == "is_click" else c for c in label_columns]
    return KuaiRandLogs(
        schema=kuairand_schema(features, history_length, tasks),
        features=features,
        user_ids=user_ids,
        video_ids=data["video_id"],
        user_rows=features.users.rows_for(user_ids),
        video_rows=features.videos.rows_for(data["video_id"]),
        time_ms=time_ms,
        labels=torch.from_numpy(labels),
        label_columns=label_columns,
        source=data["source"],
        files=files,
        skipped_rows=skipped,
        click_index=click_index,
        history_start=history_start,
        history_end=history_end,
    )


def _users(logs: KuaiRandLogs, rows: np.ndarray) -> UserBatch:
    length = logs.schema.history_length
    start, end = logs.history_start[rows], logs.history_end[rows]
    take = np.minimum(end - start, length)
    cols = np.arange(length)
    valid = cols[None, :] < take[:, None]
    slot = np.where(valid, (end - take)[:, None] + cols[None, :], 0)
    clicks = logs.click_index[slot] if len(logs.click_index) else np.zeros_like(slot)
    videos = logs.features.videos
    attributes = logs.schema.history_attributes
    item_sparse = videos.sparse_ids(logs.video_rows[clicks].reshape(-1), logs.video_ids[clicks].reshape(-1), attributes)
    mask = torch.from_numpy(valid)
    history = {a: torch.where(mask, item_sparse[a].view(len(rows), length), 0) for a in attributes}
    age = (logs.time_ms[rows][:, None] - logs.time_ms[clicks]) / MS_PER_HOUR
    users = logs.features.users
    user_rows = logs.user_rows[rows]
    return UserBatch(
        dense=users.dense[torch.from_numpy(user_rows)],
        sparse={k: v.unsqueeze(1) for k, v in users.sparse_ids(user_rows, logs.user_ids[rows]).items()},
        history=history,
        history_age=torch.where(mask, torch.from_numpy(age.astype(np.float32)), 0.0),
    )


def impression_batch(logs: KuaiRandLogs, rows: np.ndarray) -> TrainingBatch:
    """The given impression rows as one TrainingBatch (row i = impression rows[i])."""
    rows = np.asarray(rows, dtype=np.int64)
    video_rows = logs.video_rows[rows]
    videos = logs.features.videos
    items = ItemBatch(
        dense=videos.dense[torch.from_numpy(video_rows)],
        sparse=videos.sparse_ids(video_rows, logs.video_ids[rows]),
    )
    return TrainingBatch(
        users=_users(logs, rows),
        items=items,
        labels=logs.labels[torch.from_numpy(rows)],
        item_keys=torch.from_numpy(logs.video_ids[rows] + 1),
    )


def kuairand_batches(
    logs: KuaiRandLogs, batch_size: int, rows: np.ndarray | None = None, shuffle: bool = False, seed: int = 0
) -> Iterator[TrainingBatch]:
    """Batches over `rows` (default: all impressions), in time order unless `shuffle`."""
    return row_batches(len(logs), lambda chunk: impression_batch(logs, chunk), batch_size, rows, shuffle, seed)


def split_by_time(logs: KuaiRandLogs, cutoff_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices before / at-or-after a time cutoff (history still spans both sides causally)."""
    cut = int(np.searchsorted(logs.time_ms, cutoff_ms, side="left"))
    return np.arange(cut), np.arange(cut, len(logs))
