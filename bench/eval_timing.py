"""Evaluation time on a trained model: embedding a split's query and gallery, then ranking them, plain and re-ranked.

python bench/eval_timing.py --result-dir runs/X --device cuda --workers 12 --json F
python bench/eval_timing.py --result-dir runs/demo                     # CPU, the demo's test split

Every flag but --json and --passes goes to eval.py's parser (--result-dir, --split, --flip, --batch-size, --workers,
--device, --k1, ...). The split is embedded --passes times with no cache (the first pass pays the loader's and the
device's start-up, the last is the steady figure), then ranked by eval.py's path twice: the plain distances and
k-reciprocal re-ranking, each followed by the Market-1501 protocol. Times are wall-clock seconds, the device's
queue drained at both ends of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as evaluation  # noqa: E402
from eval_inputs import (  # noqa: E402
    dataset_root,
    evaluation_options,
    model_settings,
    ranking_distances,
    split_features,
    trained_result,
)
from metrics import rank_split  # noqa: E402
from model import build_trained  # noqa: E402
from utils import resolve_device, run_script, setup_logging, versions  # noqa: E402

T = TypeVar("T")


def timed(call: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`call`'s result and its wall-clock seconds, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def measure(args: argparse.Namespace, passes: int) -> dict:
    """Embedding passes, then plain and re-ranked ranking, on the flags' model, split and device."""
    options = evaluation_options(args)
    result_dir = trained_result(options.model)
    settings, prepared = model_settings(options.model, result_dir), dataset_root(options.data, result_dir)
    device = resolve_device(args.device)
    model = build_trained(settings, device)
    embeds = []
    for _ in range(passes):
        found, seconds = timed(lambda: split_features(model, settings, prepared, args.split, args.flip, None,
                                                      args.batch_size, args.workers), device)
        embeds.append(seconds)
    images = len(found["qf"]) + len(found["gf"])
    ranking = {}
    for rerank in (False, True):
        chosen = dataclasses.replace(options.ranking, rerank=rerank)
        distances, distance_s = timed(lambda o=chosen: ranking_distances(found, o, device), device)
        result, protocol_s = timed(lambda d=distances: rank_split(d, found, args.split, prepared), device)
        ranking["re-ranked" if rerank else "plain"] = {
            "distances_s": distance_s, "protocol_s": protocol_s, "mAP": result["mAP"], "rank1": result["cmc"][0]}
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backbone": settings["backbone"], "ae": settings["ae"], "img_size": settings["img_size"],
            "split": args.split, "flip": args.flip, "query": len(found["qf"]), "gallery": len(found["gf"]),
            "images": images, "batch_size": args.batch_size, "workers": args.workers, "embed_s": embeds,
            "embed_images_per_s": images / embeds[-1], "ranking": ranking, "versions": versions()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--passes", type=int, default=2, help="embedding passes (the last is the steady figure)")
    own, rest = parser.parse_known_args(argv)
    if own.passes < 1:
        parser.error(f"--passes {own.passes}: expected a positive number")
    setup_logging()
    result = measure(evaluation.parse_args(rest), own.passes)
    print(f"{result['backbone']} + {result['ae']} on {result['device']}, {result['split']} split: "
          f"{result['query']} query + {result['gallery']} gallery images")
    print(f"  embedding: {', '.join(f'{s:.1f} s' for s in result['embed_s'])} "
          f"({result['embed_images_per_s']:.0f} images/s, last pass)")
    for name, row in result["ranking"].items():
        print(f"  {name:<10} distances {row['distances_s']:7.2f} s, protocol {row['protocol_s']:6.2f} s: "
              f"mAP {100 * row['mAP']:.1f}%, Rank-1 {100 * row['rank1']:.1f}%")
    if own.json:
        own.json.parent.mkdir(parents=True, exist_ok=True)
        own.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"  figures in {own.json}")
    return result


if __name__ == "__main__":
    run_script(main)
