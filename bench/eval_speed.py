"""Speed and memory of the evaluation at Market-1501 size, against the plain per-query loop, in the same run.

python bench/eval_speed.py            # metrics from a 3,368 × 15,913 distance matrix
python bench/eval_speed.py --rerank   # also k-reciprocal re-ranking over all 19,281 images

Memory of the metrics is the peak of NumPy's allocations during one extra, untimed call (tracemalloc, which
NumPy reports to); re-ranking's is the process's peak resident size (resource.getrusage), as it uses torch.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import evaluate_rank  # noqa: E402
from rerank import re_ranking  # noqa: E402

MARKET = {"queries": 3368, "gallery": 15913, "ids": 751, "cameras": 6, "distractors": 2793, "junk": 100}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def market_like(seed: int = 0) -> dict[str, np.ndarray]:
    """Ids, cameras and a float32 distance matrix shaped like Market-1501's test set; true matches lie closer."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, MARKET["ids"] + 1, MARKET["queries"])
    people = MARKET["gallery"] - MARKET["distractors"] - MARKET["junk"]
    g_pids = np.concatenate([rng.integers(1, MARKET["ids"] + 1, people), np.zeros(MARKET["distractors"], int),
                             -np.ones(MARKET["junk"], int)])
    q_camids = rng.integers(1, MARKET["cameras"] + 1, MARKET["queries"])
    g_camids = rng.integers(1, MARKET["cameras"] + 1, MARKET["gallery"])
    dist = rng.random((MARKET["queries"], MARKET["gallery"]), dtype=np.float32)
    dist += np.float32(0.6) * (q_pids[:, None] != g_pids[None, :])
    return {"distmat": dist, "q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids}


def plain_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> tuple[float, np.ndarray]:
    """The textbook per-query evaluation (sort each row, drop same-camera matches and junk): the reference."""
    aps, cmc, valid = [], np.zeros(max_rank), 0
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) & (g_pids[order] != -1)
        hits = (g_pids[order] == q_pids[i])[keep]
        if not hits.any():
            continue
        valid += 1
        ranks = np.flatnonzero(hits) + 1.0
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        if ranks[0] <= max_rank:
            cmc[int(ranks[0]) - 1:] += 1
    return float(np.mean(aps)), cmc / valid


def best_of(runs: int, call) -> tuple[float, object]:
    """The fastest of several timed calls, with the last result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rerank", action="store_true", help="also time re-ranking at full size")
    args = parser.parse_args()
    data = market_like()
    ours_s, ours = best_of(args.runs, lambda: evaluate_rank(**data))
    tracemalloc.start()
    evaluate_rank(**data)
    ours_mem = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    loop_s, (loop_map, loop_cmc) = best_of(1, lambda: plain_loop(**data))
    assert abs(ours["mAP"] - loop_map) < 1e-9 and np.allclose(ours["cmc"], loop_cmc), "results disagree"
    print(f"Market-1501 size: {MARKET['queries']} queries × {MARKET['gallery']} gallery (float32), "
          f"mAP {ours['mAP']:.4f} both ways")
    print(f"  evaluate_rank  {ours_s:7.3f} s   peak memory beyond the distance matrix {ours_mem:6.0f} MiB")
    print(f"  plain loop     {loop_s:7.3f} s")
    print(f"  speed-up       {loop_s / ours_s:7.1f}×")
    if args.rerank:
        rng = np.random.default_rng(1)
        feats = rng.normal(size=(MARKET["queries"] + MARKET["gallery"], 64)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        qf, gf = feats[: MARKET["queries"]], feats[MARKET["queries"]:]
        q_g, q_q, g_g = (np.maximum(2 - 2 * a @ b.T, 0) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
        before = peak_rss_mib()
        start = time.perf_counter()
        re_ranking(q_g, q_q, g_g)
        print(f"  re-ranking     {time.perf_counter() - start:7.1f} s   over {len(feats)} images, "
              f"peak memory {peak_rss_mib():.0f} MiB in all ({peak_rss_mib() - before:.0f} MiB beyond its inputs)")


if __name__ == "__main__":
    main()
