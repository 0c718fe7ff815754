"""Speed of prepare.py's image check: every image decoded once, by one thread (the reference) and by --workers.

python bench/image_check.py                         # the demo's synthetic set (128×64 JPEGs, as Market-1501's)
python bench/image_check.py --data /path/to/DukeMTMC-reID --workers 8 --json runs/bench/image_check.json

The two settings take turns for --rounds and keep their fastest, so a passing load on a shared machine hurts
neither more than the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare  # noqa: E402
from layouts import find_dataset, find_unreadable, load_parts  # noqa: E402
from utils import write_json  # noqa: E402


def check_seconds(paths: list[str], workers: int) -> float:
    """Seconds find_unreadable takes over `paths` with `workers` threads."""
    start = time.perf_counter()
    find_unreadable(paths, workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a data set folder (default: a fresh synthetic set)")
    parser.add_argument("--workers", type=int, default=prepare.DEFAULT_WORKERS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "synthetic"
        if args.data is None:
            prepare.main(["--synthetic", str(folder), "--quiet"])
        parts = load_parts(find_dataset(folder))
        paths = sorted({r.path for records in parts.values() for r in records})
        best = {1: float("inf"), args.workers: float("inf")}
        for _ in range(args.rounds):
            for workers in best:
                best[workers] = min(best[workers], check_seconds(paths, workers))
    figures = {"images": len(paths), "workers": args.workers,
               **{f"seconds_{w}_threads": s for w, s in best.items()},
               **{f"images_per_s_{w}_threads": len(paths) / s for w, s in best.items()},
               "speed_up": best[1] / best[args.workers]}
    print(f"{len(paths):,} images, fastest of {args.rounds} rounds")
    for workers, seconds in best.items():
        print(f"  {workers} thread{'s' if workers > 1 else ''}: {seconds:6.2f} s, {len(paths) / seconds:8,.0f} images/s"
              f"  ({best[1] / seconds:.2f}× one thread)")
    if args.json is not None:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
