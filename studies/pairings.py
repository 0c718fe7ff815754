"""Every backbone × autoencoder pairing trained and evaluated under one budget, over seeds: pairings.md,
pairings.json, pairings.png (mAP heat map) and pairings_robustness.png (clean against corrupted mAP per row).

python studies/pairings.py                                   # the CPU list on the synthetic set -> runs/pairings/
python studies/pairings.py --seed-list --data data/market --epochs 60 --img-size 256 128 --amp   # on a GPU
python studies/pairings.py --aes none dae --variant "dae+degraded=--ae-name dae --degraded-views" --seeds 3

The budget (data, epochs, image size, first seed, latent size, and any other flag, which goes to train.py
unchanged, e.g. --balance gradnorm or --lr 1e-3) is the same for every pairing and recorded in OUT/budget.json.
A row is an autoencoder of --aes or a --variant NAME=FLAGS (train.py flags of its own); each row is trained with
--seeds seeds (the first seed, then the next ones), shown as mean ± sample standard deviation, and a difference
smaller than twice the larger of the two spreads is a tie. A run with results is not re-run; an interrupted
one resumes from its checkpoint. Each run's result directory is OUT/<backbone>_<row> for the first seed and
OUT/<backbone>_<row>_seed<S> for seed S, evaluated by eval.py into its eval/ folder, clean and with
`--corrupt all`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as evaluation  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from model import AE_NAMES  # noqa: E402
from resultdir import ResultDir  # noqa: E402
from utils import (  # noqa: E402
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
CORRUPTED_COLUMNS = ("corrupted_mAP", "corrupted_rank1")
# eval.py's robustness protocol: every query and gallery image a corruption and severity drawn with a fixed seed.
CORRUPT_FLAGS = ["--corrupt", "all", "--severity", "all", "--corrupt-seed", "0"]
# The study's schedule for short budgets (random weights, cosine); a pass-through --config replaces it.
STUDY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study.yaml"
ROW_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


class GridStopped(Exception):
    """Training was asked to stop (Ctrl-C, SIGTERM): the grid stops too, to resume on the next run."""


def build_parser() -> argparse.ArgumentParser:
    """The grid's own flags (any other flag goes to train.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, help="a prepared root (default: the synthetic set in data/prepared, made if missing)")
    add("--out", type=Path, default=Path("runs/pairings"), help="where the runs, pairings.md and pairings.png go")
    add("--backbones", nargs="+", default=list(CPU_BACKBONES), help="backbone names, as train.py's --backbone-name")
    add("--seed-list", action="store_true", help=f"the seed's backbones: {' '.join(SEED_BACKBONES)} (for a GPU)")
    add("--aes", nargs="*", default=list(AE_NAMES), choices=AE_NAMES, metavar="AE",
        help=f"autoencoders, a row each (default all: {' '.join(AE_NAMES)})")
    add("--variant", action="append", default=[], metavar="NAME=FLAGS",
        help="a row of its own: NAME and the train.py flags it adds, e.g. 'dae+degraded=--ae-name dae "
        "--degraded-views' (repeatable)")
    add("--seeds", type=int, default=1, help="seeds a row: --seed, --seed + 1, ...")
    add("--epochs", type=int, default=2)
    add("--img-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    add("--latent-dim", type=int, default=256)
    add("--seed", type=int, default=0)
    add("--split", default="test", help="the split eval.py measures (test, val, all_vs_all_test, all_vs_all_val)")
    add("--workers", type=int, default=1)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The grid's flags, and the rest, which go to train.py."""
    parser = build_parser()
    args, rest = parser.parse_known_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.seed_list:
        args.backbones = list(SEED_BACKBONES)
    for name in ("epochs", "seeds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} {getattr(args, name)}: expected a positive number")
    try:
        args.rows = [(ae, ["--ae-name", ae]) for ae in args.aes] + [parse_variant(text) for text in args.variant]
    except ValueError as err:
        parser.error(str(err))
    names = [name for name, _ in args.rows]
    if len(set(names)) < len(names) or not names:
        parser.error(f"--aes and --variant: expected at least one row and distinct names, got {' '.join(names)}")
    try:
        check_train_flags(rest, "the flags passed on to train.py")
    except ValueError as err:
        parser.error(str(err))
    return args, rest


# train.py flags the grid sets itself for every run: a row or the pass-through flags may not change them (a --seed
# in a row would make every "seed" the same run; --max-steps would stop every run short of its summary).
GRID_FLAGS = ("--data", "--result-dir", "--backbone-name", "--epochs", "--img-size", "--latent-dim", "--seed",
              "--max-steps", "--resume")


def check_train_flags(flags: list[str], what: str) -> None:
    """A ValueError naming `what` when train.py's parser refuses the flags (spelled as normalise_flag_spelling
    leaves them) or they set one of GRID_FLAGS."""
    owned = sorted({f.split("=")[0] for f in flags if f.split("=")[0] in GRID_FLAGS})
    if owned:
        raise ValueError(f"{what}: {' '.join(owned)} is set by the grid for every run (use its own flags)")
    parser = train.build_parser()
    parser.allow_abbrev = False  # an abbreviation such as --see for --seed would slip past GRID_FLAGS
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(flags)
    except SystemExit as err:
        raise ValueError(f"{what}: train.py does not accept the flags {shlex.join(flags)!r} (spelled out in "
                         "full)") from err


def parse_variant(text: str) -> tuple[str, list[str]]:
    """A --variant NAME=FLAGS as (name, train.py flags), the flags checked by check_train_flags."""
    name, _, flags = text.partition("=")
    if not ROW_NAME.fullmatch(name) or not flags.strip():
        raise ValueError(f"--variant {text}: expected NAME=FLAGS, NAME of letters, digits and _.+- "
                         "(e.g. 'dae+degraded=--ae-name dae --degraded-views')")
    split = normalise_flag_spelling(shlex.split(flags))
    check_train_flags(split, f"--variant {text}")
    return name, split


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


def check_rows(out: Path, rows: list[tuple[str, list[str]]]) -> None:
    """Record each row's train.py flags in OUT/rows.json, new rows added, or refuse a row whose name is recorded
    with other flags (its finished runs would be reused as if they were the new row's)."""
    path = out / "rows.json"
    recorded = read_json(path) if path.is_file() else {}
    changed = [name for name, flags in rows if name in recorded and recorded[name] != flags]
    if changed:
        detail = ", ".join(f"{name} was {shlex.join(recorded[name])!r}" for name in changed)
        raise UserError(f"--out {out}: holds rows of the same names trained with other flags ({detail}); "
                        "rename the rows or choose another --out")
    if any(name not in recorded for name, _ in rows):
        write_json(path, {**recorded, **dict(rows)})


def run_dir(out: Path, backbone: str, name: str, seed: int, first_seed: int) -> Path:
    """A run's result directory: OUT/<backbone>_<row>, with _seed<S> for seeds after the first."""
    suffix = "" if seed == first_seed else f"_seed{seed}"
    return out / f"{backbone.replace(':', '_')}_{name}{suffix}"


def train_flags(run: Path, backbone: str, row_flags: list[str], seed: int, budget: dict, workers: int) -> list[str]:
    """train.py's flags for one run: clean batches unless the budget or the row asks for degraded views (train.py's
    default is on; a grid's rows say what they train on), the budget's, then the row's (with --resume when a
    checkpoint is there)."""
    flags = ["--config", str(STUDY_CONFIG), "--data", budget["data"], "--result-dir", str(run),
             "--backbone-name", backbone,
             "--epochs", str(budget["epochs"]), "--img-size", *map(str, budget["img_size"]),
             "--latent-dim", str(budget["latent_dim"]), "--seed", str(seed), "--workers", str(workers),
             "--quiet", "--no-degraded-views", *budget["train_flags"], *row_flags]
    return [*flags, "--resume"] if ResultDir(run).checkpoint_path.is_file() else flags


def run_pairing(out: Path, backbone: str, row: tuple[str, list[str]], seed: int, budget: dict, workers: int) -> dict:
    """Train (or resume) and evaluate one run unless its results exist (evaluate again when corrupted figures
    are missing); return its figures."""
    name, row_flags = row
    run = run_dir(out, backbone, name, seed, budget["seed"])
    results = run / "eval" / "results.json"
    if results.is_file() and "corrupted" in read_json(results):
        LOG.info("%s + %s, seed %d: done already, results in %s", backbone, name, seed, results)
    else:
        if not ResultDir(run).summary_path.is_file():
            LOG.info("%s + %s, seed %d: training into %s", backbone, name, seed, run)
            summary = train.main(train_flags(run, backbone, row_flags, seed, budget, workers))
            if "stopped_at_step" in summary:
                raise GridStopped(f"{backbone} + {name}: training stopped at step {summary['stopped_at_step']}; "
                                  "run again to resume")
        evaluation.main(["--result-dir", str(run), "--split", budget["split"], "--out", str(run / "eval"),
                         "--workers", str(workers), *CORRUPT_FLAGS])
    return {"seed": seed, **run_figures(run)}


def corrupted_figures(report: dict) -> dict:
    """corrupted_mAP and corrupted_rank1 from results.json's `corrupted` entry for --corrupt all (empty without)."""
    entries = report.get("corrupted") or {}
    key = next((k for k in entries if k.startswith("all")), next(iter(entries), None))
    if key is None:
        return {}
    entry = entries[key]
    rank1 = entry.get("rank1", (entry.get("cmc") or {}).get("1"))
    return {"corrupted_mAP": entry["mAP"], **({"corrupted_rank1": rank1} if rank1 is not None else {})}


def run_figures(run: Path) -> dict:
    """One run's figures, read from its result directory."""
    report = read_json(run / "eval" / "results.json")
    result = ResultDir(run)
    summary, config = read_json(result.summary_path), result.config
    return {**{k: report[k] for k in COLUMNS if k in report}, **corrupted_figures(report),
            "train_s": summary["seconds"], "parameters": sum(config["parameters"].values()),
            "embed_dim": config["embed_dim"], "best_val_mAP": summary["best_val_mAP"],
            "ae_name": config["flags"]["ae_name"], "degraded_views": config["flags"].get("degraded_views", False),
            "degrade_prob": config["flags"].get("degrade_prob", 0.5), "augmix": config["flags"].get("augmix", False)}


# ---------------------------------------------------------------------------------------------------------
# Seeds: mean ± spread per row, and the tie rule
# ---------------------------------------------------------------------------------------------------------


def seed_stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1) of a row's seeds; no spread with one seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(a: tuple[float, float | None], b: tuple[float, float | None]) -> str | None:
    """a against b, each (mean, spread): 'tie' when the difference is smaller than twice the larger spread, else
    'better' or 'worse'; None when a spread is unknown (one seed)."""
    if a[1] is None or b[1] is None:
        return None
    difference = a[0] - b[0]
    if difference == 0 or abs(difference) < 2 * max(a[1], b[1]):
        return "tie"
    return "better" if difference > 0 else "worse"


def aggregate(backbone: str, name: str, runs: list[dict]) -> dict:
    """A row of the table: its runs, and mean and spread (<key>_std) of each figure over the seeds that have it."""
    done = [r for r in runs if "mAP" in r]
    row = {"backbone": backbone, "ae": name, "runs": runs, "seeds": [r["seed"] for r in done]}
    if not done:
        return {**row, "error": next((r["error"] for r in runs if "error" in r), "no run")}
    for key in (*COLUMNS, *CORRUPTED_COLUMNS, "train_s", "best_val_mAP"):
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            row[key], row[f"{key}_std"] = seed_stats(values)
    first = done[0]
    return {**row, **{k: first[k] for k in ("parameters", "embed_dim", "ae_name", "degraded_views", "degrade_prob",
                                                "augmix")}}


def baseline_of(row: dict, rows: list[dict]) -> dict | None:
    """The first `none` row of the same backbone trained on the same views: AugMix, degraded (the same share) or
    clean batches."""
    def data(r: dict) -> tuple:
        if r.get("augmix"):
            return ("augmix",)
        return ("degraded", r["degrade_prob"]) if r.get("degraded_views") else ("clean",)

    return next((r for r in rows if "mAP" in r and r["backbone"] == row["backbone"] and r["ae_name"] == "none"
                 and data(r) == data(row)), None)


def cell(row: dict, key: str) -> str:
    """A row's figure in %, with ± its spread over the seeds when there are several."""
    return percent(row[key], row.get(f"{key}_std")) if key in row else "n/a"


def percent(value: float, spread: float | None) -> str:
    """A fraction in %, with ± its spread when there is one."""
    return f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def versus(row: dict, base: dict | None, key: str) -> str:
    """The difference to the baseline row in points, with the tie rule's verdict."""
    if base is None or key not in row or key not in base:
        return "n/a"
    if base is row:
        return "baseline"
    judged = verdict((row[key], row.get(f"{key}_std")), (base[key], base.get(f"{key}_std")))
    return f"{100 * (row[key] - base[key]):+.1f}" + (f" ({judged})" if judged else "")


def table_markdown(rows: list[dict], budget: dict, command: str) -> str:
    """pairings.md: the budget, the command, and a row a pairing (the best mAP, and rows tied with it, in bold)."""
    done = [r for r in rows if "mAP" in r]
    best = max(done, key=lambda r: r["mAP"], default=None)
    seeds = sorted({len(r["seeds"]) for r in done}) or [0]
    lines = [f"# Pairings on {budget['data']} ({budget['split']} split)", "",
             f"Budget: {budget['epochs']} epochs at {budget['img_size'][0]}×{budget['img_size'][1]}, latent "
             f"{budget['latent_dim']}, seeds from {budget['seed']}" + (f", train.py {' '.join(budget['train_flags'])}"
                                                                      if budget["train_flags"] else "") + ".", "",
             f"Command: `{command}`", "",
             "| backbone | row | mAP | Δ mAP vs none | corrupted mAP | Δ corrupted vs none | corrupted Rank-1 | mINP "
             "| Rank-1 | Rank-5 | Rank-10 | seeds | train time | parameters | embedding |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "mAP" not in r:
            lines.append(f"| {r['backbone']} | {r['ae']} | failed: {r.get('error', '')} |||||||||||||")
            continue
        bold = r is best or verdict((r["mAP"], r.get("mAP_std")), (best["mAP"], best.get("mAP_std"))) == "tie"
        mark = "**" if bold else ""
        base = baseline_of(r, rows)
        figures = " | ".join(cell(r, k) for k in COLUMNS[1:])
        lines.append(f"| {r['backbone']} | {r['ae']} | {mark}{cell(r, 'mAP')}{mark} | {versus(r, base, 'mAP')} | "
                     f"{cell(r, 'corrupted_mAP')} | {versus(r, base, 'corrupted_mAP')} | {cell(r, 'corrupted_rank1')} "
                     f"| {figures} | {len(r['seeds'])} | {r['train_s']:.0f} s | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['embed_dim']} |")
    lines += ["", "mAP, mINP and Rank-k in %, by eval.py's Market-1501 protocol; corrupted: eval.py --corrupt all "
              "(n/a where a run lacks them). With several seeds a figure is mean ± sample standard deviation "
              f"(seeds per row: {', '.join(map(str, seeds))}), and a difference smaller than twice the larger spread "
              "is a tie (bold: the best mAP and the rows tied with it). Δ vs none: points against the `none` row "
              "trained on the same views (clean, degraded or AugMix). Train time is the mean last training "
              "session's wall time."]
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
    ax.set_title("mAP (%, mean over seeds)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def plot_robustness(rows: list[dict], path: Path) -> None:
    """pairings_robustness.png: each row as a point, clean mAP (%) across and corrupted mAP (%) up, error bars one
    seed spread each way; rows without corrupted figures are listed under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "mAP" in r and "corrupted_mAP" in r]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, r in enumerate(done):
        ax.errorbar(100 * r["mAP"], 100 * r["corrupted_mAP"], xerr=100 * (r.get("mAP_std") or 0.0),
                    yerr=100 * (r.get("corrupted_mAP_std") or 0.0), fmt="osD^v<>"[i // 10 % 7], capsize=3,
                    color=f"C{i % 10}", label=f"{r['backbone']} {r['ae']}")
    if done:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    missing = [f"{r['backbone']} {r['ae']}" for r in rows if r not in done]
    ax.set_xlabel("clean mAP (%)" + (f"\nno corrupted figures: {', '.join(missing)}" if missing else ""))
    ax.set_ylabel("corrupted mAP (%, eval.py --corrupt all)")
    seeds = max((len(r["seeds"]) for r in done), default=0)
    ax.set_title(f"clean against corrupted mAP per row (mean ± std, up to {seeds} seed{'s' * (seeds != 1)})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(out: Path, rows: list[dict], names: list[str], backbones: list[str], budget: dict,
                  command: str) -> None:
    """pairings.md, pairings.json, the heat map and the robustness plot, from the rows so far."""
    atomic_write_bytes(out / "pairings.md", table_markdown(rows, budget, command).encode())
    write_json(out / "pairings.json", {"budget": budget, "command": command, "rows": rows})
    plot_heat_map(rows, backbones, names, out / "pairings.png")
    plot_robustness(rows, out / "pairings_robustness.png")


def run_row(args: argparse.Namespace, backbone: str, row: tuple[str, list[str]], budget: dict,
            report) -> dict:
    """Every seed of one row (a failure is recorded, not raised); `report` gets the row after each seed."""
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        try:
            runs.append(run_pairing(args.out, backbone, row, seed, budget, args.workers))
        except (UserError, ValueError, RuntimeError) as err:  # one failure does not stop the grid
            LOG.error("%s + %s, seed %d failed: %s", backbone, row[0], seed, err)
            runs.append({"seed": seed, "error": str(err).splitlines()[0]})
        report(aggregate(backbone, row[0], runs))
    return aggregate(backbone, row[0], runs)


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
    check_rows(args.out, args.rows)
    command = "python studies/pairings.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    names = [name for name, _ in args.rows]
    rows: list[dict] = []
    started = time.time()
    for backbone in args.backbones:
        for row in args.rows:
            rows.append(run_row(args, backbone, row, budget, lambda partial: write_outputs(
                args.out, [*rows, partial], names, args.backbones, budget, command)))
    done = [r for r in rows if "mAP" in r]
    if done:
        best = max(done, key=lambda r: r["mAP"])
        LOG.info("%d rows in %.0f s; best %s + %s, mAP %.1f%%; table in %s", len(rows), time.time() - started,
                 best["backbone"], best["ae"], 100 * best["mAP"], args.out / "pairings.md")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (UserError, GridStopped) as err:
        sys.exit(f"error: {err}")
