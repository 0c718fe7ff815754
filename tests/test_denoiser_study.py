"""studies/denoiser.py: the residual denoiser's figures before and after it, against eval.py's."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluation
import train
from conftest import ROOT, SHORT_SCHEDULE
from corruptions import CorruptionSettings
from degradations import degrade
from model import DENOISERS
from utils import UserError, read_json

sys.path.insert(0, str(ROOT / "studies"))
import denoiser  # noqa: E402


@pytest.fixture(scope="module", params=DENOISERS)
def residual_run(synthetic_prepared: Path, tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> Path:
    """resnet18 + dae as a residual denoiser (trained with the other terms, or apart) with the mu-l2 embedding, one
    epoch on degraded views."""
    result = tmp_path_factory.mktemp("denoiser") / "run"
    train.main([*SHORT_SCHEDULE, "--data", str(synthetic_prepared), "--result-dir", str(result), "--epochs", "1",
                "--backbone-name", "resnet18", "--ae-name", "dae", "--ae-placement", request.param, "--degraded-views",
                "--embedding", "mu-l2", "--latent-dim", "32", "--img-size", "64", "32", "--batch-p", "4",
                "--batch-k", "2", "--workers", "0", "--quiet"])
    return result


def test_after_the_denoiser_the_figures_are_eval_pys(residual_run: Path, synthetic_prepared: Path):
    evaluation.main(["--result-dir", str(residual_run), "--workers", "0", "--corrupt", "all", "--severity", "all",
                     "--corrupt-seed", "0"])
    report = read_json(residual_run / "eval" / "results.json")
    runs = denoiser.main(["--data", str(synthetic_prepared), str(residual_run)])
    after = runs[0]["after"]
    assert after["clean"]["mAP"] == pytest.approx(report["mAP"], abs=1e-6)
    assert after["clean"]["rank1"] == pytest.approx(report["rank1"], abs=1e-6)
    corrupted = report["corrupted"][CorruptionSettings().key()]
    assert after["corrupted"]["mAP"] == pytest.approx(corrupted["mAP"], abs=1e-6)
    assert read_json(residual_run / "eval" / "denoiser_corrupted.json") == runs[0]


@pytest.mark.parametrize("view", denoiser.VIEWS)
def test_with_the_denoiser_zeroed_before_and_after_are_the_same(residual_run: Path, synthetic_prepared: Path,
                                                                 view: str):
    model = denoiser.residual_model(residual_run, "cpu")
    last = [m for m in model.ae.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    figures = denoiser.denoiser_figures(model, synthetic_prepared, "test", view)
    assert figures["before"] == figures["after"]
    assert figures["correction"] == {"clean": 0.0, view: 0.0}
    assert figures["to_clean_feature"]["before"] == figures["to_clean_feature"]["after"]
    assert figures["to_clean_feature"]["before"] == pytest.approx(figures["before"][f"clean_{view}_cosine"])


def test_the_degraded_view_is_the_training_degradation_of_every_image():
    batch = torch.randn(6, 3, 16, 8)
    view = denoiser.degraded_view(3)
    expected = degrade(batch, torch.Generator().manual_seed(3), 1.0)
    first = view(batch)
    assert torch.equal(first, expected)
    assert all(not torch.equal(first[i], batch[i]) for i in range(len(batch)))
    assert not torch.equal(view(batch), first)  # the generator goes on: the next batch gets draws of its own


def test_the_degraded_view_changes_the_features_and_repeats_with_its_seed(residual_run: Path,
                                                                          synthetic_prepared: Path):
    model = denoiser.residual_model(residual_run, "cpu")
    figures = denoiser.denoiser_figures(model, synthetic_prepared, "test", "degraded", seed=1)
    assert figures["view"] == "degraded" and figures["seed"] == 1
    assert 0 < figures["before"]["clean_degraded_cosine"] < 1
    assert denoiser.denoiser_figures(model, synthetic_prepared, "test", "degraded", seed=1) == figures


def test_mean_cosine_matches_a_hand_worked_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    assert denoiser.mean_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 3)


def test_a_run_that_is_not_a_residual_denoiser_is_named(tiny_run: Path):
    with pytest.raises(UserError, match=r"--ae-placement series .* expected --ae-placement residual or residual-apart"):
        denoiser.residual_model(tiny_run, "cpu")


def test_the_summary_is_the_mean_and_spread_over_runs():
    def run(clean: float, corrupted: float, cosine: float, to_clean: float) -> dict:
        stage = {"clean": {"mAP": clean}, "corrupted": {"mAP": corrupted}, "clean_corrupted_cosine": cosine}
        return {"before": stage, "after": stage, "to_clean_feature": {"before": to_clean, "after": to_clean / 2}}

    rows = denoiser.summary_rows([run(0.5, 0.2, 0.8, 0.9), run(0.7, 0.4, 0.6, 0.7)])
    assert rows[0] == ("before", "60.0 ± 14.1", "30.0 ± 14.1", "70.0 ± 14.1", "80.0 ± 14.1")
    assert rows[1][4] == "40.0 ± 7.1"
    assert denoiser.summary_rows([run(0.5, 0.2, 0.8, 0.9)])[1] == ("after", "50.0", "20.0", "80.0", "45.0")
