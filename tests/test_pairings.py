"""studies/pairings.py: a grid of backbone × autoencoder pairings, its table and heat map, and resuming it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from utils import UserError, read_json, write_json

sys.path.insert(0, str(ROOT / "studies"))
import pairings  # noqa: E402

GRID = ["--backbones", "resnet18", "vgg11", "--aes", "none", "vae", "--epochs", "1", "--img-size", "64", "32",
        "--latent-dim", "32", "--workers", "0", "--batch-p", "4", "--batch-k", "2", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def grid(synthetic_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 2 × 2 grid, one epoch of 9 steps each on the tiny synthetic set."""
    out = tmp_path_factory.mktemp("pairings")
    rows = pairings.main(["--data", str(synthetic_prepared), "--out", str(out), *GRID])
    return out, rows


def test_every_pairing_has_a_row_and_a_heat_map_cell(grid: tuple[Path, list[dict]]):
    out, rows = grid
    assert [(r["backbone"], r["ae"]) for r in rows] == [("resnet18", "none"), ("resnet18", "vae"),
                                                         ("vgg11", "none"), ("vgg11", "vae")]
    for row in rows:
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "train_s", "parameters", "embed_dim"):
            assert key in row, (row["backbone"], row["ae"], key)
        assert 0 <= row["mINP"] <= 1 and 0 <= row["mAP"] <= 1 and row["rank1"] <= row["rank5"] <= row["rank10"]
    # none keeps the backbone's feature (512 for resnet18 and vgg11); vae embeds in --latent-dim.
    assert [r["embed_dim"] for r in rows] == [512, 32, 512, 32]
    table = (out / "pairings.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| resnet18") or line.startswith("| vgg11")]
    assert len(lines) == 4 and not any("failed" in line for line in lines)
    assert "| resnet18 | vae |" in table and "--batch-p 4" in table  # the train.py flags are in the budget
    best = max(rows, key=lambda r: r["mAP"])
    assert f"| {best['backbone']} | {best['ae']} | **{100 * best['mAP']:.1f}**" in table
    with Image.open(out / "pairings.png") as image:
        assert image.size[0] > 200 and image.size[1] > 100
    assert read_json(out / "budget.json")["epochs"] == 1


def test_a_second_run_skips_finished_pairings(grid: tuple[Path, list[dict]], synthetic_prepared: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    out, rows = grid

    def refuse(*args, **kwargs):
        raise AssertionError("a finished pairing was run again")

    monkeypatch.setattr(pairings.train, "main", refuse)
    monkeypatch.setattr(pairings.evaluation, "main", refuse)
    assert pairings.main(["--data", str(synthetic_prepared), "--out", str(out), *GRID]) == rows


def test_an_interrupted_pairing_resumes_and_only_missing_ones_run(grid: tuple[Path, list[dict]],
                                                                  synthetic_prepared: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    out, _ = grid
    calls = []
    real = pairings.train.main
    monkeypatch.setattr(pairings.train, "main", lambda argv: calls.append(argv) or real(argv))
    (out / "vgg11_vae" / "eval" / "results.json").unlink()
    (out / "vgg11_vae" / "summary.json").unlink()  # as if stopped after its last checkpoint
    rows = pairings.main(["--data", str(synthetic_prepared), "--out", str(out), *GRID])
    assert len(calls) == 1 and "vgg11" in calls[0] and "--resume" in calls[0]
    assert "mAP" in rows[-1]


def test_another_budget_in_the_same_folder_is_refused(grid: tuple[Path, list[dict]], synthetic_prepared: Path):
    out, _ = grid
    with pytest.raises(UserError, match=r"--out .*another budget \(epochs was 1\)"):
        pairings.main(["--data", str(synthetic_prepared), "--out", str(out), *GRID[:6], "--epochs", "2", *GRID[8:]])


def test_the_seed_list_is_one_flag_away():
    args, rest = pairings.parse_args(["--seed-list", "--balance", "gradnorm"])
    assert args.backbones == ["resnet152", "densenet121", "vgg16", "swin_b"]
    assert args.aes == ["none", "ae", "vae", "sae", "dae"] and rest == ["--balance", "gradnorm"]


# ---------------------------------------------------------------------------------------------------------
# Seeds, variants, corrupted columns (issue 13)
# ---------------------------------------------------------------------------------------------------------

def test_seed_statistics_are_the_mean_and_sample_deviation():
    mean, spread = pairings.seed_stats([0.80, 0.84, 0.88])
    assert mean == pytest.approx(0.84) and spread == pytest.approx(0.04)  # √((0.04² + 0 + 0.04²) / 2)
    assert pairings.seed_stats([0.5]) == (0.5, None)


def test_a_difference_under_twice_the_larger_spread_is_a_tie():
    assert pairings.verdict((0.84, 0.04), (0.80, 0.01)) == "tie"  # 0.04 < 2 × 0.04
    assert pairings.verdict((0.90, 0.01), (0.80, 0.02)) == "better"  # 0.10 ≥ 2 × 0.02
    assert pairings.verdict((0.80, 0.02), (0.90, 0.01)) == "worse"
    assert pairings.verdict((0.85, 0.0), (0.85, 0.0)) == "tie"
    assert pairings.verdict((0.90, None), (0.80, 0.01)) is None  # one seed: no spread, no verdict


def hand_run(seed: int, mAP: float, ae: str, corrupted: float | None = None) -> dict:
    run = {"seed": seed, "mAP": mAP, "mINP": 0.1, "rank1": 0.5, "rank5": 0.6, "rank10": 0.7, "train_s": 10.0,
           "parameters": 2e6, "embed_dim": 64, "best_val_mAP": 0.3, "ae_name": ae, "degraded_views": True,
           "degrade_prob": 0.5, "augmix": False}
    return {**run, "corrupted_mAP": corrupted, "corrupted_rank1": 0.25} if corrupted is not None else run


def test_the_table_shows_mean_and_spread_and_applies_the_tie_rule():
    none = pairings.aggregate("r18", "none", [hand_run(0, 0.80, "none", 0.30), hand_run(1, 0.82, "none", 0.32),
                                              hand_run(2, 0.84, "none", 0.34)])
    dae = pairings.aggregate("r18", "dae+deg", [hand_run(0, 0.81, "dae", 0.40), hand_run(1, 0.83, "dae", 0.41),
                                                hand_run(2, 0.85, "dae", 0.42)])
    vae = pairings.aggregate("r18", "vae+deg", [hand_run(0, 0.60, "vae"), {"seed": 1, "error": "boom"}])
    assert dae["seeds"] == [0, 1, 2] and dae["mAP"] == pytest.approx(0.83) and dae["mAP_std"] == pytest.approx(0.02)
    budget = {"data": "d", "split": "test", "epochs": 2, "img_size": [64, 32], "latent_dim": 64, "seed": 0,
              "train_flags": []}
    table = pairings.table_markdown([none, dae, vae], budget, "python studies/pairings.py")
    lines = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines() if line.startswith("| r18")}
    # none 82.0 ± 2.0, dae 83.0 ± 2.0: a tie, both bold; corrupted 32.0 ± 2.0 against 41.0 ± 1.0: +9.0, better.
    assert lines["none"][2] == "**82.0 ± 2.0**" and lines["dae+deg"][2] == "**83.0 ± 2.0**"
    assert lines["none"][3] == "baseline" and lines["dae+deg"][3] == "+1.0 (tie)"
    assert lines["dae+deg"][4] == "41.0 ± 1.0" and lines["dae+deg"][5] == "+9.0 (better)"
    assert lines["dae+deg"][6] == "25.0 ± 0.0"
    # One seed left of vae: no spread, no verdict; its corrupted figures are n/a.
    assert lines["vae+deg"][2] == "60.0" and lines["vae+deg"][3] == "-22.0" and lines["vae+deg"][4] == "n/a"


def test_each_row_is_compared_with_the_none_row_trained_on_the_same_views():
    def row(name: str, ae: str, **views) -> dict:
        runs = [{**hand_run(seed, 0.5, ae), "degraded_views": False, "augmix": False, **views} for seed in (0, 1)]
        return pairings.aggregate("r18", name, runs)

    none, none_deg, none_cil = row("none", "none"), row("none+deg", "none", degraded_views=True), row(
        "none+cil", "none", augmix=True)
    sae_deg, sae_cil = row("sae+deg", "sae", degraded_views=True), row("sae+cil", "sae", augmix=True)
    sae_deg30 = row("sae+deg30", "sae", degraded_views=True, degrade_prob=0.3)
    rows = [none, none_deg, none_cil, sae_deg, sae_cil, sae_deg30]
    assert pairings.baseline_of(sae_deg, rows) is none_deg and pairings.baseline_of(sae_cil, rows) is none_cil
    assert pairings.baseline_of(none_cil, rows) is none_cil and pairings.baseline_of(sae_deg30, rows) is None


def test_a_variant_is_a_named_row_with_its_train_flags(capsys: pytest.CaptureFixture):
    args, _ = pairings.parse_args(["--aes", "none", "--variant", "dae+degraded=--ae-name dae --degraded-views"])
    assert args.rows == [("none", ["--ae-name", "none"]), ("dae+degraded", ["--ae-name", "dae", "--degraded-views"])]
    for text, expected in (("bad name=--ae-name dae", "expected NAME=FLAGS"),
                           ("x=--no-such-flag 1", "train.py does not accept"),
                           ("x=--ae-name dae --seed 3", "--seed is set by the grid for every run"),
                           ("x=--max_steps 5", "--max-steps is set by the grid for every run"),
                           ("x=--see 3", "train.py does not accept the flags '--see 3' (spelled out in full)")):
        with pytest.raises(SystemExit):
            pairings.parse_args(["--variant", text])
        assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("rest", "expected"), [
    (["--bogus-flag"], "the flags passed on to train.py: train.py does not accept the flags '--bogus-flag'"),
    (["--max-steps", "3"], "the flags passed on to train.py: --max-steps is set by the grid for every run")])
def test_bad_pass_through_flags_are_refused_before_anything_is_written(rest: list[str], expected: str,
                                                                        tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        pairings.main(["--out", str(tmp_path / "grid"), *rest])
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_a_row_name_recorded_with_other_flags_is_refused(tmp_path: Path):
    pairings.check_rows(tmp_path, [("none", ["--ae-name", "none"]), ("v", ["--ae-name", "dae"])])
    pairings.check_rows(tmp_path, [("v", ["--ae-name", "dae"]), ("w", ["--lighting"])])  # a new row is added
    assert read_json(tmp_path / "rows.json") == {"none": ["--ae-name", "none"], "v": ["--ae-name", "dae"],
                                                 "w": ["--lighting"]}
    with pytest.raises(UserError, match=r"holds rows of the same names trained with other flags \(v was "
                                        r"'--ae-name dae'\)"):
        pairings.check_rows(tmp_path, [("v", ["--ae-name", "vae"])])


def test_a_row_trains_on_clean_batches_unless_it_or_the_budget_asks_for_degraded_views(tmp_path: Path):
    budget = {"data": "d", "epochs": 1, "img_size": [64, 32], "latent_dim": 8, "train_flags": []}

    def degraded(row_flags: list[str], budget_flags: list[str]) -> bool:
        flags = pairings.train_flags(tmp_path / "r", "resnet18", row_flags, 0, {**budget, "train_flags": budget_flags},
                                     1)
        return pairings.train.parse_args(flags).degraded_views

    assert not degraded(["--ae-name", "sae"], [])
    assert degraded(["--ae-name", "sae", "--degraded-views"], [])
    assert degraded(["--ae-name", "none"], ["--degraded-views"])


def test_corrupted_columns_come_from_results_json():
    report = {"mAP": 0.5, "corrupted": {"all|s=all|seed=0": {"mAP": 0.2, "mINP": 0.05, "rank1": 0.3}}}
    assert pairings.corrupted_figures(report) == {"corrupted_mAP": 0.2, "corrupted_rank1": 0.3}
    assert pairings.corrupted_figures({"mAP": 0.5}) == {}


def test_more_seeds_and_a_variant_extend_a_grid(grid: tuple[Path, list[dict]], synthetic_prepared: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "grid"
    shutil.copytree(grid[0], out)
    for results in out.glob("resnet18_none/**/results.json"):  # as a grid evaluated before eval.py had --corrupt
        write_json(results, {k: v for k, v in read_json(results).items() if k != "corrupted"})
    evaluated = []
    real_eval = pairings.evaluation.main

    def eval_with_corruption(argv):  # eval.py as the robustness issue extends it: corrupted figures beside clean
        evaluated.append(argv)
        assert argv[-6:] == pairings.CORRUPT_FLAGS
        report = real_eval(argv[:-6])
        report["corrupted"] = {"all|s=all|seed=0": {"mAP": report["mAP"] / 2, "rank1": report["rank1"] / 2}}
        write_json(Path(argv[argv.index("--out") + 1]) / "results.json", report)
        return report

    monkeypatch.setattr(pairings.evaluation, "main", eval_with_corruption)
    flags = [*GRID[:2], "--aes", "none", "--variant", "none+deg=--ae-name none --degraded-views", *GRID[6:]]
    rows = pairings.main(["--data", str(synthetic_prepared), "--out", str(out), *flags, "--seeds", "2"])
    assert [(r["ae"], r["seeds"]) for r in rows] == [("none", [0, 1]), ("none+deg", [0, 1])]
    for name in ("resnet18_none_seed1", "resnet18_none+deg", "resnet18_none+deg_seed1"):
        assert read_json(out / name / "config.json")["flags"]["seed"] == (1 if "seed1" in name else 0)
    assert read_json(out / "resnet18_none+deg" / "config.json")["flags"]["degraded_views"]
    assert not read_json(out / "resnet18_none_seed1" / "config.json")["flags"]["degraded_views"]
    assert len(evaluated) == 4  # seed 0 of none evaluated again, as its results lacked corrupted figures
    none = rows[0]
    assert none["corrupted_mAP"] == pytest.approx((none["runs"][0]["mAP"] + none["runs"][1]["mAP"]) / 4)
    table = (out / "pairings.md").read_text()
    assert "| resnet18 | none+deg |" in table and " ± " in table and "--variant" in table
    assert read_json(out / "pairings.json")["rows"][1]["ae"] == "none+deg"
    with Image.open(out / "pairings_robustness.png") as image:
        assert image.size[0] > 200
