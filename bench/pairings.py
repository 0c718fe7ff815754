"""Every backbone × autoencoder pairing trained and evaluated under one budget: pairings.md and pairings.png.

python bench/pairings.py                                   # the CPU list on the synthetic set -> runs/pairings/
python bench/pairings.py --seed-list --data data/market --epochs 60 --img-size 256 128 --amp   # on a GPU

The budget (data, epochs, image size, seed, latent size, and any other flag, which goes to train.py unchanged,
e.g. --balance gradnorm or --lr 1e-3) is the same for every pairing and recorded in OUT/budget.json. A pairing
with results is not re-run; an interrupted one resumes from its checkpoint. Each pairing's result directory is
OUT/<backbone>_<ae>, evaluated by eval.py into OUT/<backbone>_<ae>/eval/.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as evaluation  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from model import AE_NAMES  # noqa: E402
from utils import (  # noqa: E402
    CHECKPOINT_FILE,
    LOG,
    UserError,
    atomic_write_bytes,
    normalise_flag_spelling,
    read_json,
    save_figure,
    setup_logging,
    write_json,
)

# The small member of each family, for a CPU; the seed's list needs a GPU.
CPU_BACKBONES = ("resnet18", "densenet121", "vgg11_bn", "swin_t")
SEED_BACKBONES = ("resnet152", "densenet121", "vgg16", "swin_b")
SYNTHETIC = (Path("data/synthetic"), Path("data/prepared"))  # the set `make demo` makes
COLUMNS = ("mAP", "mINP", "rank1", "rank5", "rank10")


class GridStopped(Exception):
    """Training was asked to stop (Ctrl-C, SIGTERM): the grid stops too, to resume on the next run."""


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The grid's flags, and the rest, which go to train.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, help="a prepared root (default: the synthetic set in data/prepared, made if missing)")
    add("--out", type=Path, default=Path("runs/pairings"), help="where the runs, pairings.md and pairings.png go")
    add("--backbones", nargs="+", default=list(CPU_BACKBONES), help="backbone names, as train.py's --backbone-name")
    add("--seed-list", action="store_true", help=f"the seed's backbones: {' '.join(SEED_BACKBONES)} (for a GPU)")
    add("--aes", nargs="+", default=list(AE_NAMES), choices=AE_NAMES, metavar="AE",
        help=f"autoencoders (default all: {' '.join(AE_NAMES)})")
    add("--epochs", type=int, default=2)
    add("--img-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    add("--latent-dim", type=int, default=256)
    add("--seed", type=int, default=0)
    add("--split", default="test", help="the split eval.py measures (test, val, seed_test, seed_val)")
    add("--workers", type=int, default=1)
    args, rest = parser.parse_known_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.seed_list:
        args.backbones = list(SEED_BACKBONES)
    if args.epochs <= 0:
        parser.error(f"--epochs {args.epochs}: expected a positive number")
    return args, rest


def budget_record(args: argparse.Namespace, data: Path, train_flags: list[str]) -> dict:
    """What every pairing shares; a grid folder holds pairings of one budget only."""
    return {"data": str(data), "epochs": args.epochs, "img_size": list(args.img_size), "seed": args.seed,
            "latent_dim": args.latent_dim, "split": args.split, "train_flags": train_flags}


def check_budget(out: Path, budget: dict) -> None:
    """Record the budget in OUT/budget.json, or refuse one that differs from the recorded one."""
    path = out / "budget.json"
    if path.is_file():
        found = read_json(path)
        changed = sorted(k for k in set(found) | set(budget) if found.get(k) != budget.get(k))
        if changed:
            detail = ", ".join(f"{k} was {found.get(k)}" for k in changed)
            raise UserError(f"--out {out}: holds pairings trained under another budget ({detail}); "
                            "choose another --out")
    else:
        write_json(path, budget)


def run_dir(out: Path, backbone: str, ae: str) -> Path:
    """A pairing's result directory."""
    return out / f"{backbone.replace(':', '_')}_{ae}"


def train_flags(run: Path, backbone: str, ae: str, budget: dict, workers: int) -> list[str]:
    """train.py's flags for one pairing (with --resume when a checkpoint is there)."""
    flags = ["--data", budget["data"], "--result-dir", str(run), "--backbone-name", backbone, "--ae-name", ae,
             "--epochs", str(budget["epochs"]), "--img-size", *map(str, budget["img_size"]),
             "--latent-dim", str(budget["latent_dim"]), "--seed", str(budget["seed"]), "--workers", str(workers),
             "--quiet", *budget["train_flags"]]
    return [*flags, "--resume"] if (run / CHECKPOINT_FILE).is_file() else flags


def run_pairing(out: Path, backbone: str, ae: str, budget: dict, workers: int) -> dict:
    """Train (or resume) and evaluate one pairing unless its results exist; return its row of the table."""
    run = run_dir(out, backbone, ae)
    results = run / "eval" / "results.json"
    if results.is_file():
        LOG.info("%s + %s: done already, results in %s", backbone, ae, results)
    else:
        if not (run / "summary.json").is_file():
            LOG.info("%s + %s: training into %s", backbone, ae, run)
            summary = train.main(train_flags(run, backbone, ae, budget, workers))
            if "stopped_at_step" in summary:
                raise GridStopped(f"{backbone} + {ae}: training stopped at step {summary['stopped_at_step']}; "
                                  "run again to resume")
        evaluation.main(["--all-dir", str(run), "--split", budget["split"], "--out", str(run / "eval"),
                         "--workers", str(workers)])
    return pairing_row(run, backbone, ae)


def pairing_row(run: Path, backbone: str, ae: str) -> dict:
    """One pairing's figures, read from its result directory."""
    report = read_json(run / "eval" / "results.json")
    summary, config = read_json(run / "summary.json"), read_json(run / "config.json")
    return {"backbone": backbone, "ae": ae, **{k: report[k] for k in COLUMNS if k in report},
            "train_s": summary["seconds"], "parameters": sum(config["parameters"].values()),
            "embed_dim": config["embed_dim"], "best_val_mAP": summary["best_val_mAP"]}


def table_markdown(rows: list[dict], budget: dict, command: str) -> str:
    """pairings.md: the budget, the command, and a row a pairing (the best mAP in bold)."""
    done = [r for r in rows if "mAP" in r]
    best = max((r["mAP"] for r in done), default=None)
    lines = [f"# Pairings on {budget['data']} ({budget['split']} split)", "",
             f"Budget: {budget['epochs']} epochs at {budget['img_size'][0]}×{budget['img_size'][1]}, latent "
             f"{budget['latent_dim']}, seed {budget['seed']}" + (f", train.py {' '.join(budget['train_flags'])}"
                                                                  if budget["train_flags"] else "") + ".", "",
             f"Command: `{command}`", "",
             "| backbone | autoencoder | mAP | mINP | Rank-1 | Rank-5 | Rank-10 | train time | parameters | "
             "embedding |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "mAP" not in r:
            lines.append(f"| {r['backbone']} | {r['ae']} | failed: {r.get('error', '')} |||||||")
            continue
        mark = "**" if r["mAP"] == best else ""
        figures = " | ".join(f"{100 * r[k]:.1f}" if k in r else "n/a" for k in COLUMNS[1:])
        lines.append(f"| {r['backbone']} | {r['ae']} | {mark}{100 * r['mAP']:.1f}{mark} | {figures} | "
                     f"{r['train_s']:.0f} s | {r['parameters'] / 1e6:.1f} M | {r['embed_dim']} |")
    lines += ["", "mAP, mINP and Rank-k in %, by eval.py's Market-1501 protocol; train time is the last "
              "training session's wall time (all of it unless the pairing was resumed)."]
    return "\n".join(lines) + "\n"


def plot_heat_map(rows: list[dict], backbones: list[str], aes: list[str], path: Path) -> None:
    """pairings.png: mAP (%) of each backbone (row) × autoencoder (column), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    found = {(r["backbone"], r["ae"]): 100 * r["mAP"] for r in rows if "mAP" in r}
    grid = np.array([[found.get((b, a), np.nan) for a in aes] for b in backbones])
    fig, ax = plt.subplots(figsize=(1.3 * len(aes) + 2.5, 0.7 * len(backbones) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(aes)), aes)
    ax.set_yticks(range(len(backbones)), backbones)
    middle = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, "failed" if np.isnan(value) else f"{value:.1f}", ha="center", va="center",
                color="white" if np.isnan(value) or value < middle else "black")
    ax.set_xlabel("autoencoder")
    ax.set_title("mAP (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args, rest = parse_args(argv)
    setup_logging()
    data = args.data
    if data is None:
        data = SYNTHETIC[1]
        prepare.main(["--synthetic", str(SYNTHETIC[0]), "--out", str(data), "--val-ids", "20", "--quiet"])
    budget = budget_record(args, data, rest)
    args.out.mkdir(parents=True, exist_ok=True)
    check_budget(args.out, budget)
    command = "python bench/pairings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    started = time.time()
    for backbone in args.backbones:
        for ae in args.aes:
            try:
                rows.append(run_pairing(args.out, backbone, ae, budget, args.workers))
            except (UserError, ValueError, RuntimeError) as err:  # one failure does not stop the grid
                LOG.error("%s + %s failed: %s", backbone, ae, err)
                rows.append({"backbone": backbone, "ae": ae, "error": str(err).splitlines()[0]})
            atomic_write_bytes(args.out / "pairings.md", table_markdown(rows, budget, command.strip()).encode())
            plot_heat_map(rows, args.backbones, args.aes, args.out / "pairings.png")
    done = [r for r in rows if "mAP" in r]
    if done:
        best = max(done, key=lambda r: r["mAP"])
        LOG.info("%d pairings in %.0f s; best %s + %s, mAP %.1f%%; table in %s", len(rows), time.time() - started,
                 best["backbone"], best["ae"], 100 * best["mAP"], args.out / "pairings.md")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (UserError, GridStopped) as err:
        sys.exit(f"error: {err}")
