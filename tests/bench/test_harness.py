"""The benchmark CLI end to end on a tiny config, and the index-builder helpers."""

import json

import pytest
import torch

from bench.__main__ import main
from bench.methods import residual_centroids, residual_kmeans


def test_quick_cli_writes_a_well_formed_report(tmp_path):
    torch.set_num_threads(1)
    main(
        [
            "--dataset",
            "planted",
            "--quick",
            "--items",
            "600",
            "--steps",
            "12",
            "--eval-users",
            "8",
            "--builders",
            "joint,kmeans,hierarchy",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "planted.json").read_text())
    assert report["dataset"] == "planted" and report["quick"] is True
    assert {"two_tower", "monn", "hsnn_joint", "hsnn_kmeans", "hsnn_hierarchy"} <= set(report["models"])
    methods = {p["method"] for p in report["points"]}
    assert {"two_tower_exact", "ebr_ivf", "ebr_hnsw", "deep_retrieval", "monn_brute_force", "hsnn_joint"} <= methods
    for point in report["points"]:
        for k in (10, 20, 50, 100, 200):
            assert 0.0 <= point[f"recall@{k}"] <= 1.0
            assert 0.0 <= point[f"recall@{k}_vs_truth"] <= 1.0
        # HNSW counts distance computations, which can exceed a tiny corpus; the rest score at most N
        assert 0 < point["items_scored"] <= (2 * 600 if point["method"] == "ebr_hnsw" else 600)
    brute = next(p for p in report["points"] if p["method"] == "monn_brute_force")
    assert brute["recall@100_vs_monn_exhaustive"] == 1.0  # the reference is its own answer
    assert report["models"]["two_tower"]["ne_vs_two_tower_percent"] == 0.0
    for name in ("hsnn_joint", "hsnn_kmeans", "hsnn_hierarchy"):  # one cluster NE per node level
        cluster_ne = report["models"][name]["cluster_ne"]
        assert len(cluster_ne) == 2 and all(0.0 < ne < 2.0 for ne in cluster_ne)
    assert "cluster_ne" not in report["models"]["monn"]
    assert (tmp_path / "planted.md").read_text().startswith("# Benchmark: planted")
    assert (tmp_path / "planted_recall_vs_cost.png").stat().st_size > 10_000


def test_residual_kmeans_and_centroids_agree_on_their_own_paths():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 6, generator=g) * 10  # well separated, so Lloyd's converges in a few steps
    vectors = centres[torch.arange(400) % 8] + 0.1 * torch.randn(400, 6, generator=g)
    paths, books = residual_kmeans(vectors, [8, 4])
    assert paths.shape == (400, 2) and int(paths[:, 0].max()) < 8 and int(paths[:, 1].max()) < 4
    refit = residual_centroids(vectors, paths, [8, 4])
    # centroids of the items holding each level-1 code are the k-means centroids (Lloyd's fixed point)
    used = torch.unique(paths[:, 0])
    torch.testing.assert_close(refit[0][used], books[0][used], atol=1e-4, rtol=1e-4)


def test_seed_aggregation_keeps_settings_that_follow_each_seeds_index_shape():
    """Shared settings are matched by name; a method whose settings differ per seed (a given hierarchy's
    beams) is matched by position, labelled with every seed's setting; a row one seed lacks is dropped."""
    from bench.report import aggregate_seeds

    def report(hierarchy_knobs, recalls, extra=False):
        points = [{"method": "ivf", "knob": "nprobe=1", "recall@100": recalls[0]}]
        points += [
            {"method": "hier", "knob": knob, "recall@100": r}
            for knob, r in zip(hierarchy_knobs, recalls[1:], strict=True)
        ]
        if extra:
            points.append({"method": "only_here", "knob": "x", "recall@100": 1.0})
        return {"points": points, "models": {}, "index_health": {}, "wall_seconds": 1.0}

    merged = aggregate_seeds(
        [
            report(["beams=[1, 2]", "beams=[2, 4]"], [0.1, 0.2, 0.4], extra=True),
            report(["beams=[1, 3]", "beams=[2, 4]"], [0.3, 0.4, 0.6]),
        ],
        [0, 1],
    )
    rows = {(p["method"], p["knob"]): p for p in merged["points"]}
    assert set(rows) == {
        ("ivf", "nprobe=1"),
        ("hier", "beams=[1, 2] / beams=[1, 3] (per seed)"),
        ("hier", "beams=[2, 4]"),
    }
    assert rows[("ivf", "nprobe=1")]["recall@100"] == pytest.approx(0.2)
    assert rows[("hier", "beams=[1, 2] / beams=[1, 3] (per seed)")]["recall@100"] == pytest.approx(0.3)
    assert rows[("hier", "beams=[2, 4]")]["recall@100"] == pytest.approx(0.5)
