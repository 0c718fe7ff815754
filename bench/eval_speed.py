"""Speed and memory of the evaluation at Market-1501 size, against the plain per-query loop, in the same run.

python bench/eval_speed.py                      # metrics from a 3,368 × 15,913 distance matrix
python bench/eval_speed.py --rerank             # also k-reciprocal re-ranking over all 19,281 images
python bench/eval_speed.py --rerank --dim 2048  # re-ranking from 2,048-d embeddings (default 512, the latent size)

Memory of the metrics is the peak of NumPy's allocations during one extra, untimed call (tracemalloc, which
NumPy reports to). Re-ranking runs each path in its own process, as tracemalloc cannot see torch's
allocations: from the embeddings (rerank.re_ranking_features) and from the three distance matrices
(rerank.re_ranking); its memory is the resident high-water mark (VmHWM, reset once the inputs are built) less
the resident size then, so the inputs are not counted. CPU time sums all threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import embedding_distance, evaluate_rank  # noqa: E402
from rerank import re_ranking, re_ranking_features  # noqa: E402

MARKET = {"queries": 3368, "gallery": 15913, "ids": 751, "cameras": 6, "distractors": 2793, "junk": 100}


def memory_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


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


def best_in_turns(runs: int, calls: list[Callable[[], object]]) -> list[tuple[float, object]]:
    """Each call's fastest of `runs` timings, the calls taking turns so that the machine's drift hits all alike,
    with each call's last result."""
    times: list[list[float]] = [[] for _ in calls]
    results: list[object] = [None] * len(calls)
    for _ in range(runs):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            results[index] = call()
            times[index].append(time.perf_counter() - start)
    return [(min(t), result) for t, result in zip(times, results, strict=True)]


def market_embeddings(dim: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery embeddings with Market-1501's identities: a random centre an identity (one each for
    distractors and junk images) plus noise at twice its scale, so that plain ranking is far from perfect."""
    data = market_like()
    pids = np.concatenate([data["q_pids"], data["g_pids"]])
    rng = np.random.default_rng(seed)
    owner = np.where(pids > 0, pids, MARKET["ids"] + 1 + np.arange(len(pids)))
    centres = rng.normal(size=(owner.max() + 1, dim)).astype(np.float32)
    feats = centres[owner] + 2 * rng.normal(size=(len(pids), dim)).astype(np.float32)
    return feats[: MARKET["queries"]], feats[MARKET["queries"]:]


def rerank_child(method: str, dim: int, out: Path) -> None:
    """One re-ranking path in this process: build its inputs, then time it and print its figures as JSON."""
    qf, gf = market_embeddings(dim)
    if method == "matrices":
        q, g = torch.from_numpy(qf), torch.from_numpy(gf)
        inputs = [embedding_distance(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))]
        call = partial(re_ranking, *inputs)
    else:
        call = partial(re_ranking_features, qf, gf, progress=True)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident size now
    resident = memory_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = memory_mib("VmHWM") - resident
    np.save(out, result)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mib": peak}))


def run_rerank_child(method: str, dim: int, out: Path) -> dict:
    """Figures of one re-ranking path, measured in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--child", method, "--dim", str(dim), "--child-out", str(out)],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rerank_report(dim: int) -> None:
    """Re-ranking from embeddings beside the distance-matrix path, their agreement and their mAP."""
    data = market_like()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        paths = {m: Path(folder) / f"{m}.npy" for m in ("features", "matrices")}
        figures = {m: run_rerank_child(m, dim, path) for m, path in paths.items()}
        ours, reference = np.load(paths["features"]), np.load(paths["matrices"])
    qf, gf = market_embeddings(dim)
    plain = embedding_distance(torch.from_numpy(qf), torch.from_numpy(gf)).numpy()
    labels = {k: data[k] for k in ("q_pids", "g_pids", "q_camids", "g_camids")}
    print(f"re-ranking (k1 20, k2 6, λ 0.3) over {len(qf) + len(gf)} images, {dim}-d embeddings, "
          f"{torch.get_num_threads()} threads; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    for method, name in (("features", "from embeddings"), ("matrices", "from distance matrices")):
        f = figures[method]
        print(f"  {name:23s} {f['wall_s']:7.1f} s wall  {f['cpu_s']:7.1f} s CPU   "
              f"peak memory beyond the inputs {f['peak_mib']:6.0f} MiB")
    apart = np.abs(ours - reference) > 1e-5
    print(f"  speed-up {figures['matrices']['wall_s'] / figures['features']['wall_s']:.1f}× wall, "
          f"{figures['matrices']['cpu_s'] / figures['features']['cpu_s']:.1f}× CPU; memory "
          f"{figures['matrices']['peak_mib'] / figures['features']['peak_mib']:.1f}× less")
    print(f"  largest difference {np.abs(ours - reference).max():.1e}; {apart.sum()} of {apart.size} distances "
          f"({np.any(apart, axis=1).sum()} queries) differ by more than 1e-5")
    print(f"  mAP {evaluate_rank(plain, **labels)['mAP']:.4f} plain, re-ranked "
          f"{evaluate_rank(ours, **labels)['mAP']:.4f} from embeddings, "
          f"{evaluate_rank(reference, **labels)['mAP']:.4f} from distance matrices")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rerank", action="store_true", help="also time re-ranking at full size")
    parser.add_argument("--dim", type=int, default=512, help="embedding size for --rerank")
    parser.add_argument("--child", choices=("features", "matrices"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rerank_child(args.child, args.dim, args.child_out)
        return
    data = market_like()
    (ours_s, ours), (loop_s, (loop_map, loop_cmc)) = best_in_turns(
        args.runs, [lambda: evaluate_rank(**data), lambda: plain_loop(**data)])
    tracemalloc.start()
    evaluate_rank(**data)
    ours_mem = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert abs(ours["mAP"] - loop_map) < 1e-9 and np.allclose(ours["cmc"], loop_cmc), "results disagree"
    print(f"Market-1501 size: {MARKET['queries']} queries × {MARKET['gallery']} gallery (float32), "
          f"mAP {ours['mAP']:.4f} both ways")
    print(f"  evaluate_rank  {ours_s:7.3f} s   peak memory beyond the distance matrix {ours_mem:6.0f} MiB")
    print(f"  plain loop     {loop_s:7.3f} s")
    print(f"  speed-up       {loop_s / ours_s:7.1f}×")
    if args.rerank:
        rerank_report(args.dim)

if __name__ == "__main__":
    main()
