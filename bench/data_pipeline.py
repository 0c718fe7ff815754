"""Speed of the data side: the synthetic generator, decoding, and decode + training transforms, in one run.

python bench/data_pipeline.py                    # the demo's synthetic set (100 + 100 identities, 128×64)
python bench/data_pipeline.py --size 256 128 --json runs/bench/data.json
python bench/data_pipeline.py --preset hard      # another preset of synthetic.py, at its own sizes

The transforms are timed against bare decoding (open, decode, RGB) of the same images, so the ratio says what
augmentation costs. The set is also scored by a raw-pixel nearest-neighbour baseline (flattened pixels, each
image centred and scaled to unit norm, Euclidean) against chance (random distances): a synthetic set worth
training on sits well above chance and well below 50% mAP.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import ReIDDataset, build_transforms, load_image, load_market  # noqa: E402
from metrics import evaluate_rank, pairwise_distance  # noqa: E402
from synthetic import PRESETS, preset_config, write_synthetic  # noqa: E402
from utils import write_json  # noqa: E402


def timed(fn) -> tuple[float, object]:
    """Seconds one call takes, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def pixel_vectors(paths: list[str], size: tuple[int, int]) -> torch.Tensor:
    """Each image resized to `size`, flattened, centred and scaled to unit norm."""
    rows = [np.asarray(load_image(p).resize((size[1], size[0])), dtype=np.float32).ravel() for p in paths]
    pixels = torch.from_numpy(np.stack(rows))
    pixels = pixels - pixels.mean(dim=1, keepdim=True)
    return torch.nn.functional.normalize(pixels, dim=1)


def pixel_baseline(root: Path, size: tuple[int, int], chance_draws: int = 5) -> dict[str, float]:
    """Query → gallery mAP and Rank-1 of raw-pixel nearest neighbours, and of random distances (chance)."""
    parts = load_market(root)
    query, gallery = parts["query"], parts["gallery"]
    ids = [np.array([getattr(r, key) for r in records]) for records in (query, gallery) for key in ("pid", "camid")]
    q_pids, q_camids, g_pids, g_camids = ids
    distances = pairwise_distance(pixel_vectors([r.path for r in query], size),
                                  pixel_vectors([r.path for r in gallery], size)).numpy()
    pixels = evaluate_rank(distances, q_pids, g_pids, q_camids, g_camids)
    rng = np.random.default_rng(0)
    chance = [evaluate_rank(rng.random(distances.shape), q_pids, g_pids, q_camids, g_camids)
              for _ in range(chance_draws)]
    return {"pixel_mAP": float(pixels["mAP"]), "pixel_rank1": float(pixels["cmc"][0]),
            "chance_mAP": float(np.mean([c["mAP"] for c in chance])),
            "chance_rank1": float(np.mean([c["cmc"][0] for c in chance])),
            "queries": len(query), "gallery": len(gallery)}


def images_per_second(dataset: ReIDDataset, count: int) -> float:
    """Items a second fetched one by one, as a loader worker does."""
    seconds, _ = timed(lambda: [dataset[(i % len(dataset), i)] for i in range(count)])
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default")
    parser.add_argument("--train-ids", type=int, default=None, help="default: the preset's")
    parser.add_argument("--test-ids", type=int, default=None, help="default: the preset's")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=2000, help="images to decode and transform")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's view
    ids = {name: getattr(args, name) for name in ("train_ids", "test_ids") if getattr(args, name) is not None}
    config = preset_config(args.preset, **ids, height=args.size[0], width=args.size[1])
    with tempfile.TemporaryDirectory() as folder:
        generate_s, counts = timed(lambda: write_synthetic(folder, config, progress=False))
        generated = sum(counts.values())
        records = load_market(folder)["train"]
        paths = [r.path for r in records]
        decode_s, _ = timed(lambda: [load_image(paths[i % len(paths)]) for i in range(args.images)])
        train_rate = images_per_second(ReIDDataset(records, build_transforms(tuple(args.size), True)), args.images)
        test_rate = images_per_second(ReIDDataset(records, build_transforms(tuple(args.size), False)), args.images)
        baseline = pixel_baseline(Path(folder), tuple(args.size))
    decode_rate = args.images / decode_s
    figures = {"preset": args.preset, "size": list(args.size), "generated_images": generated, "generate_s": generate_s,
               "generate_images_per_s": generated / generate_s, "decode_images_per_s": decode_rate,
               "train_transform_images_per_s": train_rate, "test_transform_images_per_s": test_rate, **baseline}
    print(f"synthetic set '{args.preset}', {config.train_ids} + {config.test_ids} identities at "
          f"{args.size[0]}×{args.size[1]}, one thread")
    print(f"  generator                       {generated / generate_s:8.0f} images/s  ({generated} images in "
          f"{generate_s:.1f} s)")
    print(f"  decode only (reference)         {decode_rate:8.0f} images/s")
    print(f"  decode + training transforms    {train_rate:8.0f} images/s  ({train_rate / decode_rate:.2f}× decode)")
    print(f"  decode + test transforms        {test_rate:8.0f} images/s  ({test_rate / decode_rate:.2f}× decode)")
    print(f"  raw-pixel nearest neighbour     mAP {100 * baseline['pixel_mAP']:.1f}%, Rank-1 "
          f"{100 * baseline['pixel_rank1']:.1f}% ({baseline['queries']} queries, {baseline['gallery']} gallery)")
    print(f"  chance (random distances)       mAP {100 * baseline['chance_mAP']:.1f}%, Rank-1 "
          f"{100 * baseline['chance_rank1']:.1f}%")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
