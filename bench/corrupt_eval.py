"""The cost of a Market-1501-C corrupted evaluation against the clean one, measured in the same run.

python bench/corrupt_eval.py --result-dir runs/demo               # the demo's test split, --corrupt all
python bench/corrupt_eval.py --result-dir runs/demo --workers 0   # corruption in the main process

Both evaluations extract every query and gallery feature (no cache) and rank them; the corrupted one also draws
and applies a corruption per image in the loader. Also printed: each corruption's time per image at the split's
stored size (mean over severities), which shows where the extra time goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_inputs  # noqa: E402
from corruptions import CORRUPTIONS, SEVERITIES, CorruptionSettings, corrupt  # noqa: E402
from datasets import load_eval_records, load_image  # noqa: E402
from metrics import rank_split  # noqa: E402
from model import build_trained  # noqa: E402
from utils import resolve_device  # noqa: E402


def timed_evaluation(inputs: eval_inputs.EvaluationInputs, options: eval_inputs.EvaluationOptions,
                     corruption: CorruptionSettings | None) -> tuple[float, float]:
    """Seconds to extract and rank the split (clean or corrupted), and the mAP."""
    start = time.perf_counter()
    split, embedding = options.data.split, options.embedding
    found = eval_inputs.split_features(inputs.model, inputs.settings, inputs.prepared, split, False, None,
                                       embedding.batch_size, embedding.workers, corruption)
    distances = eval_inputs.ranking_distances(found, options.ranking, inputs.device)
    result = rank_split(distances, found, split, inputs.prepared)
    return time.perf_counter() - start, float(result["mAP"])


def per_corruption_ms(prepared: Path, split: str, count: int) -> dict[str, float]:
    """Milliseconds a corruption takes on one of the split's images, averaged over `count` images and severities."""
    query, _ = load_eval_records(prepared, split)
    images = [np.asarray(load_image(record.path)) for record in query[:count]]
    times = {}
    for name in CORRUPTIONS:
        start = time.perf_counter()
        for i, image in enumerate(images):
            for s in SEVERITIES:
                corrupt(image, name, s, seed=i)
        times[name] = 1000 * (time.perf_counter() - start) / (len(images) * len(SEVERITIES))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_inputs.add_model_flags(parser)
    parser.add_argument("--images", type=int, default=8, help="images for the per-corruption times")
    args = eval_inputs.parse_model_args(parser, None)
    corruption = args.corruption or CorruptionSettings(seed=args.corrupt_seed)
    options = eval_inputs.evaluation_options(args)
    result_dir = eval_inputs.trained_result(options.model)
    settings = eval_inputs.model_settings(options.model, result_dir)
    prepared, device = eval_inputs.dataset_root(options.data, result_dir), resolve_device(args.device)
    model = build_trained(settings, device)
    inputs = eval_inputs.EvaluationInputs(settings, prepared, model, device, {}, np.empty(0))
    with torch.no_grad():  # warm-up: the first batches run slow on CPU
        model.embed(torch.zeros(args.batch_size, 3, *settings["img_size"], device=device))
    clean_s, clean_map = timed_evaluation(inputs, options, None)
    corrupt_s, corrupt_map = timed_evaluation(inputs, options, corruption)
    query, gallery = load_eval_records(prepared, args.split)
    print(f"{settings['backbone']} + {settings['ae']} on {args.split}: {len(query)} queries + {len(gallery)} gallery, "
          f"batch {args.batch_size}, {args.workers} loader workers, {device}")
    print(f"  clean evaluation       {clean_s:7.1f} s   mAP {100 * clean_map:5.1f}%")
    print(f"  corrupted ({corruption.key()})  {corrupt_s:7.1f} s   mAP {100 * corrupt_map:5.1f}%")
    print(f"  ratio                  {corrupt_s / clean_s:7.2f}×")
    for name, ms in sorted(per_corruption_ms(prepared, args.split, args.images).items(), key=lambda kv: -kv[1]):
        print(f"    {name:18s} {ms:6.1f} ms an image")


if __name__ == "__main__":
    main()
