"""The residual denoiser's share of a run's robustness: test mAP and Rank-1, clean and corrupted by eval.py's
Market-1501-C protocol, with the embedding read before the denoiser (the backbone feature f) and after it
(f + D(E(f)), the run's embedding), and how far each image's corrupted embedding lies from its clean one.

python studies/denoiser.py --data data/prepared-hard runs/placement/resnet18_dae+residual+deg+l2 \
    runs/placement/resnet18_dae+residual+deg+l2_seed1 runs/placement/resnet18_dae+residual+deg+l2_seed2

Each run's figures go to RUN/eval/denoiser.json; the table (mean ± std over the runs) is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corruptions import CorruptedImages, CorruptionSettings, corruption_draws  # noqa: E402
from datasets import load_eval_records  # noqa: E402
from embedding import ImageList  # noqa: E402
from metrics import embedding_distance, evaluate_rank  # noqa: E402
from model import ReIDModel, load_trained  # noqa: E402
from studies.pairings import seed_stats  # noqa: E402
from utils import UserError, setup_logging, write_json  # noqa: E402

STAGES = ("before", "after")  # the backbone feature f; the denoised feature f + D(E(f))
# Embeddings whose retrieval reads the code alone, so the feature before the denoiser ranks the same way.
CODE_EMBEDDINGS = ("mu", "mu-l2")


def residual_model(result_dir: Path, device: str) -> ReIDModel:
    """The run's trained model; one that is not a residual denoiser with a code embedding is named."""
    model = load_trained(result_dir, device)
    if model.placement != "residual" or model.embedding not in CODE_EMBEDDINGS:
        raise UserError(f"{result_dir}: trained with --ae-placement {model.placement} --embedding {model.embedding}; "
                        f"expected --ae-placement residual with --embedding {' or '.join(CODE_EMBEDDINGS)}")
    return model


@torch.no_grad()
def stage_features(model: ReIDModel, images: Sequence, batch_size: int = 64) -> dict[str, Tensor]:
    """Each image's backbone feature (before) and denoised feature (after), in order, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(ImageList(images, model.img_size), batch_size=batch_size, shuffle=False)
    found: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
    for batch, _, _ in tqdm(loader, desc="features", unit="batch", leave=False):
        feat = model.backbone(batch.to(device)).float()
        found["before"].append(feat.cpu())
        found["after"].append(model.code(feat).cpu())
    return {stage: torch.cat(parts) for stage, parts in found.items()}


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """The mean cosine similarity of the rows of `a` with the same rows of `b`."""
    return F.cosine_similarity(a, b, dim=1).mean().item()


def ranking(features: Tensor, pids: np.ndarray, camids: np.ndarray, num_query: int) -> dict[str, float]:
    """mAP and Rank-1 of the first `num_query` rows against the rest, by eval.py's default distance."""
    result = evaluate_rank(embedding_distance(features[:num_query], features[num_query:]).numpy(),
                           pids[:num_query], pids[num_query:], camids[:num_query], camids[num_query:])
    return {"mAP": result["mAP"], "rank1": float(result["cmc"][0])}


def denoiser_figures(model: ReIDModel, prepared: Path, split: str, corruption: CorruptionSettings) -> dict:
    """Clean and corrupted mAP and Rank-1 before and after the denoiser, the mean clean-to-corrupted cosine of
    each stage, and the denoiser's mean correction ‖D(E(f))‖ / ‖f‖ on clean and corrupted images."""
    query, gallery = load_eval_records(prepared, split)
    records = query + gallery
    paths = [r.path for r in records]
    pids, camids = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    views = {"clean": stage_features(model, paths),
             "corrupted": stage_features(model, CorruptedImages(paths, corruption_draws(corruption, len(query),
                                                                                         len(gallery))))}
    figures: dict = {stage: {view: ranking(found[stage], pids, camids, len(query)) for view, found in views.items()}
                     for stage in STAGES}
    for stage in STAGES:
        figures[stage]["clean_corrupted_cosine"] = mean_cosine(views["clean"][stage], views["corrupted"][stage])
    figures["correction"] = {view: ((found["after"] - found["before"]).norm(dim=1) /
                                    found["before"].norm(dim=1)).mean().item() for view, found in views.items()}
    return {"split": split, "corruption": corruption.key(), **figures}


def summary_rows(runs: list[dict]) -> list[tuple[str, str, str, str]]:
    """Per stage: clean mAP, corrupted mAP and the clean-to-corrupted cosine, each as mean ± std over runs."""
    def cell(values: list[float]) -> str:
        mean, std = seed_stats([100 * v for v in values])
        return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"

    return [(stage, cell([r[stage]["clean"]["mAP"] for r in runs]), cell([r[stage]["corrupted"]["mAP"] for r in runs]),
             cell([r[stage]["clean_corrupted_cosine"] for r in runs])) for stage in STAGES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("runs", type=Path, nargs="+", help="result directories of runs trained with --ae-placement residual")
    add("--data", type=Path, required=True, help="the prepared data set the runs were trained on")
    add("--split", default="test", help="the split to rank (test, val, all_vs_all_test or all_vs_all_val)")
    add("--corrupt-seed", type=int, default=0, help="the seed of the corruption draws (eval.py's --corrupt-seed)")
    add("--device", default="cpu", help="where the models run: cpu, cuda, cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    setup_logging()
    corruption = CorruptionSettings(seed=args.corrupt_seed)
    runs = []
    for run in args.runs:
        figures = denoiser_figures(residual_model(run, args.device), args.data, args.split, corruption)
        write_json(run / "eval" / "denoiser.json", figures)
        runs.append(figures)
    print("| embedding | clean mAP | corrupted mAP | clean-to-corrupted cosine × 100 |\n|---|---:|---:|---:|")
    for stage, clean, corrupted, cosine in summary_rows(runs):
        print(f"| {stage} the denoiser | {clean} | {corrupted} | {cosine} |")
    correction = [seed_stats([100 * r["correction"][view] for r in runs])[0] for view in ("clean", "corrupted")]
    print(f"mean correction ‖D(E(f))‖ / ‖f‖: {correction[0]:.1f} % clean, {correction[1]:.1f} % corrupted")
    return runs


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
