"""The benchmark CLI end to end on a tiny config, and the index-builder helpers."""

import json

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
