"""Search a plain folder of images: listing, the gallery's embedding cache, and top-k ranking in bounded memory,
exact (torch, in chunks) or through a faiss index (exact or approximate). topk.py's --gallery mode."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from embedding import embedding_batches, model_fingerprint
from layouts import parse_market_name
from metrics import JUNK_PID, pairwise_distance
from model import ReIDModel
from utils import LOG, UserError, read_npz_cache, write_npz_cache

if TYPE_CHECKING:
    import faiss

UNLABELLED = -2  # identity and camera of a file whose name is not Market-style
INDEXES = ("exact", "faiss", "faiss-ivf")
IMAGE_SUFFIXES = frozenset(suffix.lower() for suffix in Image.registered_extensions())


# ---------------------------------------------------------------------------------------------------------
# Files: listing, Market labels where the names carry them
# ---------------------------------------------------------------------------------------------------------


def list_images(paths: Sequence[str | Path], flag: str) -> list[Path]:
    """Image files (by any extension PIL reads, in any case): files as given, folders searched recursively; sorted
    within each folder, without repeats."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            found.update(dict.fromkeys(sorted(p for p in path.rglob("*")
                                              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)))
        else:
            raise UserError(f"{flag} {path}: no such file or folder (expected image files or folders of them)")
    if not found:
        raise UserError(f"{flag} {' '.join(map(str, paths))}: no image files there "
                        f"(expected extensions PIL reads, such as .jpg, .png)")
    return list(found)


def market_labels(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Identity and camera from Market-style names, whatever the extension; UNLABELLED for other names."""
    labels = [parse_market_name(f.stem + ".jpg") or (UNLABELLED, UNLABELLED) for f in files]
    pids, cams = zip(*labels, strict=True)
    return np.array(pids, dtype=np.int64), np.array(cams, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# The gallery's embeddings, cached beside the results
# ---------------------------------------------------------------------------------------------------------


def gallery_key(settings: dict, files: Sequence[Path], flip: bool) -> str:
    """What the cached gallery depends on: the model, and each file's path, size and modification time."""
    digest = hashlib.sha256(model_fingerprint(settings, flip).encode())
    for path in files:
        info = path.stat()
        digest.update(f"{path.resolve()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def embed_files(model: ReIDModel, files: Sequence[Path], batch_size: int, workers: int,
                flip: bool) -> tuple[np.ndarray, list[int]]:
    """Embeddings of the readable files (in order) and the indices of the unreadable ones, batch by batch."""
    out = np.empty((len(files), model.embed_dim), dtype=np.float32)
    readable = np.zeros(len(files), dtype=bool)
    for indices, embedding in embedding_batches(model, files, batch_size, flip, workers, skip_unreadable=True,
                                                progress=True):
        out[indices], readable[indices] = embedding.numpy(), True
    return out[readable], np.flatnonzero(~readable).tolist()


def gallery_features(model: ReIDModel, settings: dict, files: Sequence[Path], cache: Path | None, batch_size: int,
                     workers: int, flip: bool) -> dict[str, np.ndarray]:
    """The gallery's embeddings with the files they belong to and the unreadable ones, from `cache` when its key
    matches the model and the file list, else embedded (and cached)."""
    key = gallery_key(settings, files, flip)
    cached = read_npz_cache(cache, key)
    if cached is not None:
        LOG.info("gallery embeddings from %s", cache)
        return cached
    features, unreadable = embed_files(model, files, batch_size, workers, flip)
    bad = set(unreadable)
    found = {"features": features, "files": np.array([str(f) for i, f in enumerate(files) if i not in bad]),
             "unreadable": np.array([str(files[i]) for i in unreadable], dtype=str)}
    write_npz_cache(cache, key, found)
    return found


# ---------------------------------------------------------------------------------------------------------
# Ranking: what is left out, exact top-k in chunks, faiss
# ---------------------------------------------------------------------------------------------------------


def left_out(q_pids: np.ndarray, q_cams: np.ndarray, q_files: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray,
             g_files: np.ndarray) -> np.ndarray:
    """Which gallery items a query does not rank (broadcast): the query's own file, junk, and, where both names
    are Market-style, the same person seen by the same camera."""
    labelled = (q_pids != UNLABELLED) & (g_pids != UNLABELLED)
    return (g_files == q_files) | (g_pids == JUNK_PID) | (labelled & (g_pids == q_pids) & (g_cams == q_cams))


def normalised(features: np.ndarray) -> torch.Tensor:
    """Unit-length float32 rows, as retrieval compares embeddings."""
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(features)).float(), dim=1)


def exact_topk(query: dict, gallery: dict, k: int, metric: str, query_chunk: int = 256,
               gallery_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k closest gallery items (indices, distances; -1 and inf past the end), by exact distances
    computed a query chunk × gallery chunk at a time, keeping only a running top-k."""
    qf, gf = normalised(query["features"]), gallery["features"]  # the gallery normalised a chunk at a time
    nq, ng = len(qf), len(gf)
    best_i, best_d = np.full((nq, k), -1, dtype=np.int64), np.full((nq, k), np.inf, dtype=np.float32)
    for q0 in tqdm(range(0, nq, query_chunk), desc="ranking", unit="chunk", leave=False):
        rows = slice(q0, q0 + query_chunk)
        run_d = torch.full((len(qf[rows]), 0), float("inf"))
        run_i = torch.empty((len(qf[rows]), 0), dtype=torch.int64)
        for g0 in range(0, ng, gallery_chunk):
            cols = slice(g0, g0 + gallery_chunk)
            dist = pairwise_distance(qf[rows], normalised(gf[cols]), metric)
            mask = left_out(query["pids"][rows, None], query["cams"][rows, None], query["files"][rows, None],
                            gallery["pids"][None, cols], gallery["cams"][None, cols], gallery["files"][None, cols])
            dist[torch.from_numpy(mask)] = float("inf")
            # The chunk's k best, back in gallery order, so the stable sort breaks ties by gallery index.
            chunk_i = dist.topk(min(k, dist.shape[1]), dim=1, largest=False).indices.sort(dim=1).values
            run_d, order = torch.cat([run_d, dist.gather(1, chunk_i)], 1).sort(dim=1, stable=True)
            run_i = torch.cat([run_i, chunk_i + g0], 1).gather(1, order)
            run_d, run_i = run_d[:, :k], run_i[:, :k]
        width = run_d.shape[1]
        best_d[rows, :width], best_i[rows, :width] = run_d.numpy(), run_i.numpy()
    best_i[np.isinf(best_d)] = -1
    return best_i, best_d


def faiss_index(features: np.ndarray, metric: str, kind: str, nlist: int, nprobe: int,
                chunk: int = 65536) -> faiss.Index:
    """A faiss index of unit-length embeddings: exact (IndexFlat) or inverted lists (IVF, `nlist` cells, `nprobe`
    searched); inner product for cosine, squared L2 for euclidean, the distances exact_topk computes."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its search for CPU-specific builds is noise
    import faiss

    dim = features.shape[1]
    flat = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index = flat
    if kind == "faiss-ivf":
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(flat, dim, min(nlist, len(features)), faiss_metric)
        # k-means on a sample: 64 points a cell place the cells about as well as a million do, far faster.
        sample = np.sort(np.random.default_rng(0).permutation(len(features))[:64 * nlist])
        index.train(normalised(features[sample]).numpy())
        index.nprobe = nprobe
    for start in range(0, len(features), chunk):  # normalised a chunk at a time: no second copy of the gallery
        index.add(normalised(features[start:start + chunk]).numpy())
    return index


def left_out_counts(query: dict, gallery: dict) -> np.ndarray:
    """How many gallery items each query leaves out (its own file, junk, same person and camera)."""
    pairs = Counter(zip(gallery["pids"].tolist(), gallery["cams"].tolist(), strict=True))
    files = Counter(gallery["files"].tolist())
    junk = int((gallery["pids"] == JUNK_PID).sum())
    return np.array([files[f] + junk + (pairs[(p, c)] if p not in (UNLABELLED, JUNK_PID) else 0)
                     for p, c, f in zip(query["pids"].tolist(), query["cams"].tolist(), query["files"].tolist(),
                                        strict=True)])


def faiss_topk(index: faiss.Index, query: dict, gallery: dict, k: int, metric: str,
               query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """exact_topk's answer from a faiss index: k plus the left-out count searched, the left-out dropped."""
    qf = normalised(query["features"]).numpy()
    extra = left_out_counts(query, gallery)
    best_i, best_d = np.full((len(qf), k), -1, dtype=np.int64), np.full((len(qf), k), np.inf, dtype=np.float32)
    for q0 in tqdm(range(0, len(qf), query_chunk), desc="ranking", unit="chunk", leave=False):
        rows = slice(q0, q0 + query_chunk)
        wanted = min(k + int(extra[rows].max()), index.ntotal)
        scores, found = index.search(qf[rows], wanted)
        dist = 1.0 - scores if metric == "cosine" else np.maximum(scores, 0)
        hit = np.maximum(found, 0)
        drop = (found < 0) | left_out(query["pids"][rows, None], query["cams"][rows, None], query["files"][rows, None],
                                      gallery["pids"][hit], gallery["cams"][hit], gallery["files"][hit])
        for row, (keep_i, keep_d, skip) in enumerate(zip(found, dist, drop, strict=True), start=q0):
            kept_i, kept_d = keep_i[~skip][:k], keep_d[~skip][:k]
            best_i[row, :len(kept_i)], best_d[row, :len(kept_d)] = kept_i, kept_d
    return best_i, best_d
