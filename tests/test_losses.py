"""Each loss against an independent computation, gradchecks, pair mining and the weighted sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
from losses import (
    LossBalancer,
    LossWeights,
    batch_hard_triplet,
    identity_loss,
    kl_normal,
    mine_pairs,
    pk_pair_count,
    reconstruction_loss,
    siamese_bce,
    sparsity_kl,
    sparsity_l1,
    total_loss,
)
from model import SiameseHead

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def brute_force_triplet(z: torch.Tensor, labels: list[int], margin: float) -> float:
    """The batch-hard triplet loss by a loop over anchors, in Python floats."""
    def dist(a: int, b: int) -> float:
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(z[a].tolist(), z[b].tolist(), strict=True)))

    per_anchor = []
    for a, label in enumerate(labels):
        positives = [dist(a, p) for p, other in enumerate(labels) if other == label and p != a]
        negatives = [dist(a, n) for n, other in enumerate(labels) if other != label]
        if not positives or not negatives:
            continue
        gap = max(positives) - min(negatives)
        per_anchor.append(max(gap + margin, 0.0) if margin > 0 else math.log1p(math.exp(gap)))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_batch_hard_triplet_matches_a_loop_over_anchors(margin: float):
    torch.manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64)
    expected = brute_force_triplet(z, LABELS.tolist(), margin)
    assert batch_hard_triplet(z, LABELS, margin).item() == pytest.approx(expected, rel=1e-9)


def test_triplet_leaves_out_anchors_without_a_positive():
    torch.manual_seed(1)
    z = torch.randn(5, 3, dtype=torch.float64)
    labels = [0, 0, 1, 1, 2]
    expected = brute_force_triplet(z, labels, 0.3)
    assert batch_hard_triplet(z, torch.tensor(labels), 0.3).item() == pytest.approx(expected, rel=1e-9)


def test_triplet_of_half_precision_embeddings_is_computed_in_float32():
    torch.manual_seed(0)
    z = (10 + torch.randn(8, 64)).half()
    expected = brute_force_triplet(z.float(), LABELS.tolist(), 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_hard_triplet(z, LABELS, 0.3)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_triplet_is_zero_with_a_single_identity():
    z = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet(z, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(4, 3))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1).mean()
    assert kl_normal(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-12)


def test_label_smoothed_cross_entropy_matches_its_formula():
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2]), 0.1
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_norm for v in row]
        expected += -((1 - eps) * log_p[label] + eps / len(row) * sum(log_p))
    assert identity_loss(logits, labels, eps).item() == pytest.approx(expected / 5, rel=1e-12)


def test_reconstruction_is_the_mean_squared_error():
    recon, target = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert reconstruction_loss(recon, target).item() == pytest.approx((1 + 0 + 4 + 4) / 4)


def test_sparsity_kl_matches_its_formula():
    torch.manual_seed(0)
    code, rho = torch.rand(6, 4, dtype=torch.float64), 0.05
    expected = 0.0
    for unit in range(4):
        rho_hat = sum(code[:, unit].tolist()) / 6
        expected += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert sparsity_kl(code, rho).item() == pytest.approx(expected, rel=1e-12)


def test_sparsity_kl_stays_finite_for_dead_and_saturated_units():
    code = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = sparsity_kl(code, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(code.grad).all()


def test_sparsity_l1_sums_units_and_averages_the_batch():
    code = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    assert sparsity_l1(code).item() == pytest.approx((0.75 + 1.0) / 2)


def test_siamese_bce_matches_bce_on_probabilities():
    torch.manual_seed(0)
    logits, target = torch.randn(6, dtype=torch.float64), torch.tensor([1.0, 1, 1, 0, 0, 0])
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target.double())
    assert siamese_bce(logits, target).item() == pytest.approx(expected.item(), rel=1e-10)


def test_siamese_bce_is_zero_without_pairs():
    assert siamese_bce(torch.zeros(0), torch.zeros(0)).item() == 0.0


@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_triplet_gradcheck(margin: float):
    torch.manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: batch_hard_triplet(x, LABELS, margin), (z,))


def test_kl_gradcheck():
    torch.manual_seed(0)
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl_normal, (mu, logvar))


def test_sparsity_kl_gradcheck():
    torch.manual_seed(0)
    code = (0.1 + 0.8 * torch.rand(5, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: sparsity_kl(c, 0.05), (code,))


def test_smoothed_cross_entropy_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x: identity_loss(x, labels, 0.1), (logits,))


def check_mined_pairs(labels: torch.Tensor, z: torch.Tensor) -> None:
    """The pair-mining invariants, from the labels and distances worked out here."""
    idx_i, idx_j, target = mine_pairs(labels, z)
    pairs = list(zip(idx_i.tolist(), idx_j.tolist(), strict=True))
    same = [labels[i] == labels[j] for i, j in pairs]
    n = len(labels)
    all_pos = {(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]}
    all_neg = {(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]}
    chosen_pos = {pair for pair, t in zip(pairs, target.tolist(), strict=True) if t == 1}
    chosen_neg = [pair for pair, t in zip(pairs, target.tolist(), strict=True) if t == 0]
    assert (idx_i != idx_j).all()
    assert same == [t == 1.0 for t in target.tolist()]
    assert len(chosen_pos) == len(chosen_neg) == min(len(all_pos), len(all_neg))
    assert len(set(chosen_neg)) == len(chosen_neg)
    dist = torch.cdist(z, z)
    if len(all_pos) <= len(all_neg):
        assert chosen_pos == all_pos
    elif chosen_pos:  # the farthest positives are kept
        assert min(dist[i, j] for i, j in chosen_pos) >= max(dist[i, j] for i, j in all_pos - chosen_pos) - 1e-5
    hard = chosen_neg[:(len(chosen_neg) + 1) // 2]  # the closest half (rounded up) first, the rest at random
    others = all_neg - set(hard)
    if hard and others:
        assert max(dist[i, j] for i, j in hard) <= min(dist[i, j] for i, j in others) + 1e-5


def test_mine_pairs_takes_all_positives_and_hard_and_random_negatives():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    z = torch.randn(9, 4)
    check_mined_pairs(labels, z)
    idx_i, _, target = mine_pairs(labels, z)
    assert int(target.sum()) == 9 and len(idx_i) == 18


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=10), st.integers(0, 2**16))
def test_mine_pairs_invariants_hold_for_any_batch(labels: list[int], seed: int):
    z = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(seed))
    check_mined_pairs(torch.tensor(labels), z)


def test_a_pk_batch_pair_count_is_known_from_its_shape():
    assert pk_pair_count(8, 2) == 4  # 4 positive pairs, 28 − 4 = 24 negative
    assert pk_pair_count(12, 4) == 18  # 3 × 6 positive, 66 − 18 = 48 negative
    assert pk_pair_count(6, 3) == 6  # 2 × 3 positive, 15 − 6 = 9 negative
    assert pk_pair_count(4, 4) == 0  # one identity: 6 positive pairs, no negative one


def test_mine_pairs_with_the_pk_count_mines_as_counting_does():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    z = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    counted = mine_pairs(labels, z)
    torch.manual_seed(5)
    known = mine_pairs(labels, z, pk_pair_count(9, 3))
    for a, b in zip(counted, known, strict=True):
        assert torch.equal(a, b)
    assert len(known[0]) == 2 * 9


def test_mine_pairs_draws_its_random_negatives_from_the_lottery_given():
    """A lottery is the draw torch.rand would make, one value a pair i < j: the same lottery, the same pairs."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    z = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    drawn = mine_pairs(labels, z)
    lottery = torch.rand(36, generator=torch.Generator().manual_seed(5))
    given, other = (mine_pairs(labels, z, lottery=values) for values in (lottery, lottery.flip(0)))
    assert all(torch.equal(a, b) for a, b in zip(drawn, given, strict=True))
    assert not torch.equal(given[1], other[1])


def test_mine_pairs_is_empty_for_a_single_identity():
    idx_i, idx_j, target = mine_pairs(torch.zeros(4, dtype=torch.long), torch.randn(4, 3))
    assert len(idx_i) == len(idx_j) == len(target) == 0


class Verifier:
    """Stands in for ReIDModel: just the Siamese head."""

    def __init__(self, dim: int) -> None:
        self.head = SiameseHead(dim)

    def verify(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        return self.head(z_i, z_j)


def fake_outputs(vae: bool, batch: int = 8, dim: int = 6, classes: int = 3) -> dict:
    """A forward dict with VAE or plain-AE fields, all requiring grad."""
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    feat = torch.randn(batch, 10)
    logvar = torch.randn(batch, dim) if vae else None
    return {"feat": feat, "z": z, "latent": z, "recon": torch.randn(batch, 10, requires_grad=True),
            "recon_target": feat, "mu": z if vae else None, "logvar": logvar,
            "logits": torch.randn(batch, classes, requires_grad=True), "sparse_code": None}


def test_total_is_the_weighted_sum_of_each_term():
    out, model = fake_outputs(vae=True), Verifier(6)
    weights = LossWeights(triplet=1.0, id=0.5, kl=0.01, reconstruction=2.0, sparsity=0.0, bce=0.3)
    torch.manual_seed(3)  # the same random negatives in both minings
    total, terms = total_loss(out, LABELS, weights, model, margin=0.2, label_smoothing=0.05)
    torch.manual_seed(3)
    idx_i, idx_j, target = mine_pairs(LABELS, out["z"])
    z, mu, logvar = out["z"].detach(), out["mu"].detach(), out["logvar"].detach()
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    pair_logits = model.verify(out["z"][idx_i], out["z"][idx_j]).detach()
    expected = {  # each from its definition, apart from the loss module
        "triplet": torch.tensor(brute_force_triplet(z, LABELS.tolist(), 0.2)),
        "id": F.cross_entropy(out["logits"].detach(), LABELS, label_smoothing=0.05),
        "kl": torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum(1).mean(),
        "reconstruction": ((out["recon"].detach() - out["recon_target"]) ** 2).mean(),
        "bce": F.binary_cross_entropy(torch.sigmoid(pair_logits), target),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    weighted = 1.0 * expected["triplet"] + 0.5 * expected["id"] + 0.01 * expected["kl"] \
        + 2.0 * expected["reconstruction"] + 0.3 * expected["bce"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_zero_weighted_terms_are_not_computed(monkeypatch: pytest.MonkeyPatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a zero-weighted term was computed")

    for name in ("batch_hard_triplet", "kl_normal", "reconstruction_loss", "sparsity_kl", "mine_pairs"):
        monkeypatch.setattr(losses, name, must_not_run)
    out = fake_outputs(vae=True)
    total, terms = total_loss(out, LABELS, LossWeights(triplet=0, id=1, kl=0, reconstruction=0, bce=0), None)
    assert list(terms) == ["id"]
    assert total.item() == pytest.approx(identity_loss(out["logits"], LABELS, 0.1).item())


def test_terms_the_autoencoder_cannot_give_are_skipped():
    out = fake_outputs(vae=False)
    out["recon"] = out["recon_target"] = None
    weights = LossWeights(triplet=1, id=1, kl=1, reconstruction=1, sparsity=1, bce=0)
    total, terms = total_loss(out, LABELS, weights, Verifier(6))
    assert set(terms) == {"triplet", "id"}
    assert total.item() == pytest.approx((terms["triplet"] + terms["id"]).item())
    total.backward()
    assert out["z"].grad is not None and out["z"].grad.abs().sum() > 0


def test_sparsity_modes_apply_to_the_sparse_code():
    out = fake_outputs(vae=False)
    out["sparse_code"] = torch.sigmoid(out["z"])
    weights = LossWeights(triplet=0, id=0, sparsity=1)
    _, kl_terms = total_loss(out, LABELS, weights, None, sparsity_target=0.1, sparsity_mode="kl")
    _, l1_terms = total_loss(out, LABELS, weights, None, sparsity_mode="l1")
    rho_hat = out["sparse_code"].detach().mean(0)
    expected_kl = (0.1 * torch.log(0.1 / rho_hat) + 0.9 * torch.log(0.9 / (1 - rho_hat))).sum()
    assert kl_terms["sparsity"].item() == pytest.approx(expected_kl.item(), rel=1e-5)
    assert l1_terms["sparsity"].item() == pytest.approx(out["sparse_code"].sum(1).mean().item())
    with pytest.raises(ValueError, match="kl or l1"):
        total_loss(out, LABELS, weights, None, sparsity_mode="l2")


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_sparsity_kl_at_a_target_of_zero_or_one_is_the_one_sided_kl(rho: float):
    # 0·log 0 = 0: ρ = 0 leaves Σ log(1 / (1 − ρ̂)), ρ = 1 leaves Σ log(1 / ρ̂).
    code = torch.tensor([[0.2, 0.6], [0.4, 0.8]], dtype=torch.float64)
    rho_hat = [0.3, 0.7]
    expected = sum(math.log(1 / (1 - r)) if rho == 0.0 else math.log(1 / r) for r in rho_hat)
    assert sparsity_kl(code, rho).item() == pytest.approx(expected, rel=1e-12)


def test_sparsity_kl_of_a_bf16_code_is_taken_in_float32():
    # A unit on for the whole batch: in bf16 the clamp's 1 − 1e-6 rounds to 1 and (1 − ρ) / (1 − ρ̂) overflows.
    code = torch.tensor([[1.0, 0.05], [1.0, 0.05]])
    value = sparsity_kl(code.bfloat16(), 0.05)
    assert torch.isfinite(value) and value.item() == pytest.approx(sparsity_kl(code, 0.05).item(), rel=1e-3)


def test_a_negative_triplet_margin_is_an_error():
    with pytest.raises(ValueError, match="margin -0.1: expected 0"):
        batch_hard_triplet(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), -0.1)


def test_gradnorm_measures_the_kl_gradient_scaled_by_beta():
    """At the first step (L = L₀, all ratios 1) each target is the mean weighted norm, and d/dw_i Σ|w_i n_i − t_i|
    = sign(w_i n_i − t_i) n_i; the KL's norm n is β‖∇KL‖, the gradient the network gets with the KL weighted β."""
    shared = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 6.0, 8.0])  # ‖a‖ = 5, ‖b‖ = 10
    balancer = LossBalancer("gradnorm", {"triplet": 1.0, "kl": 1.0}, alpha=1.5)
    balancer.kl_scale = 0.25
    terms = {"triplet": (shared * a).sum(), "kl": (shared * b).sum()}
    grad = balancer.gradnorm_grad(terms, shared)
    norms = [5.0, 0.25 * 10.0]
    target = sum(norms) / 2
    expected = [math.copysign(n, n - target) for n in norms]
    assert grad.tolist() == pytest.approx(expected)
