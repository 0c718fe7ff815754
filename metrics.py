"""Ranking by the Market-1501 protocol: distances between embeddings, then mAP, mINP and CMC from a query ×
gallery distance matrix, vectorised over queries. train.py's validation, eval.py and topk.py all rank here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from layouts import JUNK_PID
from utils import UserError

AP_MODES = ("standard", "devkit")


def check_rank_inputs(distmat: np.ndarray, q_pids: Sequence[int], g_pids: Sequence[int], q_camids: Sequence[int],
                      g_camids: Sequence[int]) -> None:
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


def padded(rows: np.ndarray, pos: np.ndarray, values: np.ndarray, num_rows: int, width: int,
           fill: float) -> np.ndarray:
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

    def chunk_metrics(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        dist = np.asarray(distmat[start:start + chunk_size])  # a memory-mapped matrix is read here, once
        match, removed, junk = protocol_masks(q_pids[start:start + chunk_size], q_camids[start:start + chunk_size],
                                              g_pids, g_camids)
        match_rows, ranks = chunk_match_ranks(dist, match, removed, np.flatnonzero(junk))
        return *per_query_metrics(match_rows, ranks, len(dist), ap_mode), int(np.count_nonzero(~np.isfinite(dist)))

    # numpy's sort releases the GIL, so threads share the work across cores.
    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(chunk_metrics, range(0, len(q_pids), chunk_size)))
    *metrics, non_finite = zip(*parts, strict=True)
    if sum(non_finite):
        raise ValueError(f"{sum(non_finite)} of the {distmat.shape[0]} × {distmat.shape[1]} distances are not finite "
                         "(NaN or infinite embeddings?); ranking them would give meaningless scores")
    ap, inp, first = (np.concatenate(arrays) for arrays in metrics)
    valid = int(np.count_nonzero(~np.isnan(ap)))
    if valid == 0:
        raise ValueError(f"no query has a true match left in the gallery ({len(q_pids)} queries): every match is "
                         "junk or seen by the query's own camera, which the protocol removes")
    hit = first[~np.isnan(first)].astype(int)
    cmc = np.cumsum(np.bincount(hit[hit <= max_rank] - 1, minlength=max_rank))[:max_rank] / valid
    return {"mAP": float(np.nanmean(ap)), "mINP": float(np.nanmean(inp)), "cmc": cmc,
            "num_valid_queries": valid, "num_skipped_queries": len(q_pids) - valid, "ap": ap}


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean",
                      chunk_size: int = 4096) -> torch.Tensor:
    """Squared Euclidean or cosine (1 − cos) distances between two sets of features, in row chunks."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric {metric!r}: expected euclidean or cosine")
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    out = torch.empty(qf.shape[0], gf.shape[0], device=qf.device)
    g_norms = gf.pow(2).sum(1)
    for start in range(0, qf.shape[0], chunk_size):
        q = qf[start:start + chunk_size]
        if metric == "cosine":
            out[start:start + chunk_size] = 1 - q @ gf.T
        else:
            block = torch.addmm(q.pow(2).sum(1, keepdim=True) + g_norms[None, :], q, gf.T, alpha=-2)
            out[start:start + chunk_size] = block.clamp_(min=0)
    return out


def distance_from_products(products: torch.Tensor, q_sq: torch.Tensor, g_sq: torch.Tensor,
                           metric: str = "euclidean") -> torch.Tensor:
    """Squared Euclidean or cosine distances of L2-normalised features from their inner products and squared
    norms (broadcast against each other), by pairwise_distance's formula."""
    if metric == "cosine":
        return 1 - products
    return (q_sq + g_sq - 2 * products).clamp_(min=0)


def embedding_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Retrieval distances between embeddings: L2-normalised first, then squared Euclidean or cosine."""
    normalize = torch.nn.functional.normalize
    return pairwise_distance(normalize(qf.float(), dim=1), normalize(gf.float(), dim=1), metric)


def rank_split(distances: np.ndarray, found: dict[str, np.ndarray], split: str, prepared: Path,
               **options) -> dict:
    """evaluate_rank on a split's features; a split the protocol leaves nothing to rank in is named."""
    try:
        return evaluate_rank(distances, found["q_pids"], found["g_pids"], found["q_camids"], found["g_camids"],
                             **options)
    except ValueError as err:
        raise UserError(f"split '{split}' of {prepared}: {err}") from err
