"""Loss balancing: fixed weights, learned uncertainty, GradNorm; in the loss module and through train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT, SHORT_SCHEDULE
from losses import LossBalancer, gradnorm_loss, renormalise
from utils import UserError, load_torch

TINY = [*SHORT_SCHEDULE, "--backbone-name", "resnet18", "--latent-dim", "32", "--img-size", "64", "32",
        "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--quiet", "--deterministic", "--warmup-epochs", "0",
        "--epochs", "1"]
MODES = ("fixed", "uncertainty", "gradnorm")


def read_metrics(result: Path) -> list[dict]:
    return [json.loads(line) for line in (result / "metrics.jsonl").read_text().splitlines()]


def weights_of(row: dict) -> dict[str, float]:
    return {k[len("weight_"):]: v for k, v in row.items() if k.startswith("weight_")}


# ---------------------------------------------------------------------------------------------------------
# The balancer on its own
# ---------------------------------------------------------------------------------------------------------


def test_uncertainty_weights_settle_at_the_inverse_of_each_loss():
    # Σ exp(-s)·L + s is smallest at exp(-s) = 1/L: constant losses 4 and 0.5 should end at weights 0.25 and 2.
    balancer = LossBalancer("uncertainty", {"triplet": 1.0, "id": 1.0})
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)
    losses = {"triplet": torch.tensor(4.0), "id": torch.tensor(0.5)}
    for _ in range(600):
        optimizer.zero_grad()
        balancer(losses).backward()
        optimizer.step()
    torch.testing.assert_close(balancer.current(), torch.tensor([0.25, 2.0]), rtol=1e-2, atol=1e-3)


def test_uncertainty_prior_scales_the_starting_weight():
    balancer = LossBalancer("uncertainty", {"triplet": 1.0, "kl": 1e-3})
    torch.testing.assert_close(balancer.current(), torch.tensor([1.0, 1e-3]))


def test_gradnorm_starts_from_the_flags_rescaled_to_the_number_of_terms():
    balancer = LossBalancer("gradnorm", {"triplet": 1.0, "id": 1.0, "kl": 2.0})
    torch.testing.assert_close(balancer.current(), torch.tensor([0.75, 0.75, 1.5]))
    torch.testing.assert_close(renormalise(torch.tensor([-1.0, 2.0, 2.0])).sum(), torch.tensor(3.0))
    assert (renormalise(torch.tensor([-1.0, 2.0, 2.0])) > 0).all()


def test_gradnorm_gradient_equals_the_second_order_one():
    # GradNorm as usually written: norms of ∇_W(w_i·L_i) with create_graph, differentiated in w.
    torch.manual_seed(0)
    shared = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    h = x @ shared.T
    losses = [h.pow(2).mean(), (h - 1).abs().mean() * 3]
    weights = torch.tensor([0.5, 1.5], requires_grad=True)
    initial = torch.tensor([2.0, 4.0])
    stacked = torch.stack([loss.detach() for loss in losses])
    norms = torch.stack([torch.autograd.grad(weights[i] * losses[i], shared, retain_graph=True,
                                             create_graph=True)[0].norm() for i in range(2)])
    ratios = stacked / initial
    target = (norms.mean() * (ratios / ratios.mean()) ** 1.5).detach()
    expected = torch.autograd.grad((norms - target).abs().sum(), weights)[0]
    raw = torch.stack([torch.autograd.grad(loss, shared, retain_graph=True)[0].norm() for loss in losses])
    got = torch.autograd.grad(gradnorm_loss(weights, raw, stacked, initial, 1.5), weights)[0]
    torch.testing.assert_close(got, expected)


def test_gradnorm_lowers_the_weight_of_the_term_with_the_larger_gradient():
    # Two terms on one shared layer, the second ten times steeper: GradNorm should hand weight to the first.
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 3)
    balancer = LossBalancer("gradnorm", {"triplet": 1.0, "id": 1.0})
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.02)
    x = torch.randn(16, 3)
    for _ in range(30):
        h = layer(x)
        terms = {"triplet": h.pow(2).mean(), "id": 10 * h.pow(2).mean()}
        optimizer.zero_grad()
        balancer.weights.grad = balancer.gradnorm_grad(terms, layer.weight)
        optimizer.step()
        balancer.renormalise_()
        weights = balancer.current()
        assert (weights > 0).all() and weights.sum().item() == pytest.approx(2.0)
    assert weights[0] > 1.5 > weights[1]
    assert balancer.initial_losses[1] == pytest.approx(10 * balancer.initial_losses[0].item(), rel=1e-5)


def test_a_term_the_balancer_expects_must_be_computed():
    balancer = LossBalancer("gradnorm", {"triplet": 1.0, "kl": 1.0})
    with pytest.raises(RuntimeError, match="kl"):
        balancer({"triplet": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="positive"):
        LossBalancer("uncertainty", {"triplet": 0.0})
    with pytest.raises(ValueError, match="fixed, uncertainty, gradnorm"):
        LossBalancer("pareto", {"triplet": 1.0})


def test_active_terms_follow_the_weights_and_the_autoencoder():
    weights = train.loss_weights(train.parse_args(["--ae-name", "vae", "--bce", "0"]))
    assert list(train.active_terms(weights, "vae", "feature")) == ["triplet", "id", "kl", "reconstruction"]
    assert list(train.active_terms(weights, "none", "feature")) == ["triplet", "id"]
    assert list(train.active_terms(weights, "none", "image")) == ["triplet", "id", "reconstruction"]
    sae = train.loss_weights(train.parse_args(["--ae-name", "sae"]))
    assert list(train.active_terms(sae, "sae", "feature")) == ["triplet", "id", "reconstruction", "sparsity", "bce"]


# ---------------------------------------------------------------------------------------------------------
# Through train.py
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(synthetic_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short resnet18 + VAE run a mode, with the Siamese BCE switched off (--bce 0)."""
    base = tmp_path_factory.mktemp("balance")
    for mode in MODES:
        train.main([*SHORT_SCHEDULE, "--data", str(synthetic_prepared), "--result-dir", str(base / mode),
                   "--ae-name", "vae",
                    "--kl", "0.01", "--bce", "0", "--balance", mode, "--lr-balance", "0.05", *TINY])
    return {mode: base / mode for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_logged_plotted_and_a_zero_weight_stays_off(runs: dict[str, Path], mode: str):
    rows = read_metrics(runs[mode])
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:
        assert set(weights_of(row)) == {"triplet", "id", "kl", "reconstruction"}
        assert "bce" not in row
    assert (runs[mode] / "weights.png").is_file()
    assert "balancer" in load_torch(runs[mode] / "checkpoint.pt")
    if mode == "fixed":
        assert weights_of(rows[1]) == pytest.approx({"triplet": 1.0, "id": 1.0, "kl": 0.01, "reconstruction": 1.0})


def test_uncertainty_weights_are_learned_and_stay_finite(runs: dict[str, Path]):
    start, end = (weights_of(row) for row in read_metrics(runs["uncertainty"]))
    assert start == pytest.approx({"triplet": 1.0, "id": 1.0, "kl": 0.01, "reconstruction": 1.0})
    for name in start:
        assert torch.isfinite(torch.tensor(end[name])) and end[name] > 0
        assert end[name] != pytest.approx(start[name], rel=1e-3), name


def test_gradnorm_weights_stay_positive_and_sum_to_the_number_of_terms(runs: dict[str, Path]):
    start, end = (weights_of(row) for row in read_metrics(runs["gradnorm"]))
    assert sum(start.values()) == pytest.approx(4.0) and sum(end.values()) == pytest.approx(4.0, rel=1e-5)
    assert min(end.values()) > 0
    assert end != pytest.approx(start, rel=1e-3)
    state = load_torch(runs["gradnorm"] / "checkpoint.pt")["balancer"]
    assert (state["initial_losses"] > 0).all()


@pytest.mark.parametrize("mode", ("uncertainty", "gradnorm"))
def test_resume_keeps_the_learned_weights_exact(synthetic_prepared: Path, tmp_path: Path, mode: str):
    flags = ["--data", str(synthetic_prepared), "--balance", mode, "--ae-name", "vae", *TINY]
    train.main([*flags, "--result-dir", str(tmp_path / "whole")])
    assert train.main([*flags, "--result-dir", str(tmp_path / "parts"), "--max-steps", "3"]) == {
        "stopped_at_step": 3}
    train.main([*flags, "--result-dir", str(tmp_path / "parts"), "--resume"])
    whole = load_torch(tmp_path / "whole" / "checkpoint.pt")
    resumed = load_torch(tmp_path / "parts" / "checkpoint.pt")
    for part in ("balancer", "model"):
        for key, value in whole[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert weights_of(read_metrics(tmp_path / "parts")[-1]) == pytest.approx(
        weights_of(read_metrics(tmp_path / "whole")[-1]), rel=1e-5)
    with pytest.raises(UserError, match="--balance was " + mode):
        train.main([*flags[:3], "fixed", *flags[4:], "--result-dir", str(tmp_path / "parts"), "--resume"])


def test_balancing_with_no_active_term_names_the_flag(synthetic_prepared: Path, tmp_path: Path):
    with pytest.raises(UserError, match="--balance uncertainty: no loss term is active for --ae-name none"):
        train.main([*SHORT_SCHEDULE, "--data", str(synthetic_prepared), "--result-dir", str(tmp_path / "r"),
                    "--ae-name", "none", "--balance", "uncertainty", "--triplet", "0", "--id", "0", "--bce", "0",
                    *TINY])  # kl and reconstruction keep their default weights, which `none` has no terms for
    with pytest.raises(SystemExit):
        train.parse_args(["--lr-balance", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--balance", "pareto"])


def test_gradnorm_replicas_stay_identical_in_two_processes(synthetic_prepared: Path, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
         str(ROOT / "train.py"), "--data", str(synthetic_prepared), "--result-dir", str(tmp_path / "ddp"),
         "--device", "cpu", "--ae-name", "sae", "--balance", "gradnorm", *TINY],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    weights = weights_of(read_metrics(tmp_path / "ddp")[-1])
    assert sum(weights.values()) == pytest.approx(len(weights), rel=1e-5)
