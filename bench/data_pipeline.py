"""Speed of the data side: the synthetic generator, decoding, decode + training transforms, and the training
loader both ways (--loader pil and tensor), in one run.

python bench/data_pipeline.py                    # the demo's synthetic set (100 + 100 identities, 128×64)
python bench/data_pipeline.py --json runs/bench/data.json --img-size 256 128
python bench/data_pipeline.py --preset hard      # another preset of synthetic.py, at its own sizes

The training loader is timed over the same P×K batches at --img-size (default 256×128) both ways: `pil`, the
images decoded and augmented one by one in --workers processes (train_loader), and `batched`, the set decoded once
into one uint8 tensor (tensor_loader.decode_records, its seconds reported apart) and augmented a batch at a time in as
many torch threads. The two take turns for --rounds rounds (default 3; each round starts with the other one, as the
host's speed drifts); each figure is its median round, the ratio the median of the rounds' ratios. Besides images/s
it reports CPU seconds an image (the processes' user + system time, workers included), which a busy shared machine
inflates less than wall time.

The transforms are timed against bare decoding (open, decode, RGB) of the same images, so the ratio says what
augmentation costs. The set is also scored by a raw-pixel nearest-neighbour baseline (flattened pixels, each
image centred and scaled to unit norm, Euclidean) against chance (random distances): a synthetic set worth
training on sits well above chance and well below 50% mAP.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import PKSampler, ReIDDataset, build_transforms, load_image, train_loader  # noqa: E402
from layouts import load_market  # noqa: E402
from metrics import evaluate_rank, pairwise_distance  # noqa: E402
from synthetic import PRESETS, SyntheticConfig, preset_config, write_synthetic  # noqa: E402
from tensor_loader import DecodedTrainLoader, decode_records  # noqa: E402
from utils import rotated, write_json  # noqa: E402


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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (the loader's workers once joined)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def batches_per_second(make_loader, sampler: PKSampler, batches: int) -> tuple[float, float]:
    """(batches a second, CPU seconds a batch) over `batches` batches drawn epoch after epoch, workers joined."""
    cpu_start, start, seen, epoch = cpu_seconds(), time.perf_counter(), 0, 0
    loader = make_loader()
    while seen < batches:
        epoch += 1
        sampler.set_epoch(epoch)
        for _ in zip(range(batches - seen), loader, strict=False):
            seen += 1
    wall = time.perf_counter() - start
    del loader
    gc.collect()  # the workers exit and are reaped, so their CPU time counts
    return batches / wall, (cpu_seconds() - cpu_start) / batches


def loader_rates(records, img_size: tuple[int, int], workers: int, batches: int, rounds: int) -> dict[str, float]:
    """The training loader's images/s and CPU seconds an image, --loader pil against the decoded tensor's: the
    two take turns for `rounds` rounds (each round starting with the other), each figure its median round and the
    ratio the median of the rounds' ratios."""
    sampler = PKSampler([r.label for r in records], 16, 4, seed=0)
    batch = 16 * 4
    torch.set_num_threads(max(1, workers))  # the same cores as the workers have
    cpu_start, start = cpu_seconds(), time.perf_counter()
    store = decode_records(records, img_size, workers, torch.device("cpu"), progress=False)
    decode_s, decode_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    ways = {"pil": (1, lambda: train_loader(records, build_transforms(img_size, True), sampler, workers)),
            "batched": (max(1, workers), lambda: DecodedTrainLoader(store, records, sampler, 0.5, False,
                                                                    torch.device("cpu")))}
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for round_ in range(rounds):
        for name in rotated(list(ways), round_):
            threads, make_loader = ways[name]
            torch.set_num_threads(threads)
            measured[name].append(batches_per_second(make_loader, sampler, batches))
    torch.set_num_threads(1)
    (pil_rate, pil_cpu), (rate, cpu) = ((statistics.median(m[0] for m in measured[name]),
                                         statistics.median(m[1] for m in measured[name])) for name in ways)
    ratios = [b[0] / p[0] for p, b in zip(measured["pil"], measured["batched"], strict=True)]
    return {"img_size": list(img_size), "workers": workers, "loader_images": batches * batch, "rounds": rounds,
            "pil_images_per_s": pil_rate * batch, "pil_cpu_ms_per_image": 1e3 * pil_cpu / batch,
            "batched_images_per_s": rate * batch, "batched_cpu_ms_per_image": 1e3 * cpu / batch,
            "decode_once_s": decode_s, "decode_once_cpu_s": decode_cpu, "decoded_images": len(records),
            "batched_over_pil": statistics.median(ratios), "batched_over_pil_each_round": ratios}


def parse_args() -> argparse.Namespace:
    """The benchmark's flags: the synthetic set, the images timed and the loaders' rounds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default")
    parser.add_argument("--train-ids", type=int, default=None, help="default: the preset's")
    parser.add_argument("--test-ids", type=int, default=None, help="default: the preset's")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=2000, help="images to decode and transform")
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"),
                        help="the training loaders' input size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="pil's loader processes, and the batched path's torch threads (default: the cores)")
    parser.add_argument("--batches", type=int, default=40, help="16×4 batches each training loader draws a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the two loaders, taking turns")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def measure(args: argparse.Namespace, config: SyntheticConfig) -> dict:
    """Generate the set in a temporary folder and time decoding, transforms and the two training loaders."""
    torch.set_num_threads(1)  # one loader worker's view
    with tempfile.TemporaryDirectory() as folder:
        generate_s, counts = timed(lambda: write_synthetic(folder, config, progress=False))
        generated = sum(counts.values())
        records = load_market(folder)["train"]
        paths = [r.path for r in records]
        decode_s, _ = timed(lambda: [load_image(paths[i % len(paths)]) for i in range(args.images)])
        train_rate = images_per_second(ReIDDataset(records, build_transforms(tuple(args.size), True)), args.images)
        test_rate = images_per_second(ReIDDataset(records, build_transforms(tuple(args.size), False)), args.images)
        baseline = pixel_baseline(Path(folder), tuple(args.size))
        loaders = loader_rates(records, tuple(args.img_size), args.workers, args.batches, args.rounds)
    decode_rate = args.images / decode_s
    return {"preset": args.preset, "size": list(args.size), "generated_images": generated, "generate_s": generate_s,
            "generate_images_per_s": generated / generate_s, "decode_images_per_s": decode_rate,
            "train_transform_images_per_s": train_rate, "test_transform_images_per_s": test_rate,
            **baseline, **loaders}


def print_figures(args: argparse.Namespace, config: SyntheticConfig, f: dict) -> None:
    """The figures f as lines: rates of the synthetic set's stages, then of the two loaders."""
    generated, generate_s, decode_rate = f["generated_images"], f["generate_s"], f["decode_images_per_s"]
    train_rate, test_rate = f["train_transform_images_per_s"], f["test_transform_images_per_s"]
    print(f"synthetic set '{args.preset}', {config.train_ids} + {config.test_ids} identities at "
          f"{args.size[0]}×{args.size[1]}, one thread")
    print(f"  generator                       {generated / generate_s:8.0f} images/s  ({generated} images in "
          f"{generate_s:.1f} s)")
    print(f"  decode only (reference)         {decode_rate:8.0f} images/s")
    print(f"  decode + training transforms    {train_rate:8.0f} images/s  ({train_rate / decode_rate:.2f}× decode)")
    print(f"  decode + test transforms        {test_rate:8.0f} images/s  ({test_rate / decode_rate:.2f}× decode)")
    print(f"  raw-pixel nearest neighbour     mAP {100 * f['pixel_mAP']:.1f}%, Rank-1 "
          f"{100 * f['pixel_rank1']:.1f}% ({f['queries']} queries, {f['gallery']} gallery)")
    print(f"  chance (random distances)       mAP {100 * f['chance_mAP']:.1f}%, Rank-1 "
          f"{100 * f['chance_rank1']:.1f}%")
    print(f"training loader, 16×4 batches at {args.img_size[0]}×{args.img_size[1]}, {args.workers} workers or threads, "
          f"median of {args.rounds} rounds in turns")
    print(f"  pil (decode + transforms a sample) {f['pil_images_per_s']:8.0f} images/s  "
          f"{f['pil_cpu_ms_per_image']:.2f} CPU ms an image")
    print(f"  batched (decoded tensor)           {f['batched_images_per_s']:8.0f} images/s  "
          f"{f['batched_cpu_ms_per_image']:.2f} CPU ms an image  ({f['batched_over_pil']:.1f}× pil; "
          f"rounds {', '.join(f'{r:.1f}' for r in f['batched_over_pil_each_round'])})")
    print(f"  decoding once                      {f['decoded_images']} images in "
          f"{f['decode_once_s']:.1f} s "
          f"({f['decode_once_cpu_s']:.1f} CPU s)")


def main() -> None:
    """Measure the data pipeline on a fresh synthetic set and print the figures."""
    args = parse_args()
    ids = {name: getattr(args, name) for name in ("train_ids", "test_ids") if getattr(args, name) is not None}
    config = preset_config(args.preset, **ids, height=args.size[0], width=args.size[1])
    figures = measure(args, config)
    print_figures(args, config, figures)
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
