"""Real-data loaders: each on the shared files when present (skipped otherwise) and on tiny fixtures."""

from __future__ import annotations

import csv
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.datasets._common import bucket_count, last_items
from bench.datasets.gowalla import load_gowalla, sample_negatives, to_interactions, training_batches, user_batch
from bench.datasets.kuairand import (
    kuairand_batches,
    load_kuairand_features,
    load_kuairand_logs,
    split_by_time,
)
from bench.datasets.open_bandit import impression_batch, load_open_bandit, open_bandit_batches
from hsnn.features import hash_ids
from hsnn.monn import HashedEmbeddingBags

DATASETS = Path(
    os.environ.get("HSNN_DATASETS_DIR") or Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
)


def shared(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"shared data set {name} not found under {DATASETS} (set HSNN_DATASETS_DIR)")
    return path


def naive_last_items(lists: list[list[int]], owners, length: int, drop=None) -> list[list[int]]:
    out = []
    for row, owner in enumerate(owners):
        items = list(lists[owner])
        if drop is not None:
            del items[drop[row]]
        out.append(items[-length:])
    return out


# ---------------------------------------------------------------- shared helpers


def test_last_items_matches_a_python_reference():
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(0, 100, size=n)) for n in rng.integers(0, 12, size=40)]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists])
    owners = np.array([u for u in range(len(lists)) for _ in range(3)], dtype=np.int64)
    for length in (1, 4, 11, 15):
        pos, valid = last_items(indptr, values, owners, length)
        got = [list(values[p[v]]) for p, v in zip(pos, valid, strict=True)]
        assert got == naive_last_items(lists, owners, length)
        has = owners[[len(lists[o]) > 0 for o in owners]]
        drop = np.array([rng.integers(len(lists[o])) for o in has])
        pos, valid = last_items(indptr, values, has, length, drop)
        got = [list(values[p[v]]) for p, v in zip(pos, valid, strict=True)]
        assert got == naive_last_items(lists, has, length, drop)


def test_small_vocabularies_get_collision_free_tables():
    for size in (1, 2, 3, 9, 50, 128):
        buckets = bucket_count(size, ["tag", "history_tag"])
        for name in ("tag", "history_tag"):
            salt = HashedEmbeddingBags({name: 2}, 1).salts[name]
            assert len(torch.unique(hash_ids(torch.arange(1, size + 1), buckets, salt))) == size


# ---------------------------------------------------------------- Gowalla


def write_lines(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def gowalla_fixture(tmp_path: Path) -> Path:
    # user 2: one item; user 3: a line with only its id; blank lines, \r\n and trailing spaces;
    # user 0 repeats item 1 (kept once, at its last position); lines out of user order.
    write_lines(tmp_path / "train.txt", "0 1 2 1 3 4  \r\n\n2 5\n1 0 2 6\n\n3\n")
    write_lines(tmp_path / "valid.txt", "0 5\n1 3\n2 0\n")
    write_lines(tmp_path / "test.txt", "0 6 7\n1 7\n3 1\n")
    return tmp_path


def test_gowalla_fixture_parsing(gowalla_fixture: Path):
    data = load_gowalla(gowalla_fixture, history_length=3)
    assert data.num_users == 4 and data.num_items == 7  # test.txt (item 7) is not read without test_path
    assert list(data.train[0]) == [2, 1, 3, 4]
    assert list(data.train[2]) == [5] and list(data.train[3]) == []
    assert list(data.eval[0]) == [5] and list(data.eval[2]) == [0]
    assert data.eval_file.name == "valid.txt" and [p.name for p in data.train_files] == ["train.txt"]
    assert data.item_ids.tolist() == list(range(1, 8))
    users = user_batch(data, [0, 2, 3])
    assert users.history["item_id"].tolist() == [[2, 4, 5], [6, 0, 0], [0, 0, 0]]  # newest 3, ids + 1
    assert users.sparse["user_id"].flatten().tolist() == [1, 3, 4]


def test_gowalla_test_file_by_path(gowalla_fixture: Path, tmp_path: Path):
    test_file = write_lines(tmp_path / "elsewhere.txt", (gowalla_fixture / "test.txt").read_text())
    data = load_gowalla(gowalla_fixture, test_path=test_file)
    assert data.num_items == 8 and data.eval_file == test_file
    assert [p.name for p in data.train_files] == ["train.txt", "valid.txt"]
    assert list(data.train[0]) == [2, 1, 3, 4, 5]  # train + valid, as in the published protocol
    assert list(data.eval[0]) == [6, 7] and list(data.eval[3]) == [1]
    only_train = load_gowalla(gowalla_fixture, test_path=test_file, train_with_valid=False)
    assert list(only_train.train[0]) == [2, 1, 3, 4]
    with pytest.raises(ValueError, match="both a training and the evaluation"):
        load_gowalla(gowalla_fixture, train_with_valid=True)


def test_gowalla_rejects_bad_tokens(tmp_path: Path):
    write_lines(tmp_path / "train.txt", "0 1 2\n1 x 3\n")
    write_lines(tmp_path / "valid.txt", "0 3\n")
    with pytest.raises(ValueError, match=r"train.txt:2: .*'x'"):
        load_gowalla(tmp_path)


def test_gowalla_fixture_epoch(gowalla_fixture: Path):
    data = load_gowalla(gowalla_fixture, history_length=2)
    batches = list(training_batches(data, batch_size=3, negatives_per_positive=2, seed=5))
    seen = []
    for batch in batches:
        labels = batch.labels.view(-1, 3)
        assert labels[:, 0].eq(1).all() and labels[:, 1:].eq(0).all()
        users = batch.users.sparse["user_id"].view(-1, 3)
        assert users.eq(users[:, :1]).all()
        history = batch.users.history["item_id"].view(-1, 3, 2)
        assert history.eq(history[:, :1]).all()  # a positive and its negatives share one history
        for user, item, hist in zip(users[:, 0] - 1, batch.item_keys.view(-1, 3)[:, 0] - 1, history[:, 0], strict=True):
            seen.append((int(user), int(item)))
            others = [i for i in data.train[int(user)] if i != int(item)]
            assert [h - 1 for h in hist.tolist() if h] == others[-2:]
    assert sorted(seen) == sorted((u, int(i)) for u in range(4) for i in data.train[u])  # each positive once
    single = [b for b in batches if (b.users.sparse["user_id"] == 3).any()]  # user 2 (id 3) has one item
    assert all(b.users.history["item_id"][b.users.sparse["user_id"][:, 0] == 3].eq(0).all() for b in single)


def test_gowalla_negatives_avoid_train_positives(gowalla_fixture: Path):
    data = load_gowalla(gowalla_fixture)
    negatives = sample_negatives(data.train, np.zeros(500, dtype=np.int64), 3, np.random.default_rng(0))
    assert set(np.unique(negatives).tolist()) == {0, 5, 6}  # all but user 0's train items 1-4
    everything = to_interactions(np.array([0, 0]), np.array([0, 1]), num_users=1, num_items=2)
    with pytest.raises(ValueError, match="every catalogue item"):
        sample_negatives(everything, np.array([0]), 1, np.random.default_rng(0))


@pytest.fixture(scope="module")
def gowalla_real():
    return load_gowalla(shared("gowalla-ngcf"))


def test_gowalla_real_counts(gowalla_real):
    data = gowalla_real
    assert data.summary() == {
        "users": 29_858,
        "items": 40_981,
        "train_interactions": 719_081,
        "eval_interactions": 91_047,
        "eval_users": 29_858,
        "eval_in_train": 0,
    }
    assert data.train.counts().min() >= 1
    assert data.items.sparse["item_id"].min() == 1 and data.items.sparse["item_id"].max() == data.num_items
    assert data.items.dense.shape == (data.num_items, 0)
    assert data.item_org_ids is not None and (data.item_org_ids >= 0).all()


def test_gowalla_real_batches_do_not_leak(gowalla_real):
    data, k, length = gowalla_real, 4, gowalla_real.schema.history_length
    for batch in islice(training_batches(data, batch_size=512, negatives_per_positive=k, seed=0), 3):
        assert len(batch) == 512 * (1 + k) and batch.labels.shape == (len(batch), 1)
        users = batch.users.sparse["user_id"][:, 0].numpy() - 1
        items = batch.item_keys.numpy() - 1
        assert (batch.item_keys > 0).all() and (batch.items.sparse["item_id"] == batch.item_keys).all()
        history = batch.users.history["item_id"]
        target = batch.item_keys.view(-1, 1 + k)[:, :1].repeat_interleave(1 + k, 0)
        assert not (history == target).any()  # the positive is never in its own rows' history
        assert not (history == batch.item_keys.unsqueeze(1)).any()
        negative = batch.labels[:, 0].numpy() == 0
        assert not data.train.contains(users[negative], items[negative]).any()
        assert data.train.contains(users[~negative], items[~negative]).all()
        sizes = (history > 0).sum(1).numpy()
        assert (sizes == np.minimum(data.train.counts()[users] - 1, length)).all()
        hist_users = np.repeat(users, length)
        hist_items = history.flatten().numpy() - 1
        assert data.train.contains(hist_users[hist_items >= 0], hist_items[hist_items >= 0]).all()


def test_gowalla_real_batches_are_seeded(gowalla_real):
    def first(seed: int):
        return next(training_batches(gowalla_real, batch_size=256, negatives_per_positive=2, seed=seed))

    a, b, c = first(3), first(3), first(4)
    assert torch.equal(a.item_keys, b.item_keys) and torch.equal(a.users.history["item_id"], b.users.history["item_id"])
    assert not torch.equal(a.item_keys, c.item_keys)


def test_gowalla_real_eval_users_and_model(gowalla_real, one_hsnn_step):
    data = gowalla_real
    users = user_batch(data, torch.arange(5))
    for row in range(5):
        expected = [i + 1 for i in data.train[row][-data.schema.history_length :]]
        assert [h for h in users.history["item_id"][row].tolist() if h] == expected
    # small id tables keep the model step cheap; the batches are the same whatever the table size
    grouped = load_gowalla(shared("gowalla-ngcf"), item_groups=32, user_buckets=1024, item_buckets=4096)
    assert set(grouped.items.sparse["item_group"].unique().tolist()) <= set(range(1, 33))
    assert grouped.schema.interaction_attributes == ["item_group"]
    batch = next(training_batches(grouped, batch_size=32, negatives_per_positive=3, seed=0))
    assert np.isfinite(one_hsnn_step(grouped.schema, batch))


# ---------------------------------------------------------------- KuaiRand


@pytest.fixture(scope="module")
def kuairand_real():
    return load_kuairand_features(shared("kuairand-pure-features"))


def test_kuairand_real_feature_tables(kuairand_real):
    users, videos = kuairand_real.users, kuairand_real.videos
    assert len(users) == 27_285 and len(videos) == 7_583
    assert users.dense.shape == (27_286, 4) and videos.dense.shape[0] == 7_584  # + the unknown row
    assert torch.isfinite(users.dense).all() and torch.isfinite(videos.dense).all()
    assert users.dense[:-1].mean(0).abs().max() < 1e-4 and users.dense[-1].eq(0).all()
    assert "is_lowactive_period" in users.dropped and "visible_status" in videos.dropped  # constant columns
    for table in (users, videos):
        for name, ids in table.sparse.items():
            assert ids[-1] == 0 and (ids[:-1] >= 0).all()
            if name == table.id_column:
                assert (ids[:-1] > 0).all()
            else:
                assert ids.max() == len(table.vocabularies[name])
    # missing cells -> id 0: 96 videos have no tag, 203 no music_type, 714 users no onehot_feat12
    assert int((videos.sparse["tag"][:-1] == 0).sum()) == 96
    assert int((videos.sparse["music_type"][:-1] == 0).sum()) == 203
    assert int((users.sparse["onehot_feat12"][:-1] == 0).sum()) == 714
    assert int(videos.dense[:-1, videos.dense_names.index("video_duration_missing")].sum()) == 239
    items, raw = kuairand_real.catalogue()
    assert len(items) == 7_583 and (items.sparse["video_id"] == torch.from_numpy(raw + 1)).all()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
    return path


LOG_HEADER = [
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
    "long_view",
    "play_time_ms",
    "duration_ms",
    "profile_stay_time",
    "comment_stay_time",
    "is_profile_enter",
    "is_rand",
    "tab",
]


@pytest.fixture
def kuairand_fixture(tmp_path: Path) -> Path:
    write_csv(
        tmp_path / "user_features_pure.csv",
        ["user_id", "user_active_degree", "follow_user_num", "onehot_feat4"],
        [[0, "full_active", 10, "1.0"], [1, "high_active", 0, ""], [2, "full_active", 500, "2"]],
    )
    write_csv(
        tmp_path / "video_features_basic_pure.csv",
        ["video_id", "author_id", "video_duration", "tag"],
        [[10, 777, 1000.0, "3,7"], [11, 777, "", ""], [12, 888, 5000.0, "7"]],
    )
    h = 3_600_000
    rows = [  # user, video, time, click
        [0, 10, 5 * h, 1],
        [0, 11, 1 * h, 1],
        [0, 12, 5 * h, 0],  # same millisecond as a click: that click is not its history
        [0, 99, 7 * h, 0],  # video 99 has no features
        [1, 12, 2 * h, 0],
        [5, 10, 3 * h, 1],  # user 5 has no features
    ]
    full = [[u, v, 20220408, 1000, t, c, 0, 0, 0, 0, 0, c, 100, 9000, 0, 0, 0, 0, 1] for u, v, t, c in rows]
    write_csv(tmp_path / "log_a.csv", LOG_HEADER, [*full[:4], [], [0, 11, 20220408, 1000, "", 1, *[0] * 13]])
    # second file: only the required columns, in another order
    write_csv(tmp_path / "log_b.csv", ["is_click", "time_ms", "video_id", "user_id"], [r[::-1] for r in rows[4:]])
    return tmp_path


def test_kuairand_logs_fixture(kuairand_fixture: Path, one_hsnn_step):
    logs = load_kuairand_logs(kuairand_fixture, ["log_a.csv", kuairand_fixture / "log_b.csv"], history_length=4)
    assert len(logs) == 6 and logs.skipped_rows == 1  # the row without time_ms
    assert (np.diff(logs.time_ms) >= 0).all()
    assert logs.user_ids.tolist() == [0, 1, 5, 0, 0, 0] and logs.video_ids.tolist() == [11, 12, 10, 10, 12, 99]
    assert logs.source.tolist() == [0, 1, 1, 0, 0, 0]
    assert logs.schema.tasks == ["click"] and logs.labels[:, 0].tolist() == [1, 0, 1, 1, 0, 0]
    batch = next(kuairand_batches(logs, batch_size=6))
    history = batch.users.history["video_id"]
    assert history.tolist() == [[0] * 4, [0] * 4, [0] * 4, [12, 0, 0, 0], [12, 0, 0, 0], [12, 11, 0, 0]]
    torch.testing.assert_close(batch.users.history_age[5, :2], torch.tensor([6.0, 2.0]))
    assert batch.users.history["author_id"][5, :2].tolist() == [1, 1]  # both videos by author 777 -> id 1
    assert batch.users.history["tag"][5, :2].tolist() == [0, 1]  # video 11 has no tag; "3,7" keeps 3
    unknown_video = batch.items.sparse
    assert unknown_video["video_id"][5] == 100 and unknown_video["author_id"][5] == 0
    assert batch.items.dense[5].eq(0).all() and batch.users.dense[2].eq(0).all()  # user 5 unknown
    assert batch.users.sparse["user_id"][:, 0].tolist() == [1, 2, 6, 1, 1, 1]
    assert batch.users.sparse["onehot_feat4"][:, 0].tolist()[:2] == [1, 0]  # "1.0" == "1"; "" -> 0
    before, after = split_by_time(logs, 4 * 3_600_000)
    assert before.tolist() == [0, 1, 2] and after.tolist() == [3, 4, 5]
    assert logs.base_rate(after).tolist() == [pytest.approx(1 / 3)]
    assert np.isfinite(one_hsnn_step(logs.schema, batch))

    two = load_kuairand_logs(kuairand_fixture, ["log_a.csv"], label_columns=["is_click", "long_view"])
    assert two.schema.tasks == ["click", "long_view"] and two.labels.shape == (4, 2)
    with pytest.raises(ValueError, match="missing columns"):
        load_kuairand_logs(kuairand_fixture, ["log_b.csv"], label_columns=["is_click", "long_view"])


def test_kuairand_logs_with_real_features(kuairand_real, tmp_path: Path, one_hsnn_step):
    rows = [
        [u, v, 20220408, 1000, 1_649_400_000_000 + i, i % 2] + [0] * 13
        for i, (u, v) in enumerate([(0, 0), (0, 1), (27_284, 7_582), (0, 2)])
    ]
    write_csv(tmp_path / "log.csv", LOG_HEADER, rows)
    logs = load_kuairand_logs(tmp_path, ["log.csv"], features=kuairand_real)
    batch = next(kuairand_batches(logs, 4, shuffle=True, seed=1))
    assert set(batch.item_keys.tolist()) == {1, 2, 3, 7_583}
    assert (batch.users.sparse["user_active_degree"] > 0).all()
    assert np.isfinite(one_hsnn_step(logs.schema, batch))


# ---------------------------------------------------------------- Open Bandit


@pytest.fixture(scope="module")
def obd_real():
    return load_open_bandit(shared("open-bandit-obd"))


def test_open_bandit_real(obd_real, one_hsnn_step):
    data = obd_real
    assert len(data) == 20_000 and data.base_ctr() == pytest.approx(80 / 20_000)
    assert data.base_ctr_by_file() == {("random", "all"): pytest.approx(0.0038), ("bts", "all"): pytest.approx(0.0042)}
    assert (np.diff(data.timestamp) >= 0).all()
    assert data.item_keys.min() >= 1 and data.item_keys.max() <= 80 and len(data.catalogue) == 80
    assert set(data.labels.flatten().tolist()) == {0.0, 1.0}
    assert ((data.propensity > 0) & (data.propensity <= 1)).all()
    for name, ids in data.users.sparse.items():
        assert (ids > 0).all(), name
    assert set(data.users.sparse["position"].flatten().tolist()) == {1, 2, 3}
    # history = items with past clicks (affinity > 0), nothing else
    has_affinity = data.users.dense > 0
    history = data.users.history["item_id"]
    for row in np.flatnonzero((history > 0).any(1).numpy())[:50]:
        clicked_before = set(torch.nonzero(has_affinity[row]).flatten().tolist())
        assert set((history[row][history[row] > 0] - 1).tolist()) <= clicked_before
    batches = list(open_bandit_batches(data, 4096))
    assert sum(len(b) for b in batches) == 20_000
    assert np.isfinite(one_hsnn_step(data.schema, impression_batch(data, np.arange(256))))


def test_open_bandit_all_campaigns(obd_real):
    data = load_open_bandit(shared("open-bandit-obd"), campaigns=("all", "men", "women"))
    assert len(data) == 60_000 and len(data.catalogue) == 160
    assert data.base_ctr() == pytest.approx((38 + 42 + 46 + 69 + 46 + 46) / 60_000)
    assert data.catalogue_keys[80] == ("men", 0)
    men = data.items.sparse["item_id"][torch.from_numpy(data.source == data.files.index(("bts", "men")))]
    assert men.min() >= 81 and men.max() <= 114  # campaigns keep their own item rows
