"""The residual denoiser's share of a run's robustness: test mAP and Rank-1, clean and on a second view of each
test image, with the embedding read before the denoiser (the backbone feature f) and after it (f + D(E(f)), the
run's embedding), and how far each image's second-view embedding lies from its clean one. The second view is
eval.py's Market-1501-C protocol (`--view corrupted`) or train.py's degraded views, every image degraded
(`--view degraded`: the degradations the denoiser was trained to undo).

python studies/denoiser.py --data data/prepared-hard --view degraded runs/placement/resnet18_dae+residual+deg+l2 \
    runs/placement/resnet18_dae+residual+deg+l2_seed1 runs/placement/resnet18_dae+residual+deg+l2_seed2

Each run's figures go to RUN/eval/denoiser_<view>.json; the table (mean ± std over the runs) is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corruptions import CorruptionSettings  # noqa: E402
from degradations import degrade  # noqa: E402
from embedding import ImageList  # noqa: E402
from eval_inputs import split_images, split_labels  # noqa: E402
from metrics import embedding_distance, rank_split  # noqa: E402
from model import DENOISERS, ReIDModel, load_trained  # noqa: E402
from studies.pairings import percent, seed_stats  # noqa: E402
from utils import UserError, setup_logging, write_json  # noqa: E402

STAGES = ("before", "after")  # the backbone feature f; the denoised feature f + D(E(f))
# Embeddings whose retrieval reads the code alone, so the feature before the denoiser ranks the same way.
CODE_EMBEDDINGS = ("mu", "mu-l2")
# The second view of each test image: the benchmark's corruptions, or the training degradations.
VIEWS = ("corrupted", "degraded")


def residual_model(result_dir: Path, device: str) -> ReIDModel:
    """The run's trained model; one that is not a residual denoiser with a code embedding is named."""
    model = load_trained(result_dir, device)
    if model.placement not in DENOISERS or model.embedding not in CODE_EMBEDDINGS:
        raise UserError(f"{result_dir}: trained with --ae-placement {model.placement} --embedding {model.embedding}; "
                        f"expected --ae-placement {' or '.join(DENOISERS)} with --embedding "
                        f"{' or '.join(CODE_EMBEDDINGS)}")
    return model


def degraded_view(seed: int) -> Callable[[Tensor], Tensor]:
    """train.py's degraded view of a normalised batch, every image degraded, drawn from a generator seeded once."""
    generator = torch.Generator().manual_seed(seed)
    return lambda batch: degrade(batch, generator, 1.0)


@torch.no_grad()
def stage_features(model: ReIDModel, images: Sequence, view: Callable[[Tensor], Tensor] | None = None,
                   batch_size: int = 64) -> dict[str, Tensor]:
    """Each image's backbone feature (before) and denoised feature (after), in order, on the CPU; `view` changes
    each loaded batch first."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(ImageList(images, model.img_size), batch_size=batch_size, shuffle=False)
    found: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
    for batch, _, _ in tqdm(loader, desc="features", unit="batch", leave=False):
        feat = model.backbone((batch if view is None else view(batch)).to(device)).float()
        found["before"].append(feat.cpu())
        found["after"].append(model.code(feat).cpu())
    return {stage: torch.cat(parts) for stage, parts in found.items()}


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """The mean cosine similarity of the rows of `a` with the same rows of `b`."""
    return F.cosine_similarity(a, b, dim=1).mean().item()


def ranking(features: Tensor, labels: dict[str, np.ndarray], split: str, prepared: Path) -> dict[str, float]:
    """mAP and Rank-1 of the query rows (the first) against the gallery rows, by eval.py's default distance;
    `labels` holds q_pids, g_pids, q_camids and g_camids."""
    num_query = len(labels["q_pids"])
    distances = embedding_distance(features[:num_query], features[num_query:]).numpy()
    result = rank_split(distances, labels, split, prepared)
    return {"mAP": result["mAP"], "rank1": float(result["cmc"][0])}


def second_view(model: ReIDModel, prepared: Path, split: str, view: str, seed: int) -> dict[str, Tensor]:
    """Both stages' features of the split's second view: corrupted by eval.py's draws (`seed` its
    --corrupt-seed) or degraded as in training (`seed` the generator's)."""
    if view == "degraded":
        return stage_features(model, split_images(prepared, split)[2], degraded_view(seed))
    return stage_features(model, split_images(prepared, split, CorruptionSettings(seed=seed))[2])


def denoiser_figures(model: ReIDModel, prepared: Path, split: str, view: str = "corrupted", seed: int = 0) -> dict:
    """Clean and second-view mAP and Rank-1 before and after the denoiser, the mean clean-to-view cosine of each
    stage, the denoiser's mean correction ‖D(E(f))‖ / ‖f‖ on clean and second-view images, and the mean cosine
    of each stage's second-view feature with the clean backbone feature (the denoiser's training target)."""
    records, num_query, paths = split_images(prepared, split)
    labels = split_labels(records, num_query)
    views = {"clean": stage_features(model, paths), view: second_view(model, prepared, split, view, seed)}
    figures: dict = {stage: {name: ranking(found[stage], labels, split, prepared) for name, found in views.items()}
                     for stage in STAGES}
    for stage in STAGES:
        figures[stage][f"clean_{view}_cosine"] = mean_cosine(views["clean"][stage], views[view][stage])
    figures["correction"] = {name: ((found["after"] - found["before"]).norm(dim=1) /
                                    found["before"].norm(dim=1)).mean().item() for name, found in views.items()}
    # What the denoiser is trained for: the second view's feature carried towards the clean image's backbone feature.
    figures["to_clean_feature"] = {stage: mean_cosine(views[view][stage], views["clean"]["before"]) for stage in STAGES}
    return {"split": split, "view": view, "seed": seed, **figures}


def summary_rows(runs: list[dict], view: str = "corrupted") -> list[tuple[str, ...]]:
    """Per stage: clean mAP, the second view's mAP, the clean-to-view cosine and the view-to-clean-feature cosine,
    each as mean ± std over runs."""
    def cell(values: list[float]) -> str:
        return percent(*seed_stats(values))

    return [(stage, cell([r[stage]["clean"]["mAP"] for r in runs]), cell([r[stage][view]["mAP"] for r in runs]),
             cell([r[stage][f"clean_{view}_cosine"] for r in runs]),
             cell([r["to_clean_feature"][stage] for r in runs])) for stage in STAGES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("runs", type=Path, nargs="+",
        help="result directories of runs trained with --ae-placement residual or residual-apart")
    add("--data", type=Path, required=True, help="the prepared data set the runs were trained on")
    add("--split", default="test", help="the split to rank (test, val, all_vs_all_test or all_vs_all_val)")
    add("--view", choices=VIEWS, default="corrupted",
        help="each test image's second view: eval.py's corruptions (--corrupt all --severity all) or train.py's "
             "degraded views, every image degraded")
    add("--view-seed", type=int, default=0,
        help="the seed of the second view's draws (eval.py's --corrupt-seed for corrupted)")
    add("--device", default="cpu", help="where the models run: cpu, cuda, cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    setup_logging()
    runs = []
    for run in args.runs:
        figures = denoiser_figures(residual_model(run, args.device), args.data, args.split, args.view, args.view_seed)
        write_json(run / "eval" / f"denoiser_{args.view}.json", figures)
        runs.append(figures)
    print(f"| embedding | clean mAP | {args.view} mAP | clean-to-view cosine × 100 | view-to-clean-feature cosine "
          "× 100 |\n|---|---:|---:|---:|---:|")
    for stage, *cells in summary_rows(runs, args.view):
        print(f"| {stage} the denoiser | {' | '.join(cells)} |")
    correction = [seed_stats([100 * r["correction"][name] for r in runs])[0] for name in ("clean", args.view)]
    print(f"mean correction ‖D(E(f))‖ / ‖f‖: {correction[0]:.1f} % clean, {correction[1]:.1f} % {args.view}; the "
          "view-to-clean-feature cosine compares each stage's feature of the view with the clean image's backbone "
          "feature, the denoiser's training target")
    return runs


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
