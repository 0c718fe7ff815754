"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query × gallery distances."""

from __future__ import annotations

import numpy as np
import torch


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

