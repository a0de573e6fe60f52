"""MovieLens-100K loader: a tiny GroupLens-format fixture always; the real data via the recbole wheel when
pip can download it (skipped otherwise). The data themselves are never stored in the repository."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.datasets.movielens import (
    GENRES,
    load_movielens,
    read_recbole_wheel,
    recbole_wheel,
    training_batches,
    user_batch,
)

HOUR = 3600

# id, title, release date, genres
ITEMS = [
    (1, "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
    (2, "GoldenEye (1995)", "01-Jan-1995", ["Action", "Adventure", "Thriller"]),
    (3, "A Drama (1960)", "01-Jan-1960", ["Drama"]),
    (4, "unknown", "", ["unknown"]),
    (5, "A Noir (1947)", "01-Jan-1947", ["Film-Noir", "Thriller"]),
    (6, "A Future (1998)", "01-Jan-1998", ["Sci-Fi"]),
    *[(i, f"Film {i} (1993)", "01-Jan-1993", ["Comedy", "Romance"]) for i in range(7, 13)],
]
USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "94043"), (3, 15, "M", "student", "T8H1N"),
         (4, 60, "F", "writer", "02139")]  # fmt: skip
RATINGS = [
    # user 1: items 1..10 positive at hour k (file order shuffled); 11 and 12 rated low later.
    *[(1, k, 4 + k % 2, k * HOUR) for k in (3, 9, 1, 10, 2, 7, 4, 8, 6, 5)],
    (1, 11, 3, 11 * HOUR),
    (1, 12, 1, 12 * HOUR),
    # user 2: four positives, too few for a 20% hold-out.
    *[(2, k, 4, 100 * k) for k in (1, 2, 3, 4)],
    # user 3: no positive at all.
    (3, 1, 3, 50),
    (3, 2, 1, 60),
    # user 4: 8, 3, 5, then 6 and 7 tied at t=30; item 2 rated 5, then re-rated 2 (the newest rating wins).
    (4, 3, 5, 10),
    (4, 2, 5, 5),
    (4, 5, 5, 20),
    (4, 7, 4, 30),
    (4, 6, 5, 30),
    (4, 8, 4, 1),
    (4, 2, 2, 40),
]


def write_grouplens(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (root / "u.user").write_text("".join("|".join(map(str, row)) + "\n" for row in USERS))
    lines = []
    for item, title, date, genres in ITEMS:
        flags = ["1" if g in genres else "0" for g in GENRES]
        lines.append("|".join([str(item), title, date, "", "http://example.invalid/", *flags]))
    (root / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return root


def write_atomic(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in RATINGS]
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    user += ["\t".join(map(str, row)) for row in USERS]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    item += [f"{i}\t{title}\t{date[-4:] or 'unknown'}\t{' '.join(genres)}" for i, title, date, genres in ITEMS]
    for kind, lines in (("inter", inter), ("user", user), ("item", item)):
        (root / f"ml-100k.{kind}").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    return write_grouplens(tmp_path / "ml-100k")


def ids(array) -> list[int]:
    return [int(i) + 1 for i in array]  # catalogue rows -> MovieLens ids (1..12 here)


def test_movielens_fixture_parsing(fixture_dir: Path):
    data = load_movielens(fixture_dir)
    assert data.num_users == 4 and data.num_items == 12 and data.ratings_read == len(RATINGS) - 1
    assert data.item_ids.tolist() == list(range(1, 13)) and data.item_raw_ids.tolist() == list(range(1, 13))
    assert data.item_titles[0] == "Toy Story (1995)"
    # Primary genre = first flag set in u.genre order, as 1 + its index (unknown = 1, Action = 2, ...).
    categories = data.items.sparse["category"].tolist()
    assert categories[:7] == [4, 2, 9, 1, 11, 16, 6]
    assert data.items.sparse["release_bucket"].tolist()[:7] == [11, 11, 5, 0, 3, 14, 9]
    assert data.items.dense.shape == (12, 19) and data.items.dense[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert data.genres.sum() == data.items.dense.sum()
    assert data.user_sparse["user_id"].tolist() == [1, 2, 3, 4]
    assert data.user_sparse["age_bucket"].tolist() == [2, 6, 1, 7]
    assert data.user_sparse["gender"].tolist() == [2, 1, 2, 1]
    assert data.user_sparse["occupation"].tolist() == [20, 14, 19, 21]
    assert data.user_sparse["zip_region"].tolist() == [9, 10, 11, 1]
    for name, size in data.schema.user_sparse.items():
        assert int(data.user_sparse[name].max()) < size or name == "user_id"
    assert (data.items.sparse["item_id"] > 0).all() and (data.items.sparse["category"] > 0).all()


def test_movielens_threshold_and_time_split(fixture_dir: Path):
    data = load_movielens(fixture_dir)
    # user 1: 10 positives (ratings 4 and 5; 3 and 1 are not), newest 2 held out.
    assert ids(data.train[0]) == [1, 2, 3, 4, 5, 6, 7, 8] and ids(data.eval[0]) == [9, 10]
    assert data.train_times[: data.train.indptr[1]].tolist() == [k * HOUR for k in range(1, 9)]
    assert ids(data.train[1]) == [1, 2, 3, 4] and len(data.eval[1]) == 0  # floor(0.2 * 4) = 0: skipped in eval
    assert len(data.train[2]) == 0 and len(data.eval[2]) == 0  # user 3 rated nothing >= 4
    # user 4: item 2's newest rating is 2; items 6 and 7 tie at t=30 and the item row breaks the tie.
    assert ids(data.train[3]) == [8, 3, 5, 6] and ids(data.eval[3]) == [7]
    assert data.eval.users_with_items().tolist() == [0, 3]
    summary = data.summary()
    assert summary["eval_in_train"] == 0 and summary["train_interactions"] + summary["eval_interactions"] == 19
    for user in range(data.num_users):
        train_t = data.train_times[data.train.indptr[user] : data.train.indptr[user + 1]]
        eval_t = data.eval_times[data.eval.indptr[user] : data.eval.indptr[user + 1]]
        assert not set(data.train[user]) & set(data.eval[user])
        if len(train_t) and len(eval_t):
            assert train_t.max() <= eval_t.min()

    strict = load_movielens(fixture_dir, positive_rating=5)
    assert ids(strict.train[0]) + ids(strict.eval[0]) == [1, 3, 5, 7, 9]  # 4 + k % 2 == 5 for odd k
    loo = load_movielens(fixture_dir, split="last_one")
    assert ids(loo.eval[0]) == [10] and ids(loo.eval[1]) == [4] and ids(loo.eval[3]) == [7]
    assert ids(loo.train[1]) == [1, 2, 3] and loo.summary()["eval_in_train"] == 0
    with pytest.raises(ValueError, match="split must be"):
        load_movielens(fixture_dir, split="random")


def test_movielens_atomic_files_match_grouplens(fixture_dir: Path, tmp_path: Path):
    a = load_movielens(fixture_dir)
    b = load_movielens(write_atomic(tmp_path / "atomic"))
    assert a.summary() == b.summary()
    assert np.array_equal(a.train.items, b.train.items) and np.array_equal(a.eval.items, b.eval.items)
    assert np.array_equal(a.train_times, b.train_times)
    for name in a.items.sparse:
        assert torch.equal(a.items.sparse[name], b.items.sparse[name]), name
    for name in a.user_sparse:
        assert torch.equal(a.user_sparse[name], b.user_sparse[name]), name
    with pytest.raises(FileNotFoundError, match=r"neither u\.data"):
        load_movielens(tmp_path / "nothing-here")


def test_movielens_user_history_and_ages(fixture_dir: Path):
    data = load_movielens(fixture_dir, history_length=4)
    users = user_batch(data, [0, 2, 3])
    history = users.history
    assert history["item_id"].tolist() == [[5, 6, 7, 8], [0, 0, 0, 0], [8, 3, 5, 6]]
    assert history["category"][0].tolist() == [11, 16, 6, 6]
    assert history["release_bucket"][0].tolist() == [3, 14, 9, 9]
    # Ages in hours before the user's last train event (item 8 at hour 8; user 4's item 6 at t=30 s).
    assert users.history_age[0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert users.history_age[1].tolist() == [0.0] * 4
    assert torch.allclose(users.history_age[2], torch.tensor([29.0, 20.0, 10.0, 0.0]) / HOUR)
    assert users.sparse["user_id"].flatten().tolist() == [1, 3, 4] and users.sparse["occupation"].shape == (3, 1)


def test_movielens_training_epoch(fixture_dir: Path, one_hsnn_step):
    data = load_movielens(fixture_dir, history_length=3)
    k = 3
    batches = list(training_batches(data, batch_size=2, negatives_per_positive=k, seed=1))
    seen = []
    for batch in batches:
        labels = batch.labels.view(-1, 1 + k)
        assert labels[:, 0].eq(1).all() and labels[:, 1:].eq(0).all()
        assert (batch.item_keys > 0).all() and (batch.items.sparse["item_id"] > 0).all()
        assert (batch.users.sparse["user_id"] > 0).all()
        user_ids = batch.users.sparse["user_id"].view(-1, 1 + k)
        assert user_ids.eq(user_ids[:, :1]).all()
        history = batch.users.history["item_id"].view(-1, 1 + k, 3)
        ages = batch.users.history_age.view(-1, 1 + k, 3)
        assert history.eq(history[:, :1]).all() and ages.eq(ages[:, :1]).all()
        keys = batch.item_keys.view(-1, 1 + k)
        for user, row, hist in zip(user_ids[:, 0] - 1, keys - 1, history[:, 0], strict=True):
            train = data.train[int(user)].tolist()
            seen.append((int(user), int(row[0])))
            assert not set(row[1:].tolist()) & set(train)  # negatives are never the user's train positives
            others = [i for i in train if i != int(row[0])]
            assert [h - 1 for h in hist.tolist() if h] == others[-3:]
    assert sorted(seen) == sorted((u, int(i)) for u in range(4) for i in data.train[u])  # each positive once
    again = next(training_batches(data, batch_size=2, negatives_per_positive=k, seed=1))
    assert torch.equal(again.item_keys, batches[0].item_keys)
    assert np.isfinite(one_hsnn_step(data.schema, batches[0]))


def test_movielens_cache_must_be_outside_the_repo():
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(ValueError, match="inside the repository"):
        recbole_wheel(cache_dir=repo / "data-cache")


@pytest.fixture(scope="module")
def movielens_real():
    try:
        wheel = recbole_wheel()
    except RuntimeError as error:  # no network, no pip index: nothing to test against
        pytest.skip(f"recbole wheel not available: {error}")
    return read_recbole_wheel(wheel)


def test_movielens_real_via_recbole_wheel(movielens_real, one_hsnn_step):
    tables = movielens_real
    assert len(tables.ratings) == 100_000 and set(np.unique(tables.ratings).tolist()) == {1, 2, 3, 4, 5}
    data = load_movielens(tables=tables)
    summary = data.summary()
    assert summary["users"] == 943 and summary["items"] == 1682 and summary["ratings"] == 100_000
    assert summary["train_interactions"] + summary["eval_interactions"] == int((tables.ratings >= 4).sum())
    assert summary["eval_in_train"] == 0 and summary["eval_users"] > 900
    assert data.item_ids.tolist() == data.item_raw_ids.tolist() == list(range(1, 1683))
    assert int((data.items.sparse["category"] == 0).sum()) == 0 and data.genres.any(axis=1).all()
    last_train = np.full(data.num_users, -1)
    np.maximum.at(last_train, data.train.owners(), data.train_times)
    assert (data.eval_times >= last_train[data.eval.owners()]).all()
    batch = next(islice(training_batches(data, batch_size=64, negatives_per_positive=4, seed=0), 1))
    assert len(batch) == 320 and (batch.item_keys > 0).all()
    assert np.isfinite(one_hsnn_step(data.schema, batch))
    loo = load_movielens(split="last_one", tables=tables)
    assert loo.summary()["eval_interactions"] == loo.summary()["eval_users"]
