"""rerank.py: re-ranking from embeddings against the distance-matrix path, the Jaccard blend and average query
expansion on hand-worked cases, and --rerank/--aqe through eval.py and topk.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluation
import topk
from metrics import embedding_distance, evaluate_rank
from rerank import (
    SparseRows,
    average_query_expansion,
    jaccard_blend,
    re_ranking,
    re_ranking_features,
    work_chunks,
)


def clustered_features(seed: int, num_items: int = 300, num_query: int = 60, dim: int = 16):
    """Embeddings around 30 centres, split into query and gallery."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    feats = (centres[rng.integers(0, 30, num_items)] + 0.7 * rng.normal(size=(num_items, dim))).astype(np.float32)
    return feats[:num_query], feats[num_query:]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (7, 3, 0.1), (4, 1, 0.8), (3, 6, 0.0)])
def test_re_ranking_features_equals_re_ranking_on_embedding_distances(k1, k2, lambda_value, metric):
    qf, gf = clustered_features(k1 + k2)
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    matrices = (embedding_distance(a, b, metric).numpy() for a, b in ((q, g), (q, q), (g, g)))
    expected = re_ranking(*matrices, k1=k1, k2=k2, lambda_value=lambda_value)
    ours = re_ranking_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric, chunk_size=37)
    assert ours.shape == (60, 240)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_re_ranking_features_takes_tensors_and_a_device():
    qf, gf = clustered_features(3, num_items=120, num_query=20)
    from_arrays = re_ranking_features(qf, gf)
    from_tensors = re_ranking_features(torch.from_numpy(qf), torch.from_numpy(gf), device="cpu", chunk_size=16)
    np.testing.assert_allclose(from_tensors, from_arrays, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------------------


def test_work_chunks_stay_within_the_budget_and_give_a_heavy_row_its_own_chunk():
    assert work_chunks(np.array([3, 1, 4, 1, 5]), budget=5, max_rows=10) == [(0, 2), (2, 4), (4, 5)]
    assert work_chunks(np.array([10, 1, 1]), budget=5, max_rows=10) == [(0, 1), (1, 3)]
    assert work_chunks(np.array([1, 1, 1]), budget=100, max_rows=2) == [(0, 2), (2, 3)]


@pytest.mark.parametrize("budget", [1, 1 << 20])
def test_jaccard_blend_on_hand_made_encodings(budget: int):
    # Items 0, 1 are queries, 2, 3 gallery; rows of V: q0 {0: .5, 1: .5}, q1 {2: 1}, g0 {1: .25, 2: .75}, g1 {0: 1}.
    # Shared mass (sum of minima): q0-g0 .25, q0-g1 .5, q1-g0 .75, q1-g1 0; Jaccard = 1 - s / (2 - s).
    encoding = SparseRows(torch.tensor([0, 2, 3, 5, 6]), torch.tensor([0, 1, 2, 1, 2, 0]),
                          torch.tensor([0.5, 0.5, 1.0, 0.25, 0.75, 1.0]))
    query_dist = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    out = jaccard_blend(encoding, query_dist, lambda_value=0.5, budget=budget)
    expected = torch.tensor([[0.5 * 6 / 7 + 0.1, 0.5 * 2 / 3 + 0.2], [0.5 * 0.4 + 0.3, 0.5 * 1.0 + 0.4]])
    torch.testing.assert_close(out, expected)


def test_average_query_expansion_on_a_hand_made_case():
    # a = (1, 0) the query; gallery b = (1.2, 1.6) (unit direction (.6, .8)), c = (0, 1). Cosine similarities:
    # a·b .6, a·c 0, b·c .8. With k = 2 and α = 3 each embedding averages itself (weight 1) and its nearest:
    # a' = (a + .6³ b) / 2, b' = (b + .8³ c) / 2, c' = (c + .8³ b) / 2.
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.2, 1.6], [0.0, 1.0]], np.float32)
    q_out, g_out = average_query_expansion(qf, gf, k=2, alpha=3.0)
    np.testing.assert_allclose(q_out, [[0.6296, 0.1728]], atol=1e-6)
    np.testing.assert_allclose(g_out, [[0.6, 1.056], [0.3072, 0.9096]], atol=1e-6)


def test_average_query_expansion_gives_negative_similarities_no_weight():
    # d = (-2, 0) is opposite a (similarity -1): with all four averaged and α = 1,
    # a' = (1·a + .6·b + 0·c + 0·d) / 4 = (1.72, .96) / 4.
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.2, 1.6], [0.0, 1.0], [-2.0, 0.0]], np.float32)
    q_out, _ = average_query_expansion(qf, gf, k=4, alpha=1.0)
    np.testing.assert_allclose(q_out, [[0.43, 0.24]], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The command lines
# ---------------------------------------------------------------------------------------------------------


def test_eval_and_topk_rank_by_expanded_then_re_ranked_distances(tiny_run: Path, tmp_path: Path):
    flags = ["--result-dir", str(tiny_run), "--workers", "0", "--aqe", "--aqe-k", "3", "--aqe-alpha", "2", "--rerank",
             "--k1", "6", "--k2", "2"]
    report = evaluation.main([*flags, "--verify-pairs", "0", "--out", str(tmp_path / "eval")])
    shown = topk.main([*flags, "--queries", "random:2", "--out", str(tmp_path / "topk")])
    with np.load(tmp_path / "eval" / "features_test.npz") as cached:
        qf, gf = average_query_expansion(cached["qf"], cached["gf"], k=3, alpha=2.0)
        q, g = torch.from_numpy(qf), torch.from_numpy(gf)
        distances = re_ranking(*(embedding_distance(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))), k1=6, k2=2)
        expected = evaluate_rank(distances, cached["q_pids"], cached["g_pids"], cached["q_camids"],
                                 cached["g_camids"])
    stored = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert stored["mAP"] == report["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert stored["flags"]["aqe"] and stored["flags"]["aqe_k"] == 3 and stored["flags"]["aqe_alpha"] == 2.0
    assert shown["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
