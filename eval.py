"""Evaluate a trained model on a prepared split: mAP, mINP and CMC by the Market-1501 protocol.

python eval.py --all-dir runs/demo                 # the standard test split, results in runs/demo/eval/
python eval.py --all-dir runs/demo --split val --flip --rerank

The metric functions (`evaluate_rank`, `re_ranking`, `pairwise_distance`) take arrays and are what train.py's
validation and topk.py call too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import JUNK_PID, SPLITS, build_transforms, eval_loader, load_eval_records, manifest_path
from model import ReIDModel, load_part_state, read_state_dict
from utils import (
    LOG,
    PART_FILES,
    UserError,
    atomic_write_bytes,
    normalise_flag_spelling,
    part_file,
    read_json,
    resolve_device,
    run_script,
    save_figure,
    setup_logging,
    sha256_file,
    versions,
    write_json,
)

# ---------------------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------------------

AP_MODES = ("standard", "devkit")


def check_rank_inputs(distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids) -> None:
    """Shapes that agree and a non-empty query and gallery, or a ValueError saying what is wrong."""
    if distmat.ndim != 2:
        raise ValueError(f"distance matrix must be 2-D (query × gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty {'query' if num_q == 0 else 'gallery'}: distance matrix is {num_q} × {num_g}")
    for name, array, size in (("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q), ("g_pids", g_pids, num_g),
                              ("g_camids", g_camids, num_g)):
        if len(array) != size:
            raise ValueError(f"{name} has {len(array)} entries but the distance matrix is {num_q} × {num_g}")


def positions_in_rows(rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """For entries grouped by row, each one's position within its row, and the count a row."""
    counts = np.bincount(rows, minlength=num_rows)
    return np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts), counts


def padded(rows: np.ndarray, pos: np.ndarray, values: np.ndarray, num_rows: int, width: int, fill) -> np.ndarray:
    """Row-grouped entries laid out as a (rows × width) array, the gaps filled."""
    out = np.full((num_rows, max(width, 1)), fill, dtype=values.dtype)
    out[rows, pos] = values
    return out


def chunk_match_ranks(dist: np.ndarray, match: np.ndarray, removed: np.ndarray,
                      junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1-based rank of every true match among the kept gallery items, as (row, rank) grouped by row.

    Items are ordered by distance, ties by gallery index (a stable sort). Only each row's sorted distances and
    a binary search per true match are needed. The items the protocol drops are subtracted exactly: `removed`
    (same identity and camera, a few a row) and the `junk` gallery columns (the same for every row).
    """
    num_rows = dist.shape[0]
    rows, cols = np.nonzero(match)
    values = dist[rows, cols]
    order = np.lexsort((cols, values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    pos, counts = positions_in_rows(rows, num_rows)
    sorted_rows = np.sort(dist, axis=1)
    junk_dist = dist[:, junk]
    sorted_junk = np.sort(junk_dist, axis=1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    before = np.empty(len(rows), dtype=np.int64)
    for row in np.flatnonzero(counts):  # a binary search for each of the row's few true matches
        span = slice(bounds[row], bounds[row + 1])
        left = np.searchsorted(sorted_rows[row], values[span], side="left")
        right = np.searchsorted(sorted_rows[row], values[span], side="right")
        junk_left = np.searchsorted(sorted_junk[row], values[span], side="left")
        junk_right = np.searchsorted(sorted_junk[row], values[span], side="right")
        before[span] = left - junk_left
        for k in np.flatnonzero((right - left > 1) | (junk_right > junk_left)):
            # equal distances: of the kept items, only lower gallery indices go first
            at = bounds[row] + k
            tied = np.count_nonzero(dist[row, : cols[at]] == values[at])
            tied_junk = np.count_nonzero((junk_dist[row] == values[at]) & (junk < cols[at]))
            before[at] += tied - tied_junk
    gone_rows, gone_cols = np.nonzero(removed)
    if gone_rows.size:
        gone_pos, gone_counts = positions_in_rows(gone_rows, num_rows)
        width = int(gone_counts.max())
        gone_values = padded(gone_rows, gone_pos, dist[gone_rows, gone_cols], num_rows, width, np.inf)[rows]
        gone_index = padded(gone_rows, gone_pos, gone_cols, num_rows, width, dist.shape[1])[rows]
        first = (gone_values < values[:, None]) | ((gone_values == values[:, None]) & (gone_index < cols[:, None]))
        before = before - first.sum(axis=1)
    return rows, before + 1


def per_query_metrics(rows: np.ndarray, ranks: np.ndarray, num_rows: int,
                      ap_mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, INP and first-match rank of each query (NaN without a true match) from its matches' sorted ranks.

    AP is non-interpolated (`standard`) or the Market-1501 devkit's trapezoid rule (`devkit`).
    """
    pos, counts = positions_in_rows(rows, num_rows)
    precision = (pos + 1.0) / ranks
    if ap_mode == "devkit":
        old_precision = np.where(ranks > 1, pos / np.maximum(ranks - 1, 1), 1.0)
        precision = (old_precision + precision) / 2
    found = counts > 0
    ap, inp, first = np.full(num_rows, np.nan), np.full(num_rows, np.nan), np.full(num_rows, np.nan)
    ap[found] = np.bincount(rows, precision, minlength=num_rows)[found] / counts[found]
    is_last = pos == counts[rows] - 1
    inp[rows[is_last]] = counts[rows[is_last]] / ranks[is_last]
    first[rows[pos == 0]] = ranks[pos == 0]
    return ap, inp, first


def protocol_masks(q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
                   g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Market-1501 protocol for queries × gallery: true matches, the same-identity-same-camera items it
    removes, and the junk gallery items (pid -1) it removes for every query."""
    junk = g_pids == JUNK_PID
    same_pid = (g_pids[None, :] == q_pids[:, None]) & ~junk
    same_cam = g_camids[None, :] == q_camids[:, None]
    return same_pid & ~same_cam, same_pid & same_cam, junk


def evaluate_rank(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                  g_camids: np.ndarray, max_rank: int = 50, ap_mode: str = "standard", chunk_size: int = 256,
                  threads: int | None = None) -> dict:
    """mAP, mINP and CMC@1..max_rank by the Market-1501 protocol, plus per-query AP (NaN where skipped).

    Per query, gallery items of the same identity and camera are removed and junk (pid -1) never counts;
    distractors stay as negatives; a query with no true match left is skipped and counted. Smaller is closer.
    """
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode {ap_mode!r}: expected one of {', '.join(AP_MODES)}")
    check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))

    def chunk_metrics(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dist = np.asarray(distmat[start:start + chunk_size])
        match, removed, junk = protocol_masks(q_pids[start:start + chunk_size], q_camids[start:start + chunk_size],
                                              g_pids, g_camids)
        match_rows, ranks = chunk_match_ranks(dist, match, removed, np.flatnonzero(junk))
        return per_query_metrics(match_rows, ranks, len(dist), ap_mode)

    # numpy's sort releases the GIL, so threads share the work across cores.
    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(chunk_metrics, range(0, len(q_pids), chunk_size)))
    ap, inp, first = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    valid = int(np.count_nonzero(~np.isnan(ap)))
    if valid == 0:
        raise ValueError(f"no query has a true match left in the gallery ({len(q_pids)} queries): every match is "
                         "junk or seen by the query's own camera, which the protocol removes")
    hit = first[~np.isnan(first)].astype(int)
    cmc = np.cumsum(np.bincount(hit[hit <= max_rank] - 1, minlength=max_rank))[:max_rank] / valid
    return {"mAP": float(np.nanmean(ap)), "mINP": float(np.nanmean(inp)), "cmc": cmc,
            "num_valid_queries": valid, "num_skipped_queries": len(q_pids) - valid, "ap": ap}


# ---------------------------------------------------------------------------------------------------------
# Distances and k-reciprocal re-ranking
# ---------------------------------------------------------------------------------------------------------


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean",
                      chunk_size: int = 4096) -> torch.Tensor:
    """Squared Euclidean or cosine (1 − cos) distances between two sets of features, in row chunks."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric {metric!r}: expected euclidean or cosine")
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    out = torch.empty(qf.shape[0], gf.shape[0])
    g_norms = gf.pow(2).sum(1)
    for start in range(0, qf.shape[0], chunk_size):
        q = qf[start:start + chunk_size]
        if metric == "cosine":
            out[start:start + chunk_size] = 1 - q @ gf.T
        else:
            block = torch.addmm(q.pow(2).sum(1, keepdim=True) + g_norms[None, :], q, gf.T, alpha=-2)
            out[start:start + chunk_size] = block.clamp_(min=0)
    return out


def embedding_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Retrieval distances between embeddings: L2-normalised first, then squared Euclidean or cosine."""
    normalize = torch.nn.functional.normalize
    return pairwise_distance(normalize(qf.float(), dim=1), normalize(gf.float(), dim=1), metric)


def reciprocal_mask(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """For every item i and each of its k+1 nearest neighbours n, whether i is among n's k+1 nearest too."""
    forward = ranks[:, : k + 1]
    backward = ranks[forward, : k + 1]
    return (backward == torch.arange(len(ranks))[:, None, None]).any(-1)


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, chunk_size: int = 512) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): query × gallery distances, computed in torch by chunks.

    The original's steps: squared, column-normalised distances; k-reciprocal neighbour sets expanded by their
    half-size sets; Gaussian-weighted encodings V with local query expansion over k2 neighbours; Jaccard
    distance over the sparse encodings; a blend with the original distance by λ.
    """
    num_q = q_g_dist.shape[0]
    top = torch.cat([torch.from_numpy(np.asarray(q_q_dist, np.float32)),
                     torch.from_numpy(np.asarray(q_g_dist, np.float32))], 1)
    bottom = torch.cat([torch.from_numpy(np.asarray(q_g_dist, np.float32)).T,
                        torch.from_numpy(np.asarray(g_g_dist, np.float32))], 1)
    dist = torch.cat([top, bottom], 0)
    del top, bottom
    dist.pow_(2)
    dist = (dist / dist.max(dim=0).values[None, :]).T.contiguous()
    n = dist.shape[0]
    half = int(np.around(k1 / 2.0))
    depth = max(k1 + 1, k2)
    ranks = torch.cat([torch.sort(dist[s:s + chunk_size], dim=1, stable=True).indices[:, :depth]
                       for s in range(0, n, chunk_size)])
    recip = reciprocal_mask(ranks, k1)
    recip_half = reciprocal_mask(ranks, half)
    encoding = torch.zeros(n, n)
    for s in range(0, n, chunk_size):
        rows = torch.arange(s, min(s + chunk_size, n))
        forward, mask = ranks[rows, : k1 + 1], recip[rows]
        candidates = forward  # each candidate's half-size reciprocal set, kept when it mostly agrees with i's set
        cand_sets, cand_masks = ranks[candidates, : half + 1], recip_half[candidates]
        inside = ((cand_sets[..., None] == forward[:, None, None, :]) & mask[:, None, None, :]).any(-1)
        agree = (inside & cand_masks).sum(-1) > 2.0 / 3.0 * cand_masks.sum(-1)
        take = cand_masks & (agree & mask)[..., None]
        member = torch.zeros(len(rows), n + 1, dtype=torch.bool)
        member.scatter_(1, torch.where(mask, forward, n), True)
        member.scatter_(1, torch.where(take, cand_sets, n).flatten(1), True)
        weights = torch.exp(-dist[rows]) * member[:, :n]
        encoding[rows] = weights / weights.sum(1, keepdim=True)
    if k2 != 1:
        expanded = torch.empty_like(encoding)
        for s in range(0, n, chunk_size):
            expanded[s:s + chunk_size] = encoding[ranks[s:s + chunk_size, :k2]].mean(1)
        encoding = expanded
    query_dist = dist[:num_q].clone()
    del dist
    final = jaccard_blend(encoding, num_q, query_dist, lambda_value, chunk_size)
    return final[:, num_q:].numpy()


def jaccard_blend(encoding: torch.Tensor, num_q: int, query_dist: torch.Tensor, lambda_value: float,
                  chunk_size: int) -> torch.Tensor:
    """(1 − λ)·Jaccard distance of the query encodings to all encodings, plus λ·original distance.

    The sum of minima runs over shared non-zero columns only, through a column-wise index of the encodings.
    """
    rows, cols = encoding.T.nonzero(as_tuple=True)  # by column: for column c, the items with V[·, c] ≠ 0
    col_items, col_values = cols, encoding.T[rows, cols]
    col_start = torch.zeros(encoding.shape[1] + 1, dtype=torch.long)
    col_start[1:] = torch.cumsum(torch.bincount(rows, minlength=encoding.shape[1]), 0)
    out = torch.empty_like(query_dist)
    for s in range(0, num_q, chunk_size):
        q_rows, q_cols = encoding[s:min(s + chunk_size, num_q)].nonzero(as_tuple=True)
        q_values = encoding[s + q_rows, q_cols]
        counts = col_start[q_cols + 1] - col_start[q_cols]
        pair_q = torch.repeat_interleave(q_rows, counts)
        pair_v = torch.repeat_interleave(q_values, counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        slots = torch.repeat_interleave(col_start[q_cols], counts) + offsets
        shared = torch.zeros(min(chunk_size, num_q - s), encoding.shape[0])
        shared.index_put_((pair_q, col_items[slots]), torch.minimum(pair_v, col_values[slots]), accumulate=True)
        jaccard = 1 - shared / (2 - shared)
        out[s:s + chunk_size] = jaccard * (1 - lambda_value) + query_dist[s:s + chunk_size] * lambda_value
    return out


# ---------------------------------------------------------------------------------------------------------
# Verification: the Siamese head scored as a same-person classifier on balanced pairs
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Features: a model from its saved parts, batched extraction, a cache beside the results
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model, loader, device: torch.device, flip: bool = False,
                     progress: bool = True) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embeddings of every image a loader yields (summed with the mirror image's when `flip`), with the person
    ids and cameras. They are kept raw, as the Siamese head takes them; retrieval normalises them."""
    model.eval()
    features, pids, camids = [], [], []
    for images, batch_pids, batch_camids, _ in tqdm(loader, desc="embedding", unit="batch", disable=not progress,
                                                    leave=False):
        images = images.to(device, non_blocking=True)
        embedding = model.embed(images).float()
        if flip:
            embedding = embedding + model.embed(torch.flip(images, dims=[3])).float()
        features.append(embedding.cpu())
        pids.append(batch_pids.numpy())
        camids.append(batch_camids.numpy())
    return torch.cat(features), np.concatenate(pids), np.concatenate(camids)


def model_settings(args: argparse.Namespace) -> dict:
    """Backbone, autoencoder, sizes and part files of the model to evaluate, from the flags and config.json."""
    if args.all_dir is not None and not Path(args.all_dir).is_dir():
        raise UserError(f"--all-dir {args.all_dir}: no such folder (expected a result directory of train.py)")
    sources = {"backbone": args.backbone_dir or args.all_dir, "ae": args.ae_dir or args.all_dir,
               "classifier": args.classifier_dir or args.all_dir}
    flags: dict = {}
    for folder in [args.all_dir, args.backbone_dir, args.ae_dir, args.classifier_dir]:
        if folder is not None and Path(folder).is_dir() and (Path(folder) / "config.json").is_file():
            config = read_json(Path(folder) / "config.json")
            flags = {**config["flags"], "num_classes": config.get("num_classes")}
            break
    backbone = args.backbone_type or flags.get("backbone_name")
    ae = args.ae_type or flags.get("ae_name")
    if (backbone is None or ae is None) and args.all_dir is not None:
        raise UserError(f"--all-dir {args.all_dir}: no config.json there (expected a result directory of train.py, "
                        "or give --backbone_type and --ae_type)")
    if backbone is None or ae is None:
        raise UserError("--backbone_type and --ae_type are needed when no config.json is found beside the parts "
                        "(or give --all-dir RESULT_DIR)")
    for name, given, trained in (("--backbone_type", args.backbone_type, flags.get("backbone_name")),
                                 ("--ae_type", args.ae_type, flags.get("ae_name"))):
        if given and trained and given != trained:
            raise UserError(f"{name} {given}: the parts were trained as {trained}")
    if sources["backbone"] is None or sources["ae"] is None:
        raise UserError("give --all-dir RESULT_DIR, or --backbone_dir and --ae_dir")
    files = {part: part_file(path, part, f"--{part}_dir") for part, path in sources.items()
             if path is not None and (part != "classifier" or args.classifier_dir or
                                      (Path(path) / PART_FILES["classifier"]).is_file())}
    return {"backbone": backbone, "ae": ae, "files": {k: str(v) for k, v in files.items()},
            "latent_dim": int(flags.get("latent_dim") or args.latent_dim),
            "img_size": tuple(args.img_size or flags.get("img_size") or (256, 128)),
            "last_stride": int(flags.get("last_stride") or 1), "num_classes": flags.get("num_classes"),
            "recon_target": flags.get("recon_target") or "feature"}


def load_model(settings: dict, device: torch.device) -> ReIDModel:
    """Build the model named by `settings` and load its saved parts, naming a part that does not fit."""
    states = {part: read_state_dict(path) for part, path in settings["files"].items()}
    num_classes = settings["num_classes"] or classifier_classes(states.get("classifier")) or 1
    try:
        model = ReIDModel(settings["backbone"], settings["ae"], num_classes, latent_dim=settings["latent_dim"],
                          last_stride=settings["last_stride"], img_size=settings["img_size"],
                          recon_target=settings["recon_target"])
    except ValueError as err:
        raise UserError(str(err)) from err
    parts = model.parts()
    for part, state in states.items():
        try:
            load_part_state(parts[part], state, part)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{settings['files'][part]}: does not fit {settings['backbone']} + {settings['ae']}: "
                            f"{err}") from err
    return model.to(device).eval()


def feature_cache_key(settings: dict, manifest: Path, flip: bool) -> str:
    """What the cached features depend on: the part files' bytes, the split manifest, the image size, flipping."""
    digest = hashlib.sha256()
    for part in sorted(settings["files"]):
        if part != "classifier":
            digest.update(sha256_file(settings["files"][part]).encode())
    digest.update(sha256_file(manifest).encode())
    digest.update(f"{settings['img_size']}{flip}raw".encode())
    return digest.hexdigest()


def split_features(model: ReIDModel, settings: dict, prepared: Path, split: str, flip: bool, device: torch.device,
                   cache: Path | None, batch_size: int = 128, workers: int = 2) -> dict[str, np.ndarray]:
    """Query and gallery embeddings with ids and cameras, from the .npz cache when it matches, else extracted."""
    key = feature_cache_key(settings, manifest_path(prepared, split), flip)  # dataset_root checked it is there
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key:
                LOG.info("features from %s", cache)
                return {name: stored[name] for name in stored.files if name != "key"}
    query, gallery = load_eval_records(prepared, split)
    if not query or not gallery:
        raise UserError(f"split '{split}' of {prepared}: {len(query)} query and {len(gallery)} gallery images; "
                        "both must be non-empty")
    loader = eval_loader(query + gallery, build_transforms(settings["img_size"], False), batch_size, workers)
    features, pids, camids = extract_features(model, loader, device, flip)
    n = len(query)
    found = {"qf": features[:n].numpy(), "gf": features[n:].numpy(), "q_pids": pids[:n], "g_pids": pids[n:],
             "q_camids": camids[:n], "g_camids": camids[n:],
             "q_files": np.array([str(Path(r.path).relative_to(prepared)) for r in query]),
             "g_files": np.array([str(Path(r.path).relative_to(prepared)) for r in gallery])}
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), **found)
        atomic_write_bytes(cache, buffer.getvalue())
    return found


def classifier_classes(state: dict | None) -> int | None:
    """The number of training identities, read off a saved classifier's output layer."""
    if state is None:
        return None
    weight = state.get("identity.fc.weight")
    return int(weight.shape[0]) if weight is not None else None


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The seed's model and data flags, shared by eval.py and topk.py."""
    add = parser.add_argument
    add("--all-dir", type=Path, help="a result directory of train.py: parts, config.json (enough on its own)")
    add("--backbone-dir", type=Path, help="backbone weights: a file or a folder holding backbone.pt")
    add("--backbone-type", help="backbone name (read from config.json when there is one)")
    add("--ae-dir", type=Path, help="autoencoder weights: a file or a folder holding ae.pt")
    add("--ae-type", help="autoencoder name (read from config.json when there is one)")
    add("--classifier-dir", type=Path, help="classifier and Siamese head: a file or a folder holding classifier.pt")
    add("--dataset-dir", type=Path, help="prepared root (default: the one the model was trained on)")
    add("--split", default="test", choices=[s for s in SPLITS if s != "train"])
    add("--flip", action="store_true", help="average each embedding with its mirror image's")
    add("--metric", choices=("euclidean", "cosine"), default="euclidean")
    add("--rerank", action="store_true", help="k-reciprocal re-ranking")
    add("--k1", type=int, default=20)
    add("--k2", type=int, default=6)
    add("--lambda-value", type=float, default=0.3)
    add("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the training size)")
    add("--latent-dim", type=int, default=512, help="latent size when no config.json says it")
    add("--batch-size", type=int, default=128)
    add("--workers", type=int, default=2)
    add("--device", default="auto")
    add("--no-cache", action="store_true", help="always extract features, never read or write the .npz cache")
    add("--out", type=Path, help="output folder (default RESULT_DIR/eval for eval.py, RESULT_DIR/topk for topk.py; "
        "<name>_<split> for splits other than test)")


def parse_model_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse eval.py's or topk.py's flags (both spellings), requiring a model: --all-dir or the part folders."""
    args = parser.parse_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.all_dir is None and args.backbone_dir is None:
        parser.error("give --all-dir RESULT_DIR, or --backbone_dir and --ae_dir")
    for flag, value in (("--k1", args.k1), ("--k2", args.k2)):
        if value < 1:
            parser.error(f"{flag} {value}: expected a positive number of neighbours")
    if not 0 <= args.lambda_value <= 1:
        parser.error(f"--lambda-value {args.lambda_value}: expected a weight between 0 and 1")
    return args


def rank_split(distances: np.ndarray, found: dict[str, np.ndarray], split: str, prepared: Path,
               **options) -> dict:
    """evaluate_rank on a split's features; a split the protocol leaves nothing to rank in is named."""
    try:
        return evaluate_rank(distances, found["q_pids"], found["g_pids"], found["q_camids"], found["g_camids"],
                             **options)
    except ValueError as err:
        raise UserError(f"split '{split}' of {prepared}: {err}") from err


def dataset_root(args: argparse.Namespace) -> Path:
    """The prepared root to evaluate on, checked to hold the split's manifest: --dataset-dir, else the training
    run's --data."""
    if args.dataset_dir is not None:
        root, source = Path(args.dataset_dir), "--dataset-dir"
        hint = "expected a root written by prepare.py --out, not a raw Market-1501 folder"
    else:
        configs = [Path(folder) / "config.json" for folder in (args.all_dir, args.backbone_dir) if folder is not None]
        config = next((path for path in configs if path.is_file()), None)
        if config is None:
            raise UserError("--dataset-dir: needed when the model folder has no config.json naming its data")
        root, source = Path(read_json(config)["flags"]["data"]), f"the training data named in {config}:"
        hint = "a relative path there is read from the current folder; give --dataset-dir PREPARED_ROOT"
    manifest = manifest_path(root, args.split)
    if not manifest.is_file():
        raise UserError(f"{source} {root}: no split manifest {manifest} ({hint})")
    return root


def result_folder(args: argparse.Namespace, name: str) -> Path:
    """RESULT_DIR/<name> beside the model (<name>_<split> for splits other than test)."""
    base = args.all_dir or (args.backbone_dir if Path(args.backbone_dir).is_dir() else Path(args.backbone_dir).parent)
    return Path(base) / (name if args.split == "test" else f"{name}_{args.split}")


def output_dir(args: argparse.Namespace) -> Path:
    """Where eval.py's results and feature cache go: --out, else RESULT_DIR/eval."""
    return args.out if args.out is not None else result_folder(args, "eval")


def ranking_distances(found: dict[str, np.ndarray], args: argparse.Namespace) -> np.ndarray:
    """Query × gallery distances by --metric, re-ranked when --rerank."""
    qf, gf = torch.from_numpy(found["qf"]), torch.from_numpy(found["gf"])
    q_g = embedding_distance(qf, gf, args.metric).numpy()
    if not args.rerank:
        return q_g
    q_q = embedding_distance(qf, qf, args.metric).numpy()
    g_g = embedding_distance(gf, gf, args.metric).numpy()
    return re_ranking(q_g, q_q, g_g, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)


@dataclass
class EvaluationInputs:
    """What eval.py and topk.py share: the model and its settings, the data root, the split's features (flipped
    when --flip) and the query × gallery distances they rank by."""

    settings: dict
    prepared: Path
    model: ReIDModel
    device: torch.device
    found: dict[str, np.ndarray]
    distances: np.ndarray


def cached_features(args: argparse.Namespace, model: ReIDModel, settings: dict, prepared: Path,
                    device: torch.device, cache_dir: Path, flip: bool) -> dict[str, np.ndarray]:
    """The split's features, cached as features_<split>[_flip].npz in `cache_dir` unless --no-cache."""
    cache = None if args.no_cache else cache_dir / f"features_{args.split}{'_flip' if flip else ''}.npz"
    return split_features(model, settings, prepared, args.split, flip, device, cache, args.batch_size,
                          args.workers)


def prepare_evaluation(args: argparse.Namespace, cache_dir: Path) -> EvaluationInputs:
    """Load the model, embed the split (or read the cache in `cache_dir`) and compute the ranking distances."""
    settings = model_settings(args)
    prepared, device = dataset_root(args), resolve_device(args.device)
    model = load_model(settings, device)
    found = cached_features(args, model, settings, prepared, device, cache_dir, args.flip)
    return EvaluationInputs(settings, prepared, model, device, found, ranking_distances(found, args))


def unaugmented_features(inputs: EvaluationInputs, args: argparse.Namespace, cache_dir: Path) -> dict[str, np.ndarray]:
    """The split's features without test-time flipping, as the Siamese head is scored and ranks."""
    if not args.flip:
        return inputs.found
    return cached_features(args, inputs.model, inputs.settings, inputs.prepared, inputs.device, cache_dir, False)


def plot_xy(x: np.ndarray, y: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str, label: str,
            percent: bool = False) -> None:
    """One labelled curve, written atomically as PNG (CMC, ROC and PR curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    scale = 100 if percent else 1
    ax.plot(x, y * scale, marker="o" if len(x) <= 60 else None, markersize=2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_ylim(0, scale * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


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
    logits = torch.cat([model.verify(z[idx_i[s:s + 4096]], z[idx_j[s:s + 4096]]).float().cpu()
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """eval.py's flags; `--flag_name` and `--flag-name` are the same flag."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--ap-mode", choices=AP_MODES, default="standard",
                        help="standard: non-interpolated AP (torchreid, fast-reid); devkit: Market-1501 devkit's")
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--verify-pairs", type=int, default=4000,
                        help="balanced same/different pairs to score the Siamese head on (0: skip)")
    parser.add_argument("--threshold", type=float, default=0.5, help="same-person probability threshold")
    args = parse_model_args(parser, argv)
    if args.max_rank < 1:
        parser.error(f"--max-rank {args.max_rank}: expected a positive rank")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    out = output_dir(args)
    inputs = prepare_evaluation(args, out)
    settings, prepared, found, distances = inputs.settings, inputs.prepared, inputs.found, inputs.distances
    result = rank_split(distances, found, args.split, prepared, max_rank=args.max_rank, ap_mode=args.ap_mode)
    cmc = result["cmc"]
    report = {
        "split": args.split, "mAP": result["mAP"], "mINP": result["mINP"], "ap_mode": args.ap_mode,
        **{f"rank{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)},
        "cmc": {str(k): float(v) for k, v in enumerate(cmc, start=1)},
        "num_query": int(len(found["q_pids"])), "num_gallery": int(len(found["g_pids"])),
        "num_valid_queries": int(result["num_valid_queries"]),
        "num_skipped_queries": int(result["num_skipped_queries"]),
        "model": settings, "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "manifest": {"path": str(manifest_path(prepared, args.split)),
                     "sha256": sha256_file(manifest_path(prepared, args.split))},
        "versions": versions(),
    }
    if "classifier" in settings["files"] and args.verify_pairs > 0:
        try:
            report["verification"] = verification_report(inputs.model, unaugmented_features(inputs, args, out),
                                                         args.verify_pairs, args.threshold, out, inputs.device)
        except ValueError as err:
            LOG.warning("warning: no verification metrics: %s", err)
    write_json(out / "results.json", report)
    plot_xy(np.arange(1, len(cmc) + 1), cmc, out / "cmc.png", "CMC", "rank", "matching rate",
            f"{settings['backbone']} + {settings['ae']}: mAP {100 * result['mAP']:.1f}%", percent=True)
    LOG.info("%s + %s on %s (%d queries, %d skipped, %d gallery)%s%s", settings["backbone"], settings["ae"],
             args.split, report["num_query"], report["num_skipped_queries"], report["num_gallery"],
             ", flip" if args.flip else "", ", re-ranked" if args.rerank else "")
    LOG.info("  mAP     %6.2f%%\n  mINP    %6.2f%%", 100 * result["mAP"], 100 * result["mINP"])
    for k in (1, 5, 10):
        if f"rank{k}" in report:
            LOG.info("  Rank-%-2d %6.2f%%", k, 100 * report[f"rank{k}"])
    if "verification" in report:
        v = report["verification"]
        LOG.info("  Siamese head on %d pairs: accuracy %.2f%%, F1 %.3f, ROC AUC %.3f, PR AUC %.3f", v["pairs"],
                 100 * v["accuracy"], v["f1"], v["roc_auc"], v["pr_auc"])
    LOG.info("results in %s", out / "results.json")
    return report


if __name__ == "__main__":
    run_script(main)
