"""MovieLens-100K (GroupLens) as HSNN tensors: explicit ratings turned into timed implicit positives.

The GroupLens licence does not allow the data to be redistributed, so this repository never holds
a copy. The files are read at run time from one of two places:

- the `recbole` wheel on PyPI. It ships ml-100k as RecBole "atomic files" inside the package,
  under `recbole/dataset_example/ml-100k/`. `recbole_wheel` downloads the pinned wheel with
  `pip download --no-deps` into a cache outside the repository. The files are then read straight
  out of the zip; recbole is never installed or imported.
- a GroupLens `ml-100k` folder given by path (`u.data`, `u.user`, `u.item`). A folder holding the
  three atomic files (`ml-100k.inter`, `.user`, `.item`) works too.

A rating >= 4 is a positive. All other ratings are dropped, so they are neither training rows nor
history. Positives are split per user by time (see `split_positives`). Training pairs each train
positive with sampled negatives, as the Gowalla loader does, so both loaders share one harness.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets._common import Vocabulary, as_index_array, bucket_count, last_items
from bench.datasets.gowalla import ImplicitSplit, Interactions, id_buckets, implicit_training_batches
from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from streaming.snapshots import sha256_file

# The wheel this loader was checked against: 943 users, 1,682 items and 100,000 ratings.
RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
CACHE_ENV = "HSNN_CACHE_DIR"

POSITIVE_RATING = 4.0
SECONDS_PER_HOUR = 3600.0

# The 19 genre flags in the order of u.genre / u.item. The first flag that is set is the primary genre.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# u.occupation, a fixed list so the ids do not depend on which users a file holds.
OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
GENDERS = ("F", "M")
# Age buckets of MovieLens-1M: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> ids 1..7.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
# Release year: decades before 1990 (<1930 lumped), then 1990-92, and one bucket per year from 1993,
# where most of the catalogue lies -> ids 1..14; unknown year -> 0.
YEAR_EDGES = (1930, 1940, 1950, 1960, 1970, 1980, 1990, 1993, 1994, 1995, 1996, 1997, 1998)
ZIP_REGIONS = 11  # first ZIP digit 0-9 -> 1..10; a non-digit (a non-US postcode) -> 11; empty -> 0

HISTORY_ATTRIBUTES = ["item_id", "category", "release_bucket"]
INTERACTION_ATTRIBUTES = ["category", "release_bucket"]
SPLITS = ("ratio", "last_one", "recbole")
# RecBole's default general-recommendation split: per user, 80% train, 10% valid, 10% test
RECBOLE_RATIOS = (0.8, 0.1, 0.1)
SPLIT_ORDERS = ("time", "random")


@dataclass
class MovieLensTables:
    """The three files as parsed, with raw ids; nothing filtered, split or remapped yet."""

    rating_users: np.ndarray  # (R,) int64
    rating_items: np.ndarray  # (R,) int64
    ratings: np.ndarray  # (R,) float64
    timestamps: np.ndarray  # (R,) int64, unix seconds
    user_ids: np.ndarray  # (U,) int64
    ages: np.ndarray  # (U,) int64, 0 = unknown
    genders: list[str]
    occupations: list[str]
    zip_codes: list[str]
    item_ids: np.ndarray  # (N,) int64
    titles: list[str]
    years: np.ndarray  # (N,) int64, 0 = unknown
    genres: np.ndarray  # (N, 19) bool, columns in GENRES order
    source: str  # where the tables were read from


@dataclass
class MovieLensData(ImplicitSplit):
    """One MovieLens split in the core's tensor types; the fields follow GowallaData.

    User row u is raw user `user_raw_ids[u]`; item row r is raw movie `item_raw_ids[r]`, with
    feature id r + 1 (`item_ids`). For ML-100K both raw id spaces are 1..n, so the feature ids equal
    the MovieLens ids.
    """

    schema: FeatureSchema
    train: Interactions  # train positives per user, oldest first (time, then item row)
    train_times: np.ndarray  # (train.nnz,) unix seconds, aligned with train.items
    eval: Interactions  # held-out positives per user, oldest first
    eval_times: np.ndarray  # (eval.nnz,) unix seconds, aligned with eval.items
    items: ItemBatch  # the whole catalogue: dense = the 19 genre flags; sparse item_id, category, release_bucket
    item_ids: Tensor  # (N,) feature id of each catalogue row: row + 1
    user_sparse: dict[str, Tensor]  # user feature -> (U,) ids, row u = user row u
    user_raw_ids: np.ndarray
    item_raw_ids: np.ndarray
    item_titles: list[str]
    genres: np.ndarray  # (N, 19) bool multi-hot; `category` keeps only the first genre set
    split: str
    holdout: float
    ratings_read: int  # rating rows in the source (after removing repeated user-item pairs)
    source: str
    # split "recbole": the middle part (validation positives); `eval` is then the test part. When a
    # model is evaluated on `eval`, both train and valid items are masked from its ranking.
    valid: Interactions | None = None
    split_order: str = "time"

    def summary(self) -> dict[str, int]:
        return {"ratings": self.ratings_read, **self.split_summary()}


# --- where the files come from -------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """$HSNN_CACHE_DIR/recbole, else $XDG_CACHE_HOME/hsnn/recbole, else ~/.cache/hsnn/recbole."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "recbole"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hsnn" / "recbole"


def recbole_wheel(
    version: str = RECBOLE_VERSION, cache_dir: str | Path | None = None, timeout_s: float = 120.0
) -> Path:
    """Path to the recbole wheel in the cache, downloaded with pip (no dependencies) when missing.

    The cache must be outside this repository: the wheel holds MovieLens, which must not be stored
    here. The wheel of the pinned version is checked against its SHA-256. Raises RuntimeError when
    pip cannot get the wheel (for example, with no network).
    """
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    if cache.is_relative_to(_repo_root()):
        raise ValueError(f"cache {cache} is inside the repository; MovieLens must not be stored there")
    wheel = cache / f"recbole-{version}-py3-none-any.whl"
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", f"recbole=={version}", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "15", "-d", str(cache),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"pip download of recbole=={version} took over {timeout_s:.0f} s") from error
        if result.returncode != 0 or not wheel.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip could not download recbole=={version} into {cache}: {' | '.join(tail)}")
    if version == RECBOLE_VERSION and sha256_file(wheel) != RECBOLE_WHEEL_SHA256:
        raise ValueError(f"{wheel} does not match the pinned SHA-256 {RECBOLE_WHEEL_SHA256}; delete it to retry")
    return wheel


def _atomic_columns(text: str, path: str) -> dict[str, list[str]]:
    """A RecBole atomic file (tab separated, header `name:type`) -> column name -> cells."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty file")
    names = [cell.split(":", 1)[0].strip() for cell in lines[0].split("\t")]
    columns: dict[str, list[str]] = {name: [] for name in names}
    for lineno, line in enumerate(lines[1:], 2):
        cells = line.split("\t")
        if len(cells) != len(names):
            raise ValueError(f"{path}:{lineno}: {len(cells)} fields, the header has {len(names)}")
        for name, cell in zip(names, cells, strict=True):
            columns[name].append(cell.strip())
    return columns


def _need(columns: dict[str, list[str]], names: Sequence[str], path: str) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (have {list(columns)})")


def _ints(values: Sequence[str], path: str, what: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64).astype(np.int64)
    except ValueError as error:
        raise ValueError(f"{path}: non-numeric {what}") from error


def _year(value: str) -> int:
    """'1995', '01-Jan-1995' -> 1995; '', 'unknown', 'V' -> 0."""
    tail = value.strip()[-4:]
    return int(tail) if tail.isdigit() else 0


def _parse_atomic(inter: str, user: str, item: str, source: str) -> MovieLensTables:
    r = _atomic_columns(inter, f"{source}:ml-100k.inter")
    u = _atomic_columns(user, f"{source}:ml-100k.user")
    i = _atomic_columns(item, f"{source}:ml-100k.item")
    _need(r, ["user_id", "item_id", "rating", "timestamp"], f"{source}:ml-100k.inter")
    _need(u, ["user_id", "age", "gender", "occupation", "zip_code"], f"{source}:ml-100k.user")
    _need(i, ["item_id", "movie_title", "release_year", "class"], f"{source}:ml-100k.item")
    genres = np.zeros((len(i["item_id"]), len(GENRES)), dtype=bool)
    for row, value in enumerate(i["class"]):
        for name in value.split():
            if name not in GENRES:
                raise ValueError(f"{source}:ml-100k.item: unknown genre {name!r} for item {i['item_id'][row]}")
            genres[row, GENRES.index(name)] = True
    return MovieLensTables(
        rating_users=_ints(r["user_id"], source, "user_id"),
        rating_items=_ints(r["item_id"], source, "item_id"),
        ratings=np.array(r["rating"], dtype=np.float64),
        timestamps=_ints(r["timestamp"], source, "timestamp"),
        user_ids=_ints(u["user_id"], source, "user_id"),
        ages=np.array([int(a) if a.isdigit() else 0 for a in u["age"]], dtype=np.int64),
        genders=u["gender"],
        occupations=u["occupation"],
        zip_codes=u["zip_code"],
        item_ids=_ints(i["item_id"], source, "item_id"),
        titles=i["movie_title"],
        years=np.array([_year(y) for y in i["release_year"]], dtype=np.int64),
        genres=genres,
        source=source,
    )


def read_recbole_wheel(wheel: str | Path) -> MovieLensTables:
    """ml-100k.inter / .user / .item, read out of the recbole wheel (a zip) without installing it."""
    with zipfile.ZipFile(wheel) as archive:
        texts = [archive.read(RECBOLE_MEMBER.format(kind)).decode("utf-8") for kind in ("inter", "user", "item")]
    return _parse_atomic(*texts, source=str(wheel))


def read_atomic_dir(root: str | Path) -> MovieLensTables:
    """The three RecBole atomic files from a folder (for example, unpacked from the wheel)."""
    root = Path(root)
    texts = [(root / f"ml-100k.{kind}").read_text(encoding="utf-8") for kind in ("inter", "user", "item")]
    return _parse_atomic(*texts, source=str(root))


def read_grouplens_dir(root: str | Path) -> MovieLensTables:
    """The original GroupLens files: u.data (tab separated), u.user and u.item (`|` separated, Latin-1)."""
    root = Path(root)
    data = (root / "u.data").read_text(encoding="latin-1").split()
    if len(data) % 4:
        raise ValueError(f"{root / 'u.data'}: expected 4 fields per line (user item rating timestamp)")
    table = np.array(data, dtype=np.float64).reshape(-1, 4)
    users = [line.split("|") for line in (root / "u.user").read_text(encoding="latin-1").splitlines() if line.strip()]
    items = [line.split("|") for line in (root / "u.item").read_text(encoding="latin-1").splitlines() if line.strip()]
    for name, rows, width in (("u.user", users, 5), ("u.item", items, 5 + len(GENRES))):
        for lineno, row in enumerate(rows, 1):
            if len(row) != width:
                raise ValueError(f"{root / name}:{lineno}: {len(row)} fields, expected {width}")
    return MovieLensTables(
        rating_users=table[:, 0].astype(np.int64),
        rating_items=table[:, 1].astype(np.int64),
        ratings=table[:, 2],
        timestamps=table[:, 3].astype(np.int64),
        user_ids=np.array([int(row[0]) for row in users], dtype=np.int64),
        ages=np.array([int(row[1]) if row[1].strip().isdigit() else 0 for row in users], dtype=np.int64),
        genders=[row[2].strip() for row in users],
        occupations=[row[3].strip() for row in users],
        zip_codes=[row[4].strip() for row in users],
        item_ids=np.array([int(row[0]) for row in items], dtype=np.int64),
        titles=[row[1] for row in items],
        years=np.array([_year(row[2]) for row in items], dtype=np.int64),
        genres=np.array([[flag.strip() == "1" for flag in row[5:]] for row in items], dtype=bool).reshape(
            -1, len(GENRES)
        ),
        source=str(root),
    )


def read_tables(
    root: str | Path | None = None, recbole_version: str = RECBOLE_VERSION, cache_dir: str | Path | None = None
) -> MovieLensTables:
    """`root` None: the recbole wheel (downloaded if needed); else a GroupLens or atomic-file folder."""
    if root is None:
        return read_recbole_wheel(recbole_wheel(recbole_version, cache_dir))
    root = Path(root)
    if (root / "u.data").exists():
        return read_grouplens_dir(root)
    if (root / "ml-100k.inter").exists():
        return read_atomic_dir(root)
    raise FileNotFoundError(f"{root} holds neither u.data (GroupLens) nor ml-100k.inter (RecBole atomic files)")


# --- features, split and schema ------------------------------------------------------------------


def primary_genre(genres: np.ndarray) -> np.ndarray:
    """(N, 19) flags -> (N,) category ids: 1 + index of the first flag set in GENRES order; none -> 0."""
    genres = np.asarray(genres, dtype=bool)
    return np.where(genres.any(axis=1), genres.argmax(axis=1) + 1, 0).astype(np.int64)


def release_bucket(years: np.ndarray) -> np.ndarray:
    """Release year -> 1..14 (see YEAR_EDGES); 0 (unknown year) -> 0."""
    years = np.asarray(years, dtype=np.int64)
    return np.where(years > 0, np.searchsorted(YEAR_EDGES, years, side="right") + 1, 0).astype(np.int64)


def age_bucket(ages: np.ndarray) -> np.ndarray:
    """Age in years -> 1..7 (see AGE_EDGES); 0 (unknown) -> 0."""
    ages = np.asarray(ages, dtype=np.int64)
    return np.where(ages > 0, np.searchsorted(AGE_EDGES, ages, side="right") + 1, 0).astype(np.int64)


def zip_region(zip_codes: Sequence[str]) -> np.ndarray:
    """First ZIP digit d -> d + 1; a postcode starting with a letter -> 11; empty -> 0."""
    first = [z.strip()[:1] for z in zip_codes]
    return np.array([int(c) + 1 if c.isdigit() else (ZIP_REGIONS if c else 0) for c in first], dtype=np.int64)


def _rows(raw: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Raw ids -> positions in the sorted unique `ids`."""
    return np.searchsorted(ids, raw)


def split_positives(users: np.ndarray, num_users: int, split: str = "ratio", holdout: float = 0.2) -> np.ndarray:
    """Which positives are held out. `users` must be sorted, each user's positives oldest first.

    "ratio": a user with n positives holds out the newest floor(holdout * n), so users with fewer
    than 1 / holdout positives (5 at 0.2) keep all of them for training and have no eval positive.
    "last_one": the newest positive of every user with at least 2 positives.
    Every user keeps at least one train positive.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError("holdout must be in [0, 1)")
    counts = np.bincount(users, minlength=num_users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(users)) - start[users]
    held = np.floor(counts * holdout + 1e-9) if split == "ratio" else (counts >= 2)
    return rank >= (counts - held.astype(np.int64))[users]


def ratio_parts(users: np.ndarray, num_users: int, ratios: Sequence[float] = RECBOLE_RATIOS) -> np.ndarray:
    """Part of each positive (0 = train, 1 = valid, 2 = test, ...) by its position in its user's order.

    `users` must be sorted, each user's positives in the order to split (time, or shuffled). As in
    RecBole's ratio split: a user with n positives gives part i > 0 floor(ratio_i * n) positives and
    part 0 the rest; then, from the last part backwards, a part whose share ratio_i * n is below one
    takes one positive from part 0 while part 0 holds more than one. So a user with 3 positives gets
    1/1/1, and 2 positives give 1 train and 1 test.
    """
    ratios = np.asarray(ratios, dtype=np.float64) / float(np.sum(ratios))
    counts = np.bincount(users, minlength=num_users)
    sizes = np.floor(ratios[None, 1:] * counts[:, None]).astype(np.int64)  # (U, parts - 1)
    first = counts - sizes.sum(axis=1)
    for part in range(len(ratios) - 2, -1, -1):  # the last part first
        share = ratios[part + 1] * counts
        grow = (first > 1) & (share > 0) & (share < 1)
        sizes[grow, part] += 1
        first[grow] -= 1
    bounds = np.cumsum(np.concatenate([first[:, None], sizes], axis=1), axis=1)  # (U, parts) end of each part
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(users)) - start[users]
    return (rank[:, None] >= bounds[users]).sum(axis=1)


def _csr(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> Interactions:
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
    return Interactions(indptr=indptr, items=items.astype(np.int64), num_items=num_items)


def movielens_schema(
    num_users: int,
    num_items: int,
    history_length: int = 32,
    user_buckets: int | None = None,
    item_buckets: int | None = None,
) -> FeatureSchema:
    """User sparse: user_id, age_bucket, gender, occupation, zip_region. Item dense: the 19 genre flags;
    item sparse: item_id, category (primary genre), release_bucket. One task, "click".

    The small vocabularies are fixed constants, so the schema depends only on the two counts.
    """

    def small(vocab: int, name: str, history: bool = False) -> int:
        return bucket_count(vocab, [name, f"history_{name}"] if history else [name])

    return FeatureSchema(
        user_dense_dim=0,
        user_sparse={
            "user_id": user_buckets or id_buckets(num_users),
            "age_bucket": small(len(AGE_EDGES) + 1, "age_bucket"),
            "gender": small(len(GENDERS), "gender"),
            "occupation": small(len(OCCUPATIONS), "occupation"),
            "zip_region": small(ZIP_REGIONS, "zip_region"),
        },
        item_dense_dim=len(GENRES),
        item_sparse={
            "item_id": item_buckets or id_buckets(num_items),
            "category": small(len(GENRES), "category", history=True),
            "release_bucket": small(len(YEAR_EDGES) + 1, "release_bucket", history=True),
        },
        history_attributes=list(HISTORY_ATTRIBUTES),
        interaction_attributes=list(INTERACTION_ATTRIBUTES),
        history_length=history_length,
        tasks=["click"],
    )


def load_movielens(
    root: str | Path | None = None,
    split: str = "ratio",
    holdout: float = 0.2,
    positive_rating: float = POSITIVE_RATING,
    history_length: int = 32,
    user_buckets: int | None = None,
    item_buckets: int | None = None,
    recbole_version: str = RECBOLE_VERSION,
    cache_dir: str | Path | None = None,
    tables: MovieLensTables | None = None,
    split_order: str = "time",
    seed: int = 0,
) -> MovieLensData:
    """Load MovieLens-100K and split each user's positives (rating >= `positive_rating`) by time.

    Source: `tables` if given (already parsed), else `root` (a GroupLens or atomic-file folder), else
    the pinned recbole wheel (see `recbole_wheel`). A (user, item) pair rated more than once keeps
    its newest rating. Each user's positives are ordered by (timestamp, item row); timestamp ties are
    common (ratings entered in one sitting), and the item row breaks them so that the order is
    reproducible. See `split_positives` for the split.

    `split="recbole"` is RecBole's default general-recommendation split (`ratio_parts`, 80/10/10 per
    user): `train`, `valid` and `eval` (the test part). `split_order="time"` splits each user's
    positives in time order (newest 10% = test); `"random"` shuffles each user's positives with
    `seed` first, as RecBole's own default ordering (RO) does. `holdout` is ignored for this split.

    The catalogue is every movie in the item file or in the ratings, rows sorted by raw id; users
    likewise. A movie or user missing from its feature file gets 0 (missing) for every feature.
    """
    t = tables if tables is not None else read_tables(root, recbole_version, cache_dir)
    user_raw = np.unique(np.concatenate([t.user_ids, t.rating_users]))
    item_raw = np.unique(np.concatenate([t.item_ids, t.rating_items]))
    num_users, num_items = len(user_raw), len(item_raw)

    # One rating per (user, item): the newest, then the last in the file.
    users, items = _rows(t.rating_users, user_raw), _rows(t.rating_items, item_raw)
    line = np.arange(len(users))
    order = np.lexsort((-line, -t.timestamps, items, users))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
    kept = order[first]
    positive = kept[t.ratings[kept] >= positive_rating]
    positive = positive[np.lexsort((items[positive], t.timestamps[positive], users[positive]))]
    pos_users, pos_items, pos_times = users[positive], items[positive], t.timestamps[positive]
    if split_order not in SPLIT_ORDERS:
        raise ValueError(f"split_order must be one of {SPLIT_ORDERS}, not {split_order!r}")
    valid = None
    if split == "recbole":
        order_key = np.arange(len(pos_users))
        if split_order == "random":
            order_key = np.random.default_rng(seed).permutation(len(pos_users))
        # rank positives inside each user by the chosen order, then give each its part
        ranked = np.lexsort((order_key, pos_users))
        part = np.empty(len(pos_users), dtype=np.int64)
        part[ranked] = ratio_parts(pos_users[ranked], num_users)
        held = part == 2
        in_valid = part == 1
        valid = _csr(pos_users[in_valid], pos_items[in_valid], num_users, num_items)
        keep_train = part == 0
    else:
        held = split_positives(pos_users, num_users, split, holdout)
        keep_train = ~held

    item_rows = _rows(t.item_ids, item_raw)
    genres = np.zeros((num_items, len(GENRES)), dtype=bool)
    genres[item_rows] = t.genres
    years = np.zeros(num_items, dtype=np.int64)
    years[item_rows] = t.years
    titles = [""] * num_items
    for row, title in zip(item_rows.tolist(), t.titles, strict=True):
        titles[row] = title
    item_ids = torch.arange(1, num_items + 1, dtype=torch.long)
    items_batch = ItemBatch(
        dense=torch.from_numpy(genres.astype(np.float32)),
        sparse={
            "item_id": item_ids,
            "category": torch.from_numpy(primary_genre(genres)),
            "release_bucket": torch.from_numpy(release_bucket(years)),
        },
    )

    user_rows = _rows(t.user_ids, user_raw)
    features = {
        "age_bucket": age_bucket(t.ages),
        "gender": Vocabulary(GENDERS).encode(t.genders),
        "occupation": Vocabulary(OCCUPATIONS).encode([o.lower() for o in t.occupations]),
        "zip_region": zip_region(t.zip_codes),
    }
    user_sparse = {"user_id": torch.arange(1, num_users + 1, dtype=torch.long)}
    for name, values in features.items():
        column = np.zeros(num_users, dtype=np.int64)
        column[user_rows] = values
        user_sparse[name] = torch.from_numpy(column)

    return MovieLensData(
        schema=movielens_schema(num_users, num_items, history_length, user_buckets, item_buckets),
        train=_csr(pos_users[keep_train], pos_items[keep_train], num_users, num_items),
        train_times=pos_times[keep_train],
        eval=_csr(pos_users[held], pos_items[held], num_users, num_items),
        eval_times=pos_times[held],
        items=items_batch,
        item_ids=item_ids,
        user_sparse=user_sparse,
        user_raw_ids=user_raw,
        item_raw_ids=item_raw,
        item_titles=titles,
        genres=genres,
        split=split,
        holdout=holdout,
        ratings_read=len(kept),
        source=t.source,
        valid=valid,
        split_order=split_order,
    )


# --- batches -------------------------------------------------------------------------------------


def _user_batch(data: MovieLensData, users: np.ndarray, drop: np.ndarray | None) -> UserBatch:
    length = data.schema.history_length
    train = data.train
    positions, valid = last_items(train.indptr, train.items, users, length, drop)
    if train.nnz:
        rows = np.where(valid, train.items[positions], 0)
        times = data.train_times[positions]
        # Ages count back from the user's last train event, the target included: the same reference
        # for a positive and its negatives, and for every training row of one user.
        last = data.train_times[np.maximum(train.indptr[users + 1] - 1, 0)]
        age = np.where(valid, (last[:, None] - times) / SECONDS_PER_HOUR, 0.0)
    else:
        rows, age = np.zeros_like(positions), np.zeros(positions.shape)
    mask = torch.from_numpy(valid)
    rows_t = torch.from_numpy(rows)
    history = {name: torch.where(mask, data.items.sparse[name][rows_t], 0) for name in data.schema.history_attributes}
    picked = torch.from_numpy(users)
    return UserBatch(
        dense=torch.zeros(len(users), 0),
        sparse={name: values[picked].unsqueeze(1) for name, values in data.user_sparse.items()},
        history=history,
        history_age=torch.from_numpy(age.astype(np.float32)),
    )


def user_batch(data: MovieLensData, user_rows: Tensor | np.ndarray | Sequence[int]) -> UserBatch:
    """Users for evaluation: history = the newest `history_length` of their train positives."""
    return _user_batch(data, as_index_array(user_rows), drop=None)


def training_batches(
    data: MovieLensData, batch_size: int, negatives_per_positive: int, seed: int
) -> Iterator[TrainingBatch]:
    """One epoch of (positive + sampled negatives) batches in a seeded random order; as for Gowalla.

    Every train positive is used once. `batch_size` counts positives; row `p * (1 + k)` is positive
    p and the next k rows are its negatives. Negatives come from the Gowalla `sample_negatives`:
    uniform over the catalogue minus the user's train positives (rejection sampling, with
    replacement). Movies the user rated below the threshold can be drawn; held-out positives are
    not excluded, since the sampler never reads eval data. Labels are (rows, 1), task "click".

    History: the user's other train positives, the newest `history_length`, the positive itself left
    out. Its negatives share that history. It is not causal: later train positives can appear, as in
    the Gowalla loader. Same seed and batch size -> the same batches; pass seed + epoch per epoch.
    """
    return implicit_training_batches(
        data, lambda users, drop: _user_batch(data, users, drop), batch_size, negatives_per_positive, seed
    )
