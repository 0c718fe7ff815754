"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) and α-weighted average query expansion.

`re_ranking` takes the three distance matrices re-ID code passes around; `re_ranking_features` starts from the
embeddings and holds no n × n matrix: distances by row chunks, nearest neighbours by partial selection,
encodings as sparse rows. Both share every step after the neighbour lists, on whichever device holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike
from tqdm import tqdm

from metrics import distance_from_products

PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SparseRows(NamedTuple):
    """A sparse matrix by rows (CSR): row i's columns and values are cols[start[i]:start[i + 1]] and values[...]."""

    start: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


def row_starts(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """CSR row pointers of entries sorted by row."""
    start = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    start[1:] = torch.cumsum(torch.bincount(rows, minlength=num_rows), 0)
    return start


def segment_positions(start: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows `ids` of a CSR layout, each of their entries' index in `ids` and position in cols/values."""
    counts = start[ids + 1] - start[ids]
    owner = torch.repeat_interleave(torch.arange(len(ids), device=ids.device), counts)
    shift = torch.repeat_interleave(start[ids] - (torch.cumsum(counts, 0) - counts), counts)
    return owner, shift + torch.arange(len(owner), device=ids.device)


# ---------------------------------------------------------------------------------------------------------
# The steps after the neighbour lists, shared by both entry points
# ---------------------------------------------------------------------------------------------------------


def reciprocal_mask(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """For every item i and each of its k+1 nearest neighbours n, whether i is among n's k+1 nearest too."""
    forward = ranks[:, : k + 1]
    backward = ranks[forward, : k + 1]
    return (backward == torch.arange(len(ranks), device=ranks.device)[:, None, None]).any(-1)


def expanded_members(ranks: torch.Tensor, recip: torch.Tensor, recip_half: torch.Tensor, rows: torch.Tensor,
                     k1: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in `rows`, column) of each row's k-reciprocal set joined with the half-size sets of its members that
    mostly (over two thirds) lie in it, sorted by row then column."""
    n = len(ranks)
    forward, mask = ranks[rows, : k1 + 1], recip[rows]
    cand_sets, cand_masks = ranks[forward, : half + 1], recip_half[forward]
    member = torch.zeros(len(rows), n + 1, dtype=torch.bool, device=ranks.device)
    member.scatter_(1, torch.where(mask, forward, n), True)
    inside = member.gather(1, cand_sets.flatten(1)).view_as(cand_sets)
    agree = (inside & cand_masks).sum(-1) > 2.0 / 3.0 * cand_masks.sum(-1)
    take = cand_masks & (agree & mask)[..., None]
    member.scatter_(1, torch.where(take, cand_sets, n).flatten(1), True)
    return member[:, :n].nonzero(as_tuple=True)


def k_reciprocal_encodings(ranks: torch.Tensor, k1: int, pair_dist: PairDistance, chunk_size: int) -> SparseRows:
    """Encodings V over the expanded k-reciprocal sets: V[i, j] ∝ exp(−d(i, j)), each row summing to 1.

    `pair_dist(rows, cols)` gives the normalised distance of each (row, col) pair.
    """
    n, half = len(ranks), int(np.around(k1 / 2.0))
    recip, recip_half = reciprocal_mask(ranks, k1), reciprocal_mask(ranks, half)
    rows_out, cols_out, values_out = [], [], []
    for s in range(0, n, chunk_size):
        rows = torch.arange(s, min(s + chunk_size, n), device=ranks.device)
        local, cols = expanded_members(ranks, recip, recip_half, rows, k1, half)
        weights = torch.exp(-pair_dist(rows[local], cols))
        totals = torch.zeros(len(rows), device=weights.device).index_add_(0, local, weights)
        rows_out.append(rows[local])
        cols_out.append(cols)
        values_out.append(weights / totals[local])
    return SparseRows(row_starts(torch.cat(rows_out), n), torch.cat(cols_out), torch.cat(values_out))


def expand_encodings(encoding: SparseRows, ranks: torch.Tensor, k2: int, chunk_size: int) -> SparseRows:
    """Local query expansion: each row becomes the mean of the rows of its k2 nearest neighbours (itself first)."""
    n = len(ranks)
    neighbours = ranks[:, :k2]
    count = neighbours.shape[1]
    keys_out, values_out = [], []
    for s in range(0, n, chunk_size):
        owner, position = segment_positions(encoding.start, neighbours[s:s + chunk_size].flatten())
        keys, order = (torch.div(owner, count, rounding_mode="floor") * n + encoding.cols[position]).sort()
        unique, inverse = torch.unique_consecutive(keys, return_inverse=True)  # keys local to the chunk sort fast
        sums = torch.zeros(len(unique), device=keys.device).index_add_(0, inverse, encoding.values[position][order])
        keys_out.append(unique + s * n)
        values_out.append(sums / count)
    keys = torch.cat(keys_out)
    return SparseRows(row_starts(torch.div(keys, n, rounding_mode="floor"), n), keys % n, torch.cat(values_out))


def gallery_by_column(encoding: SparseRows, num_q: int) -> SparseRows:
    """The gallery rows of the encodings, transposed: for each column, the gallery items (from 0) non-zero there."""
    n = len(encoding.start) - 1
    rows = torch.repeat_interleave(torch.arange(n, device=encoding.cols.device), encoding.start.diff())
    keep = rows >= num_q
    cols = encoding.cols[keep]
    order = torch.argsort(cols, stable=True)
    return SparseRows(row_starts(cols[order], n), rows[keep][order] - num_q, encoding.values[keep][order])


def work_chunks(work: np.ndarray, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed work stays within `budget` (at least one row each), `max_rows` at most."""
    ends = np.cumsum(work)
    bounds, start = [], 0
    while start < len(work):
        done = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, done + budget, side="right"))
        stop = min(max(stop, start + 1), start + max_rows, len(work))
        bounds.append((start, stop))
        start = stop
    return bounds


def jaccard_blend(encoding: SparseRows, query_dist: torch.Tensor, lambda_value: float, budget: int = 1 << 23,
                  progress: bool = False) -> torch.Tensor:
    """(1 − λ)·Jaccard distance of the query encodings to the gallery's, plus λ·`query_dist`, written over it.

    The sum of minima runs over shared non-zero columns only, at most `budget` (query, gallery) terms at a time.
    """
    num_q, num_g = query_dist.shape
    columns = gallery_by_column(encoding, num_q)
    q_end = int(encoding.start[num_q])
    q_rows = torch.repeat_interleave(torch.arange(num_q, device=query_dist.device), encoding.start[: num_q + 1].diff())
    q_cols, q_values = encoding.cols[:q_end], encoding.values[:q_end]
    work = torch.zeros(num_q, dtype=torch.long, device=q_rows.device)
    work.index_add_(0, q_rows, columns.start[q_cols + 1] - columns.start[q_cols])
    for s, e in tqdm(work_chunks(work.cpu().numpy(), budget, max(1, budget // num_g)), desc="re-ranking: Jaccard",
                     unit="chunk", disable=not progress, leave=False):
        entries = slice(int(encoding.start[s]), int(encoding.start[e]))
        owner, position = segment_positions(columns.start, q_cols[entries])
        shared = torch.zeros((e - s) * num_g, device=query_dist.device)
        shared.index_add_(0, (q_rows[entries][owner] - s) * num_g + columns.cols[position],
                          torch.minimum(q_values[entries][owner], columns.values[position]))
        shared = shared.view(e - s, num_g)
        query_dist[s:e] = (1 - shared / (2 - shared)) * (1 - lambda_value) + query_dist[s:e] * lambda_value
    return query_dist


def rerank_from_neighbours(ranks: torch.Tensor, pair_dist: PairDistance, query_dist: torch.Tensor, k1: int,
                           k2: int, lambda_value: float, chunk_size: int, progress: bool = False) -> torch.Tensor:
    """Re-ranked query × gallery distances from every item's nearest neighbours (`ranks`, closest first), the
    normalised distance of any pair, and the queries' normalised distances to the gallery (overwritten)."""
    encoding = k_reciprocal_encodings(ranks, k1, pair_dist, chunk_size)
    if k2 != 1:
        encoding = expand_encodings(encoding, ranks, k2, chunk_size)
    return jaccard_blend(encoding, query_dist, lambda_value, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# Entry points: from distance matrices, from embeddings
# ---------------------------------------------------------------------------------------------------------


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, chunk_size: int = 512) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): query × gallery distances from the three matrices.

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
    depth = min(max(k1 + 1, k2), len(dist))
    ranks = torch.cat([torch.sort(dist[s:s + chunk_size], dim=1, stable=True).indices[:, :depth]
                       for s in range(0, len(dist), chunk_size)])
    query_dist = dist[:num_q, num_q:].clone()
    return rerank_from_neighbours(ranks, lambda rows, cols: dist[rows, cols], query_dist, k1, k2, lambda_value,
                                  chunk_size).numpy()


class Neighbours(NamedTuple):
    """Each item's nearest items, closest first, their normalised squared distances, and each row's largest
    squared distance that normalises it."""

    ranks: torch.Tensor
    near: torch.Tensor
    scale: torch.Tensor


def merge_nearest(best: torch.Tensor, ranks: torch.Tensor, start: int, products: torch.Tensor, offset: int) -> None:
    """Fold a block of inner products (rows from `start`, columns from `offset`) into the running lists of each
    row's largest products and their columns."""
    if products.shape[1] == 0:
        return
    top, index = products.topk(min(best.shape[1], products.shape[1]), dim=1)
    rows = slice(start, start + len(products))
    values, columns = torch.cat([best[rows], top], 1), torch.cat([ranks[rows], index + offset], 1)
    best[rows], pick = values.topk(best.shape[1], dim=1)
    ranks[rows] = columns.gather(1, pick)


def merge_farthest(lowest: torch.Tensor, farthest: torch.Tensor, start: int, products: torch.Tensor,
                   offset: int) -> None:
    """Fold a block of inner products into the running smallest product of each row and its column."""
    if products.shape[1] == 0:
        return
    low, index = products.min(1)
    rows = slice(start, start + len(products))
    better = low < lowest[rows]
    lowest[rows] = torch.where(better, low, lowest[rows])
    farthest[rows] = torch.where(better, index + offset, farthest[rows])


def nearest_neighbours(unit: torch.Tensor, sq: torch.Tensor, num_q: int, depth: int, metric: str, chunk_size: int,
                       progress: bool) -> tuple[Neighbours, torch.Tensor]:
    """Each item's `depth` nearest by partial selection, each row's farthest item (the symmetric matrix's column
    maxima) and the queries' normalised squared distances to the gallery, from the inner products of each row
    chunk with itself and every later item: the upper triangle, read by rows and by columns."""
    n, device = len(unit), unit.device
    best = torch.full((n, depth), -torch.inf, device=device)
    ranks = torch.zeros(n, depth, dtype=torch.long, device=device)
    lowest, farthest = torch.full((n,), torch.inf, device=device), torch.zeros(n, dtype=torch.long, device=device)
    query_dist = torch.empty(num_q, n - num_q, device=device)
    for s in tqdm(range(0, n, chunk_size), desc="re-ranking: neighbours", unit="chunk", disable=not progress,
                  leave=False):
        products = unit[s:s + chunk_size] @ unit[s:].T
        later = products[:, len(products):].T
        merge_nearest(best, ranks, s, products, s)
        merge_nearest(best, ranks, s + len(products), later, s)
        merge_farthest(lowest, farthest, s, products, s)
        merge_farthest(lowest, farthest, s + len(products), later, s)
        if s < num_q:
            query_dist[s:s + len(products)] = products[: num_q - s, num_q - s:]
    scale = distance_from_products(torch.linalg.vecdot(unit, unit[farthest]), sq, sq[farthest], metric).pow_(2)
    near = distance_from_products(best, sq[:, None], sq[ranks], metric).pow_(2) / scale[:, None]
    for s in range(0, num_q, chunk_size):  # the products become distances in place
        block = query_dist[s:s + chunk_size]
        rows = slice(s, s + len(block))
        block.copy_(distance_from_products(block, sq[rows, None], sq[None, num_q:], metric).pow_(2))
        block.div_(scale[rows, None])
    return Neighbours(ranks, near, scale), query_dist


def scaled_pair_distances(unit: torch.Tensor, sq: torch.Tensor, metric: str, neighbours: Neighbours,
                          rows: torch.Tensor, cols: torch.Tensor, floats_per_batch: int = 1 << 24) -> torch.Tensor:
    """Normalised squared distances of (row, col) pairs: from the neighbour lists where they hold the pair, else
    from the embeddings, in bounded batches."""
    listed = cols[:, None] == neighbours.ranks[rows]
    out = neighbours.near[rows, listed.to(torch.uint8).argmax(1)]
    missing = (~listed.any(1)).nonzero().squeeze(1)
    batch = max(1, floats_per_batch // unit.shape[1])
    for s in range(0, len(missing), batch):
        pairs = missing[s:s + batch]
        r, c = rows[pairs], cols[pairs]
        products = torch.linalg.vecdot(unit[r], unit[c])
        out[pairs] = distance_from_products(products, sq[r], sq[c], metric).pow_(2) / neighbours.scale[r]
    return out


def as_features(qf: ArrayLike, gf: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    """Query and gallery embeddings (NumPy or torch) stacked as one float32 tensor on `device`."""
    return torch.cat([torch.as_tensor(qf), torch.as_tensor(gf)]).float().to(device or "cpu")


def re_ranking_features(qf: ArrayLike, gf: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        metric: str = "euclidean", device: torch.device | str | None = None, chunk_size: int = 2048,
                        progress: bool = False) -> np.ndarray:
    """k-reciprocal re-ranking from query and gallery embeddings, equal to `re_ranking` on the matrices of
    `embedding_distance` (L2-normalised, then squared Euclidean or cosine), without any n × n matrix."""
    unit = torch.nn.functional.normalize(as_features(qf, gf, device), dim=1)
    sq = unit.pow(2).sum(1)
    depth = min(max(k1 + 1, k2), len(unit))
    neighbours, query_dist = nearest_neighbours(unit, sq, len(qf), depth, metric, chunk_size, progress)
    pair_dist = partial(scaled_pair_distances, unit, sq, metric, neighbours)
    return rerank_from_neighbours(neighbours.ranks, pair_dist, query_dist, k1, k2, lambda_value, chunk_size,
                                  progress).cpu().numpy()


def average_query_expansion(qf: ArrayLike, gf: ArrayLike, k: int = 5, alpha: float = 3.0,
                            device: torch.device | str | None = None,
                            chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """α-weighted average query expansion (fast-reid's `aqe`, once): each query and gallery embedding becomes
    the mean of its k most cosine-similar among both sets (itself included), weighted by max(similarity, 0)^α."""
    feats = as_features(qf, gf, device)
    unit = torch.nn.functional.normalize(feats, dim=1)
    out = torch.empty_like(feats)
    for s in range(0, len(feats), chunk_size):
        sims, nearest = (unit[s:s + chunk_size] @ unit.T).topk(min(k, len(feats)), dim=1)
        weights = sims.clamp(min=0).pow(alpha)
        out[s:s + chunk_size] = (weights[..., None] * feats[nearest]).mean(1)
    out = out.cpu().numpy()
    return out[: len(qf)], out[len(qf):]
