"""Gallery search past a million: faiss exact and IVF indexes against topk.py's exact torch search.

python bench/faiss_search.py                       # 1,000,000 synthetic 512-d embeddings, 200 queries
python bench/faiss_search.py --n 100000 --queries 200 --json runs/bench/faiss_small.json

The embeddings are drawn around --identities centres (a person's images lie close together, as a trained
model's do), unit length. For each method: build seconds, ms a query (wall and CPU time: the machine may be
shared), recall@k against the exact answer, and the index's memory; ratios against faiss's exact IndexFlat,
measured in the same run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import folder_search  # noqa: E402
from utils import write_json  # noqa: E402


def clustered_embeddings(n: int, centres: np.ndarray, noise: float, seed: int, chunk: int = 100_000,
                         pool: int = 65536) -> np.ndarray:
    """n unit-length embeddings, each a random centre plus Gaussian noise (`noise` per coordinate) drawn from a
    pool of `pool` vectors with random signs (drawing a fresh vector each takes minutes at a million), in chunks."""
    rng = np.random.default_rng(seed)
    noises = noise * rng.standard_normal((pool, centres.shape[1]), dtype=np.float32)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        signs = rng.choice(np.array([-1, 1], dtype=np.float32), size=(rows, 1))
        block = centres[rng.integers(0, len(centres), rows)] + signs * noises[rng.integers(0, pool, rows)]
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed(work: Callable[[], object]) -> tuple[object, float, float]:
    """work()'s result with its wall-clock and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found, per query."""
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def side(features: np.ndarray, first_file: int) -> dict:
    """folder_search.py's dict for unlabelled embeddings (file ids never shared by queries and gallery)."""
    n = len(features)
    unlabelled = np.full(n, folder_search.UNLABELLED)
    return {"features": features, "pids": unlabelled, "cams": unlabelled.copy(),
            "files": np.arange(first_file, first_file + n)}


def run_method(name: str, build: Callable[[], object], search: Callable[[object], np.ndarray], nq: int,
               memory: Callable[[object], int]) -> tuple[dict, np.ndarray]:
    """Build and search with one method; its row of figures and its top-k indices."""
    built, build_s, build_cpu = timed(build)
    found, search_s, search_cpu = timed(lambda: search(built))
    row = {"method": name, "build_s": build_s, "build_cpu_s": build_cpu, "ms_per_query": 1000 * search_s / nq,
           "cpu_ms_per_query": 1000 * search_cpu / nq, "memory_mib": memory(built) / 2**20}
    print(f"{name:<28} build {build_s:7.1f} s (CPU {build_cpu:7.1f} s)  {row['ms_per_query']:8.2f} ms/query "
          f"(CPU {row['cpu_ms_per_query']:8.2f})  {row['memory_mib']:8.0f} MiB", flush=True)
    return row, found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags: the embeddings drawn, the search and the IVF cells."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--identities", type=int, default=100_000, help="cluster centres the embeddings lie around")
    parser.add_argument("--noise", type=float, default=0.7,
                        help="spread around a centre: the noise's norm over the centre's (both then normalised)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="IVF cells searched a query")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def compare_methods(args: argparse.Namespace, base: np.ndarray, query: dict, gal: dict) -> list[dict]:
    """faiss's exact index (the reference), topk.py's torch search and IVF at each --nprobe: a row each."""
    flat_bytes = base.nbytes
    ref, exact = run_method("faiss IndexFlatL2 (exact)",
                            lambda: folder_search.faiss_index(base, "euclidean", "faiss", 1, 1),
                            lambda index: folder_search.faiss_topk(index, query, gal, args.k, "euclidean")[0],
                            args.queries, lambda index: flat_bytes)
    rows = [{**ref, "recall": 1.0}]
    row, found = run_method("torch exact_topk (topk.py)", lambda: None,
                            lambda _: folder_search.exact_topk(query, gal, args.k, "euclidean")[0], args.queries,
                            lambda _: flat_bytes)
    rows.append({**row, "recall": recall(found, exact)})
    for nprobe in args.nprobe:
        ivf_bytes = flat_bytes + 8 * args.n + 4 * args.nlist * args.dim  # vectors, ids, centroids
        row, found = run_method(f"faiss IVF{args.nlist},Flat nprobe {nprobe}",
                                lambda p=nprobe: folder_search.faiss_index(base, "euclidean", "faiss-ivf",
                                                                           args.nlist, p),
                                lambda index: folder_search.faiss_topk(index, query, gal, args.k, "euclidean")[0],
                                args.queries, lambda _, b=ivf_bytes: b)
        rows.append({**row, "recall": recall(found, exact)})
    return rows


def print_table(rows: list[dict], k: int) -> None:
    """The rows as a Markdown table, each method's ms a query also as a multiple of the first row's."""
    ref = rows[0]
    print(f"\n| method | build s (CPU s) | ms/query (CPU ms) | × exact's ms | recall@{k} | memory MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['build_s']:.1f} ({r['build_cpu_s']:.1f}) | {r['ms_per_query']:.2f} "
              f"({r['cpu_ms_per_query']:.2f}) | {r['ms_per_query'] / ref['ms_per_query']:.3f} | {r['recall']:.3f} | "
              f"{r['memory_mib']:.0f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    """Draw the embeddings, time each method on them and print the table."""
    args = parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    centres = np.random.default_rng(args.seed).standard_normal((args.identities, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = args.noise / np.sqrt(args.dim)
    base, gen_s, _ = timed(lambda: clustered_embeddings(args.n, centres, sigma, args.seed + 1))
    query = side(clustered_embeddings(args.queries, centres, sigma, args.seed + 2), args.n)
    print(f"{args.n:,} × {args.dim} embeddings around {args.identities:,} centres ({gen_s:.0f} s to draw), "
          f"{args.queries:,} queries, top-{args.k}, {args.threads} threads", flush=True)
    rows = compare_methods(args, base, query, side(base, 0))
    print_table(rows, args.k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {peak:.0f} MiB")
    if args.json:
        write_json(args.json, {"flags": vars(args), "rows": rows, "peak_rss_mib": peak})
    return rows


if __name__ == "__main__":
    main()
