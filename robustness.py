"""eval.py's robustness figures: a ranking result in a few numbers, clean and corrupted side by side, and the
--corrupt-grid of every corruption × severity (robustness.json, a heat map robustness.png, robustness.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from corruptions import CorruptionSettings
from eval_inputs import EvaluationInputs, EvaluationOptions, corruption_settings, ranking_distances, split_features
from metrics import rank_split
from utils import LOG, atomic_write_bytes, save_figure, write_json


def ranking_summary(result: dict) -> dict:
    """mAP, mINP, Rank-1/5/10, the CMC curve and the query counts of an evaluate_rank result, for JSON."""
    cmc = result["cmc"]
    return {"mAP": float(result["mAP"]), "mINP": float(result["mINP"]),
            **{f"rank{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)},
            "cmc": {str(k): float(v) for k, v in enumerate(cmc, start=1)},
            "num_valid_queries": int(result["num_valid_queries"]),
            "num_skipped_queries": int(result["num_skipped_queries"])}


def side_by_side(clean: dict, corrupted: dict, key: str) -> str:
    """Clean and corrupted mAP, mINP and CMC as a small text table."""
    lines = [f"  {'':8s} {'clean':>8s}   corrupted ({key})"]
    for name, label in (("mAP", "mAP"), ("mINP", "mINP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"),
                        ("rank10", "Rank-10")):
        if name in clean:
            lines.append(f"  {label:8s} {100 * clean[name]:7.2f}%   {100 * corrupted[name]:7.2f}%")
    return "\n".join(lines)


def corrupted_summary(inputs: EvaluationInputs, options: EvaluationOptions, corruption: CorruptionSettings,
                      **rank_options) -> dict:
    """The split evaluated with its images corrupted by `corruption` (features not cached: a grid has many)."""
    split, embedding = options.data.split, options.embedding
    found = split_features(inputs.model, inputs.settings, inputs.prepared, split, embedding.flip, None,
                           embedding.batch_size, embedding.workers, corruption)
    distances = ranking_distances(found, options.ranking, inputs.device)
    return ranking_summary(rank_split(distances, found, split, inputs.prepared, **rank_options))


def robustness_grid(inputs: EvaluationInputs, options: EvaluationOptions, names: tuple[str, ...],
                    severities: tuple[int, ...], seed: int, **rank_options) -> dict[str, dict[str, dict]]:
    """Every corruption × severity evaluated on its own: grid[name][str(severity)] = ranking summary."""
    grid: dict[str, dict[str, dict]] = {name: {} for name in names}
    cells = [(name, s) for name in names for s in severities]
    for name, s in tqdm(cells, desc="corruption grid", unit="cell"):
        cell = CorruptionSettings((name,), (s,), seed)
        grid[name][str(s)] = corrupted_summary(inputs, options, cell, **rank_options)
    return grid


def grid_markdown(grid: dict[str, dict[str, dict]], clean_map: float, title: str) -> str:
    """The grid's mAP (%) as a markdown table: a row a corruption, a column a severity, and the row mean."""
    severities = list(next(iter(grid.values())))
    lines = [title, "", f"Clean mAP {100 * clean_map:.1f}%.", "",
             "| corruption | " + " | ".join(f"s{s}" for s in severities) + " | mean |",
             "|---|" + "---|" * (len(severities) + 1)]
    for name, row in grid.items():
        maps = [100 * row[s]["mAP"] for s in severities]
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in maps) + f" | {np.mean(maps):.1f} |")
    overall = np.mean([100 * cell["mAP"] for row in grid.values() for cell in row.values()])
    lines.append("| **mean** | " + " | ".join(
        f"{np.mean([100 * row[s]['mAP'] for row in grid.values()]):.1f}" for s in severities) + f" | {overall:.1f} |")
    return "\n".join(lines) + "\n"


def plot_grid(grid: dict[str, dict[str, dict]], clean_map: float, path: Path, title: str) -> None:
    """A heat map of mAP (%) by corruption × severity, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, severities = list(grid), list(next(iter(grid.values())))
    values = np.array([[100 * grid[n][s]["mAP"] for s in severities] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(severities) + 3, 0.32 * len(names) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(100 * clean_map, float(values.max())), aspect="auto")
    ax.set_xticks(range(len(severities)), [f"s{s}" for s in severities])
    ax.set_yticks(range(len(names)), names)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 * image.norm.vmax else "black")
    fig.colorbar(image, ax=ax, label="mAP (%)")
    ax.set_title(f"{title}\nclean mAP {100 * clean_map:.1f}%", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def grid_settings(corruption: CorruptionSettings | None, severity: str, seed: int) -> CorruptionSettings:
    """The grid's corruptions and severities: --corrupt's names (default all) and --severity's severities."""
    return corruption or corruption_settings("all", severity, seed)


def write_grid(inputs: EvaluationInputs, options: EvaluationOptions, chosen: CorruptionSettings, clean: dict,
               out: Path, **rank_options) -> dict:
    """Run the grid over `chosen`'s corruptions × severities, and write its three files."""
    grid = robustness_grid(inputs, options, chosen.names, chosen.severities, chosen.seed, **rank_options)
    split = options.data.split
    title = f"{inputs.settings['backbone']} + {inputs.settings['ae']} on {split}, mAP (%) a corruption × severity"
    write_json(out / "robustness.json", {"clean": clean, "seed": chosen.seed, "grid": grid})
    atomic_write_bytes(out / "robustness.md", grid_markdown(grid, clean["mAP"], title).encode())
    plot_grid(grid, clean["mAP"], out / "robustness.png", title)
    LOG.info("corruption grid in %s (robustness.json, robustness.png, robustness.md)", out)
    return grid
