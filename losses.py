"""Losses on a P×K batch: triplet, identity, KL, reconstruction, sparsity, Siamese BCE, feature consistency and
Jensen–Shannon consistency across views; their weighted sum and the balancing of its weights (fixed, learned
uncertainty, GradNorm)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPARSITY_MODES = ("kl", "l1")
# Keeps log ρ̂ and log(1 − ρ̂) finite when a unit is always off or always on in the batch.
RHO_EPS = 1e-6


def pairwise_distances(z: Tensor) -> Tensor:
    """Euclidean distances [B, B] between the rows of z, in float32 at least."""
    # The expanded square cancels badly in half precision, so it stays out of autocast.
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    with torch.autocast(z.device.type, enabled=False):
        sq = z.pow(2).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2 * z @ z.T
    # The clamp keeps sqrt's gradient finite at zero distance (an image with itself).
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet(z: Tensor, labels: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet: mean over anchors of [d(hardest positive) − d(hardest negative) + margin]₊.

    Margin 0 means the soft margin softplus(d_ap − d_an). Anchors alone in their identity, or in a batch of
    one identity, are left out.
    """
    if margin < 0:
        raise ValueError(f"margin {margin}: expected 0 (the soft margin) or a positive margin")
    dist = pairwise_distances(z)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    # A masked mean rather than indexing by `valid`: no device sync, and 0 (still in the graph) with no anchor.
    gap = torch.where(valid, d_ap - d_an, torch.zeros_like(d_ap))
    per_anchor = F.relu(gap + margin) if margin > 0 else F.softplus(gap)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)


def identity_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing ε: target 1 − ε on the label plus ε spread over all classes."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), summed over latent dimensions, mean over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(recon, target)


def feature_consistency(feat: Tensor, clean_feat: Tensor) -> Tensor:
    """Mean squared distance of each view's feature to its clean view's, the clean feature held fixed."""
    return F.mse_loss(feat, clean_feat.detach())


def js_consistency(view_logits: Tensor) -> Tensor:
    """Jensen–Shannon divergence of the identity predictions over V views (AugMix's): (1/V) Σ_v KL(p_v ‖ M), M the
    mean of the p_v; view_logits is [B, V, C], summed over classes, mean over the batch."""
    log_p = F.log_softmax(view_logits.float(), dim=2)
    log_mixture = torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(view_logits.shape[1])
    return (log_p.exp() * (log_p - log_mixture)).sum(2).mean(1).mean()


def sparsity_kl(code: Tensor, target: float = 0.05) -> Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the batch-mean activation of unit j (code in (0, 1)), in float32 at least (bf16 would
    round the clamp's 1 − 10⁻⁶ to 1); 0·log 0 = 0, so ρ may be 0 or 1."""
    rho_hat = code.to(torch.promote_types(code.dtype, torch.float32)).mean(0).clamp(RHO_EPS, 1 - RHO_EPS)
    rho = target  # a Python number: no tensor made on the device (a host-to-device copy would wait for it)
    return (torch.xlogy(rho, rho / rho_hat) + torch.xlogy(1 - rho, (1 - rho) / (1 - rho_hat))).sum()


def sparsity_l1(code: Tensor) -> Tensor:
    """L1 norm of the code, summed over units, mean over the batch."""
    return code.abs().sum(1).mean()


def balanced_pair_count(labels: Tensor) -> int:
    """min(positive pairs, negative pairs) of a batch, counted from its labels (a device sync when they are on one)."""
    counts = torch.unique(labels, return_counts=True)[1]
    positives = int((counts * (counts - 1) // 2).sum())
    return min(positives, len(labels) * (len(labels) - 1) // 2 - positives)


def pk_pair_count(batch: int, k: int) -> int:
    """min(positive pairs, negative pairs) of a batch of identities with k images each, known from its shape."""
    positives = batch * (k - 1) // 2
    return min(positives, batch * (batch - 1) // 2 - positives)


def mine_pairs(labels: Tensor, z: Tensor, count: int | None = None,
               lottery: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced pairs (idx_i, idx_j, target) in a batch: `count` positive pairs i < j, as many negatives.

    `count` is min(positive, negative pairs): pk_pair_count's for a P×K batch, counted from the labels when None.
    The farthest positives are kept (all of them when they are the fewer). Half the negatives (rounded up) are the
    closest different-identity pairs by embedding distance, the rest drawn at random from the others: with hard
    negatives only, the head learns that nearness means a stranger and ranks random pairs backwards. `lottery`
    holds that draw, a value in [0, 1) for each pair i < j in triu_indices' order (torch.rand's when None). Every
    shape follows from the batch size and `count`, so the mining queues on the device without waiting for it.
    """
    count = balanced_pair_count(labels) if count is None else count
    with torch.no_grad():
        pair_i, pair_j = torch.triu_indices(len(labels), len(labels), offset=1, device=z.device)
        dist = pairwise_distances(z.detach().float())[pair_i, pair_j]
        same = labels[pair_i] == labels[pair_j]
        hard = (count + 1) // 2
        positives = torch.where(same, dist, float("-inf")).topk(count).indices
        closest = torch.where(same, float("-inf"), -dist).topk(hard).indices
        lottery = torch.rand(len(dist), device=z.device) if lottery is None else lottery
        drawn = torch.where(same, -1.0, lottery).index_fill(0, closest, -1.0)
        chosen = torch.cat([positives, closest, drawn.topk(count - hard).indices])
    target = torch.cat([torch.ones(count, device=z.device), torch.zeros(count, device=z.device)])
    return pair_i[chosen], pair_j[chosen], target


def siamese_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of same-person logits against 0/1 targets, mean over pairs (0 with no pairs)."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


class Verifier(Protocol):
    """What total_loss needs of the model: the Siamese head's pair logits (ReIDModel.verify)."""

    def verify(self, z_i: Tensor, z_j: Tensor) -> Tensor: ...


@dataclass
class LossWeights:
    """The weight of each term; a term weighted 0 is not computed. The defaults are the BoT baseline."""

    triplet: float = 1.0
    id: float = 1.0
    kl: float = 0.0
    reconstruction: float = 0.0
    sparsity: float = 0.0
    bce: float = 0.0
    consistency: float = 0.0
    js: float = 0.0


def total_loss(outputs: dict[str, Tensor | None], labels: Tensor, weights: LossWeights,
               model: Verifier | None, margin: float = 0.3, label_smoothing: float = 0.1,
               sparsity_target: float = 0.05, sparsity_mode: str = "kl",
               pair_count: int | None = None, kl_scale: float | Tensor = 1.0,
               lottery: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the terms, and each computed term (unweighted) by name; the KL's weight is scaled by
    `kl_scale` (β, warm-up included) in the sum.

    `outputs` is ReIDModel.forward's dict; `model` is needed only for bce, whose pairs number `pair_count` a kind
    (mine_pairs, its random negatives drawn from `lottery`; counted from the labels when None). Terms the
    autoencoder has nothing for are skipped: kl without μ (not a VAE), reconstruction without a decoder (`none`),
    sparsity without a sigmoid code (not an SAE); and the views' terms without views: consistency without a clean
    view's feature (target_feat), js without several views' logits (view_logits).
    """
    if sparsity_mode not in SPARSITY_MODES:
        raise ValueError(f"unknown sparsity mode {sparsity_mode!r}: expected {' or '.join(SPARSITY_MODES)}")
    z = outputs["z"]
    terms: dict[str, Tensor] = {}
    if weights.triplet:
        terms["triplet"] = batch_hard_triplet(z, labels, margin)
    if weights.id:
        terms["id"] = identity_loss(outputs["logits"], labels, label_smoothing)
    if weights.kl and outputs["mu"] is not None:
        terms["kl"] = kl_normal(outputs["mu"], outputs["logvar"])
    if weights.reconstruction and outputs["recon"] is not None:
        terms["reconstruction"] = reconstruction_loss(outputs["recon"], outputs["recon_target"])
    if weights.sparsity and outputs["sparse_code"] is not None:
        code = outputs["sparse_code"]
        terms["sparsity"] = sparsity_kl(code, sparsity_target) if sparsity_mode == "kl" else sparsity_l1(code)
    if weights.bce:
        idx_i, idx_j, target = mine_pairs(labels, z, pair_count, lottery)
        terms["bce"] = siamese_bce(model.verify(z[idx_i], z[idx_j]), target)
    if weights.consistency and outputs.get("target_feat") is not None:
        terms["consistency"] = feature_consistency(outputs["feat"], outputs["target_feat"])
    if weights.js and outputs.get("view_logits") is not None:
        terms["js"] = js_consistency(outputs["view_logits"])
    scales = {"kl": kl_scale}
    total = sum((getattr(weights, name) * scales.get(name, 1.0) * term for name, term in terms.items()), z.sum() * 0.0)
    return total, terms


# ---------------------------------------------------------------------------------------------------------
# Balancing the terms: fixed weights, learned uncertainty (Kendall et al. 2018), GradNorm (Chen et al. 2018)
# ---------------------------------------------------------------------------------------------------------

BALANCE_MODES = ("fixed", "uncertainty", "gradnorm")
# GradNorm weights are kept at least this large before renormalising, so none turns negative or reaches 0.
MIN_GRADNORM_WEIGHT = 1e-4


def uncertainty_total(losses: Tensor, log_vars: Tensor, prior: Tensor) -> Tensor:
    """Σ prior_i·(exp(−s_i)·L_i + s_i): a term with a large learned log-variance s_i counts less; the + s_i
    keeps s from growing without bound. At its optimum exp(−s_i) = 1/L_i."""
    return (prior * (torch.exp(-log_vars) * losses + log_vars)).sum()


def renormalise(weights: Tensor) -> Tensor:
    """Positive weights rescaled to sum to their count, GradNorm's constraint."""
    weights = weights.clamp_min(MIN_GRADNORM_WEIGHT)
    return weights * (len(weights) / weights.sum())


def gradnorm_targets(norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float) -> Tensor:
    """Each term's target gradient norm: the mean norm × (its loss ratio L/L₀ over the mean ratio)^α, a constant."""
    ratios = losses / initial_losses
    return (norms.mean() * (ratios / ratios.mean()) ** alpha).detach()


def gradnorm_loss(weights: Tensor, raw_norms: Tensor, losses: Tensor, initial_losses: Tensor,
                  alpha: float) -> Tensor:
    """Σ_i |w_i·‖∇_W L_i‖ − target_i|, whose gradient moves each weight towards its term's target norm.

    ‖∇_W (w_i·L_i)‖ = w_i·‖∇_W L_i‖ for a scalar w_i > 0, so the raw norms can be constants: the gradient in
    w is the one a second-order graph (create_graph=True) gives, without building it.
    """
    norms = weights * raw_norms
    return (norms - gradnorm_targets(norms.detach(), losses, initial_losses, alpha)).abs().sum()


def _same(tensor: Tensor) -> Tensor:
    return tensor


def grad_norm(loss: Tensor, shared: Tensor, average: Callable[[Tensor], Tensor] = _same) -> Tensor:
    """‖∇_shared loss‖ of the gradient `average` makes of the ranks' (globalbatch: their mean is the global batch's),
    keeping the graph for the other terms and the backward pass (0 if loss ignores it)."""
    (grad,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
    return torch.zeros((), device=shared.device) if grad is None else average(grad.detach().float()).norm()


class LossBalancer(nn.Module):
    """The weights of the active terms: fixed at the flags, learned log-variances, or adapted by GradNorm.

    `prior` holds each active term's weight flag: the weight itself (fixed), the scale of the term's whole
    uncertainty objective (uncertainty: weight prior·exp(−s), s from 0), or the starting weights rescaled to
    sum to the number of terms (gradnorm).
    """

    def __init__(self, mode: str, prior: dict[str, float], alpha: float = 1.5) -> None:
        super().__init__()
        if mode not in BALANCE_MODES:
            raise ValueError(f"unknown balance mode {mode!r}: expected one of {', '.join(BALANCE_MODES)}")
        if not prior or min(prior.values()) <= 0:
            raise ValueError(f"balancing needs at least one term, every weight positive; got {prior}")
        self.mode, self.names, self.alpha = mode, tuple(prior), alpha
        self.register_buffer("prior", torch.tensor(list(prior.values()), dtype=torch.float32))
        if mode == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(prior)))
        # The KL's β at this step (TrainStep shares its tensor): the scale of the KL gradient the network receives.
        self.kl_scale: float | Tensor = 1.0
        if mode == "gradnorm":
            self.weights = nn.Parameter(renormalise(self.prior.clone()))
            # L₀ of each term, measured at the first step; zeros until then. Kept in the state for --resume.
            self.register_buffer("initial_losses", torch.zeros(len(prior)))
            self.initial_set = False  # False until read from initial_losses (fresh, or loaded by --resume) or set

    def stack(self, terms: dict[str, Tensor]) -> Tensor:
        """The active terms as one float32 vector, in the balancer's order."""
        missing = [name for name in self.names if name not in terms]
        if missing:
            raise RuntimeError(f"the balancer expects terms {missing} that the losses did not compute")
        return torch.stack([terms[name].float() for name in self.names])

    def current(self) -> Tensor:
        """The weight each term gets now (no gradient)."""
        with torch.no_grad():
            if self.mode == "uncertainty":
                return self.prior * torch.exp(-self.log_vars)
            return self.weights.detach().clone() if self.mode == "gradnorm" else self.prior.clone()

    def weighed(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The terms as the network's total takes them: the KL times its β at this step (kl_scale)."""
        return {**terms, "kl": terms["kl"] * self.kl_scale} if "kl" in terms else terms

    def forward(self, terms: dict[str, Tensor]) -> Tensor:
        """The total loss the network minimises: Σ w_i·L_i (plus Σ prior_i·s_i for uncertainty), the KL weighed."""
        losses = self.stack(self.weighed(terms))
        if self.mode == "uncertainty":
            return uncertainty_total(losses, self.log_vars, self.prior)
        weights = self.weights.detach() if self.mode == "gradnorm" else self.prior  # GradNorm trains w apart
        return (weights * losses).sum()

    def gradnorm_grad(self, terms: dict[str, Tensor], shared: Tensor,
                      average: Callable[[Tensor], Tensor] = _same) -> Tensor:
        """The gradient of GradNorm's loss in the weights; `average` makes L₀, the terms' gradients and this gradient
        agree across ranks."""
        losses = self.stack(terms).detach()
        if not self.initial_set:  # L₀ is taken at the first step; whether it is set is read once a run
            self.initial_set = bool(self.initial_losses.any())
            if not self.initial_set:
                self.initial_losses.copy_(average(losses).clamp_min(1e-8))
                self.initial_set = True
        # The norms of the gradients the network gets (the KL's scaled by β); the ratios L/L₀ stay unscaled, as
        # each term's training rate.
        raw_norms = torch.stack([grad_norm(terms[name], shared, average) * (self.kl_scale if name == "kl" else 1.0)
                                 for name in self.names])
        loss = gradnorm_loss(self.weights, raw_norms, losses, self.initial_losses, self.alpha)
        (grad,) = torch.autograd.grad(loss, self.weights)
        return average(grad)

    @torch.no_grad()
    def renormalise_(self) -> None:
        """After each optimiser step: GradNorm weights back to positive values summing to the number of terms."""
        if self.mode == "gradnorm":
            self.weights.copy_(renormalise(self.weights))
