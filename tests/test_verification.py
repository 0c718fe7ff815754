"""The Siamese head scored as a classifier: pair sampling and metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from verification import pr_auc, roc_auc, verification_metrics, verification_pairs

PROBS = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3, 0.2])
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0], dtype=bool)


def test_threshold_metrics_by_hand():
    result = verification_metrics(PROBS, LABELS, threshold=0.5)
    # Predicted same: the first five. TP 0.9 0.8 0.6, FP 0.7 0.55, FN 0.3, TN 0.4 0.2.
    assert result["confusion"] == {"tp": 3, "fp": 2, "fn": 1, "tn": 2}
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["precision"] == pytest.approx(3 / 5) and result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))  # 0.6667
    assert result["f2"] == pytest.approx(5 * 0.6 * 0.75 / (4 * 0.6 + 0.75))  # 0.7143


def test_areas_under_the_curves_by_hand():
    # Positive-over-negative pairs: 0.9 and 0.8 beat all 4 negatives, 0.6 beats 3, 0.3 beats 1: 12 of 16.
    assert roc_auc(PROBS, LABELS) == pytest.approx(12 / 16)
    # Descending: + + - + - - + -: precision at each positive 1, 1, 3/4, 4/7, each recall step 1/4.
    assert pr_auc(PROBS, LABELS) == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)


def test_tied_scores_count_half_and_share_a_threshold():
    scores, labels = np.array([0.5, 0.5, 0.1]), np.array([True, False, False])
    assert roc_auc(scores, labels) == pytest.approx((0.5 + 1) / 2)
    assert pr_auc(scores, labels) == pytest.approx(0.5)  # at 0.5: one of two predicted same is right


def test_pairs_are_balanced_never_self_and_labelled_by_identity():
    pids = np.array([1, 1, 1, 2, 2, 3, 0, 0, -1, 4])
    i, j, same = verification_pairs(pids, num_pairs=200, seed=3)
    assert np.all(i != j)
    assert same.sum() == (~same).sum() == 4  # only 3 + 1 positive pairs exist: ids 1 (3 pairs) and 2 (1 pair)
    np.testing.assert_array_equal(same, pids[i] == pids[j])
    assert np.all(pids[i] > 0) and np.all(pids[j] > 0)
    again = verification_pairs(pids, num_pairs=200, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((i, j, same), again, strict=True))


def test_pairs_need_a_repeated_identity():
    with pytest.raises(ValueError, match="verification needs an identity with two images"):
        verification_pairs(np.array([1, 2, 3]), num_pairs=10)


def test_fewer_than_two_pairs_are_an_error():
    with pytest.raises(ValueError, match="1 pairs asked for: at least 2 are needed"):
        verification_pairs(np.array([1, 1, 2, 2]), num_pairs=1)
