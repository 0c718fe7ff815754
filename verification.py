"""The Siamese head scored as a same-person classifier on balanced pairs: ROC and PR curves, accuracy, F1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import ReIDModel
from utils import plot_xy


def verification_pairs(pids: np.ndarray, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different-person pairs (i, j, same) over images with a real identity, never i == j.

    Up to `num_pairs` // 2 of each kind, fewer when the split has fewer positive pairs; junk and distractors
    (pid ≤ 0) take no part, as they name no single person.
    """
    rng = np.random.default_rng(seed)
    people = np.flatnonzero(pids > 0)
    by_pid: dict[int, np.ndarray] = {}
    for pid in np.unique(pids[people]):
        by_pid[int(pid)] = people[pids[people] == pid]
    shared = [pid for pid, items in by_pid.items() if len(items) >= 2]
    if not shared or len(by_pid) < 2:
        raise ValueError("verification needs an identity with two images and two identities in the split")
    positives = sum(len(by_pid[p]) * (len(by_pid[p]) - 1) // 2 for p in shared)
    half = min(num_pairs // 2, positives)
    if half == 0:
        raise ValueError(f"{num_pairs} pairs asked for: at least 2 are needed, one of each kind")
    weights = np.array([len(by_pid[p]) * (len(by_pid[p]) - 1) for p in shared], dtype=float)
    chosen = rng.choice(len(shared), size=half, p=weights / weights.sum())
    pos = np.array([rng.choice(by_pid[shared[c]], size=2, replace=False) for c in chosen]).reshape(-1, 2)
    neg = np.empty((0, 2), dtype=int)
    while len(neg) < half:  # rejection: different identities only
        draw = rng.choice(people, size=(2 * (half - len(neg)) + 8, 2))
        neg = np.concatenate([neg, draw[pids[draw[:, 0]] != pids[draw[:, 1]]]])[:half]
    pairs = np.concatenate([pos, neg])
    return pairs[:, 0], pairs[:, 1], np.concatenate([np.ones(half, bool), np.zeros(half, bool)])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative, ties counting half (Mann-Whitney)."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_curve(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """True/false positive counts at each distinct score used as threshold (predict positive when ≥), high first."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order].astype(bool)
    last_of_level = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last_of_level]
    fp = np.cumsum(~labels)[last_of_level]
    return {"thresholds": scores[last_of_level], "tp": tp, "fp": fp}


def pr_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: Σ (R_k − R_{k−1}) · P_k over thresholds."""
    curve = threshold_curve(scores, labels)
    recall = curve["tp"] / max(int(labels.sum()), 1)
    precision = curve["tp"] / (curve["tp"] + curve["fp"])
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def verification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, F2 at a threshold, ROC and PR AUC, and the confusion matrix."""
    labels = labels.astype(bool)
    predicted = probs >= threshold
    tp, fp = int(np.sum(predicted & labels)), int(np.sum(predicted & ~labels))
    fn, tn = int(np.sum(~predicted & labels)), int(np.sum(~predicted & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0

    def f_beta(beta: float) -> float:
        den = beta**2 * precision + recall
        return (1 + beta**2) * precision * recall / den if den else 0.0

    return {"threshold": threshold, "pairs": len(labels), "accuracy": (tp + tn) / len(labels),
            "precision": precision, "recall": recall, "f1": f_beta(1.0), "f2": f_beta(2.0),
            "roc_auc": roc_auc(probs, labels), "pr_auc": pr_auc(probs, labels),
            "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}


@torch.no_grad()
def verification_report(model: ReIDModel, found: dict[str, np.ndarray], num_pairs: int, threshold: float,
                        out: Path, device: torch.device) -> dict:
    """Score the Siamese head on balanced pairs of the split's images; write roc.png and pr.png."""
    same_sets = np.array_equal(found["q_files"], found["g_files"])  # all-against-all splits
    feats = found["gf"] if same_sets else np.concatenate([found["qf"], found["gf"]])
    pids = found["g_pids"] if same_sets else np.concatenate([found["q_pids"], found["g_pids"]])
    idx_i, idx_j, labels = verification_pairs(pids, num_pairs)
    z = torch.from_numpy(feats).to(device)
    model.eval()
    logits = torch.cat([model.verify_embeddings(z[idx_i[s:s + 4096]], z[idx_j[s:s + 4096]]).float().cpu()
                        for s in range(0, len(idx_i), 4096)])
    probs = torch.sigmoid(logits).numpy()
    result = verification_metrics(probs, labels, threshold)
    curve = threshold_curve(probs, labels)
    tpr, fpr = curve["tp"] / labels.sum(), curve["fp"] / (~labels).sum()
    plot_xy(np.r_[0, fpr], np.r_[0, tpr], out / "roc.png", "Siamese head: ROC", "false positive rate",
            "true positive rate", f"AUC {result['roc_auc']:.3f}")
    plot_xy(np.r_[0, tpr], np.r_[1, curve["tp"] / (curve["tp"] + curve["fp"])], out / "pr.png",
            "Siamese head: precision-recall", "recall", "precision", f"AP {result['pr_auc']:.3f}")
    return result
