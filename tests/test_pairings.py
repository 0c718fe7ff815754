"""bench/pairings.py: a grid of backbone × autoencoder pairings, its table and heat map, and resuming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from utils import UserError, read_json

sys.path.insert(0, str(ROOT / "bench"))
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
