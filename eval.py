"""Evaluate a trained model on a prepared split: mAP, mINP and CMC by the Market-1501 protocol.

python eval.py --result-dir runs/demo                 # the standard test split, results in runs/demo/eval/
python eval.py --result-dir runs/demo --split val --flip --rerank
python eval.py --result-dir runs/demo --dataset-dir data/domain_b   # cross-domain: runs/demo/eval_<data set name>/
python eval.py --result-dir runs/demo --aqe --rerank  # query expansion, then re-ranking
python eval.py --result-dir runs/demo --corrupt all   # clean and Market-1501-C-corrupted figures side by side
python eval.py --result-dir runs/demo --corrupt-grid  # every corruption × severity: robustness.json/.png/.md

The command line only: ranking metrics live in metrics.py, re-ranking in rerank.py, the Siamese head's scores
in verification.py, the model and the split's features in eval_inputs.py, corrupted figures in
robustness.py. `evaluate_rank`, `re_ranking` and `re_ranking_features` are importable from here too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datasets import manifest_path
from eval_inputs import (
    add_model_flags,
    corrupted_evaluation,
    data_provenance,
    evaluation_options,
    output_dir,
    parse_model_args,
    prepare_evaluation,
    trained_result,
    unaugmented_features,
)
from metrics import AP_MODES, evaluate_rank, rank_split
from rerank import re_ranking, re_ranking_features
from robustness import grid_settings, ranking_summary, side_by_side, write_grid
from utils import LOG, plot_xy, run_script, setup_logging, sha256_file, versions, write_json
from verification import verification_report

__all__ = ["build_parser", "evaluate_rank", "main", "parse_args", "re_ranking", "re_ranking_features"]


def build_parser() -> argparse.ArgumentParser:
    """eval.py's flags: the model and data flags, then the ranking and verification ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--ap-mode", choices=AP_MODES, default="standard",
                        help="standard: non-interpolated AP (torchreid, fast-reid); devkit: Market-1501 devkit's")
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--verify-pairs", type=int, default=4000,
                        help="balanced same/different pairs to score the Siamese head on (0: skip)")
    parser.add_argument("--threshold", type=float, default=0.5, help="same-person probability threshold")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """eval.py's flags; `--flag_name` and `--flag-name` are the same flag."""
    parser = build_parser()
    args = parse_model_args(parser, argv)
    if args.max_rank < 1:
        parser.error(f"--max-rank {args.max_rank}: expected a positive rank")
    if args.verify_pairs == 1 or args.verify_pairs < 0:
        parser.error(f"--verify-pairs {args.verify_pairs}: expected 0 (skip) or at least 2 (one pair of each kind)")
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold {args.threshold}: expected a probability between 0 and 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Evaluate as the flags say: results.json, cmc.png (and the verification and robustness files) in the output
    folder, the figures logged; returns the report."""
    args = parse_args(argv)
    setup_logging()
    options = evaluation_options(args)
    result_dir = trained_result(options.model)
    out = output_dir(options, result_dir)
    inputs = prepare_evaluation(options, result_dir, out)
    settings, prepared, found, distances = inputs.settings, inputs.prepared, inputs.found, inputs.distances
    rank_options = {"max_rank": args.max_rank, "ap_mode": args.ap_mode}
    result = rank_split(distances, found, args.split, prepared, **rank_options)
    cmc = result["cmc"]
    clean = ranking_summary(result)
    report = {
        "split": args.split, **clean, "ap_mode": args.ap_mode,
        "num_query": int(len(found["q_pids"])), "num_gallery": int(len(found["g_pids"])),
        "model": settings, "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "manifest": {"path": str(manifest_path(prepared, args.split)),
                     "sha256": sha256_file(manifest_path(prepared, args.split))},
        "data": data_provenance(options.data, result_dir, prepared),
        "versions": versions(),
    }
    if "classifier" in settings["files"] and args.verify_pairs > 0:
        try:
            report["verification"] = verification_report(inputs.model, unaugmented_features(inputs, options, out),
                                                         args.verify_pairs, args.threshold, out, inputs.device)
        except ValueError as err:
            LOG.warning("warning: no verification metrics: %s", err)
    if args.corruption is not None:
        corrupted = corrupted_evaluation(inputs, options, out, args.corruption)
        report["corrupted"] = {args.corruption.key(): ranking_summary(
            rank_split(corrupted.distances, corrupted.found, args.split, prepared, **rank_options))}
    if args.corrupt_grid:
        report["robustness"] = str(out / "robustness.json")
        chosen = grid_settings(args.corruption, args.severity, args.corrupt_seed)
        write_grid(inputs, options, chosen, clean, out, **rank_options)
    write_json(out / "results.json", report)
    plot_xy(np.arange(1, len(cmc) + 1), cmc, out / "cmc.png", "CMC", "rank", "matching rate",
            f"{settings['backbone']} + {settings['ae']}: mAP {100 * result['mAP']:.1f}%", percent=True)
    log_report(report, args, prepared)
    LOG.info("results in %s", out / "results.json")
    return report


def log_report(report: dict, args: argparse.Namespace, prepared: Path) -> None:
    """The report's figures as eval.py prints them: the split, clean (and corrupted) ranking, the Siamese head."""
    settings = report["model"]
    LOG.info("%s + %s on %s (%d queries, %d skipped, %d gallery)%s%s%s", settings["backbone"], settings["ae"],
             args.split, report["num_query"], report["num_skipped_queries"], report["num_gallery"],
             ", flip" if args.flip else "", ", AQE" if args.aqe else "", ", re-ranked" if args.rerank else "")
    if report["data"]["cross_domain"]:
        LOG.info("  cross-domain: trained on %s (%s), evaluated on %s (%s)", report["data"]["trained_on"]["name"],
                 report["data"]["trained_on"]["root"], report["data"]["evaluated_on"]["name"], prepared)
    if "corrupted" in report:
        key, corrupted_figures = next(iter(report["corrupted"].items()))
        LOG.info("%s", side_by_side(report, corrupted_figures, key))
    else:
        LOG.info("  mAP     %6.2f%%\n  mINP    %6.2f%%", 100 * report["mAP"], 100 * report["mINP"])
        for k in (1, 5, 10):
            if f"rank{k}" in report:
                LOG.info("  Rank-%-2d %6.2f%%", k, 100 * report[f"rank{k}"])
    if "verification" in report:
        v = report["verification"]
        LOG.info("  Siamese head on %d pairs: accuracy %.2f%%, F1 %.3f, ROC AUC %.3f, PR AUC %.3f", v["pairs"],
                 100 * v["accuracy"], v["f1"], v["roc_auc"], v["pr_auc"])


if __name__ == "__main__":
    run_script(main)

