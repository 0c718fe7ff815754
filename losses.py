"""Losses on a P×K batch: triplet, identity, KL, reconstruction, sparsity, Siamese BCE; their weighted sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

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
    dist = pairwise_distances(z)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return z.sum() * 0.0
    gap = d_ap[valid] - d_an[valid]
    return (F.relu(gap + margin) if margin > 0 else F.softplus(gap)).mean()


def identity_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing ε: target 1 − ε on the label plus ε spread over all classes."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), summed over latent dimensions, mean over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(recon, target)


def sparsity_kl(code: Tensor, target: float = 0.05) -> Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the batch-mean activation of unit j (code in (0, 1))."""
    rho_hat = code.mean(0).clamp(RHO_EPS, 1 - RHO_EPS)
    rho = target
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def sparsity_l1(code: Tensor) -> Tensor:
    """L1 norm of the code, summed over units, mean over the batch."""
    return code.abs().sum(1).mean()


def mine_pairs(labels: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced pairs (idx_i, idx_j, target) in a batch: every positive pair i < j, as many hardest negatives.

    Negatives are the closest different-identity pairs by embedding distance; target is 1.0 for same-identity.
    When there are fewer negatives than positives, the farthest positives are kept, so counts stay equal.
    """
    with torch.no_grad():
        dist = pairwise_distances(z.detach().float())
        same = labels[:, None] == labels[None, :]
        upper = torch.ones_like(same).triu(diagonal=1)
        pos_i, pos_j = torch.nonzero(same & upper, as_tuple=True)
        neg_i, neg_j = torch.nonzero(~same & upper, as_tuple=True)
        n = min(len(pos_i), len(neg_i))
        hard_pos = dist[pos_i, pos_j].argsort(descending=True)[:n]
        hard_neg = dist[neg_i, neg_j].argsort()[:n]
    idx_i = torch.cat([pos_i[hard_pos], neg_i[hard_neg]])
    idx_j = torch.cat([pos_j[hard_pos], neg_j[hard_neg]])
    target = torch.cat([torch.ones(n, device=z.device), torch.zeros(n, device=z.device)])
    return idx_i, idx_j, target


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


def total_loss(outputs: dict[str, Tensor | None], labels: Tensor, weights: LossWeights,
               model: Verifier | None, margin: float = 0.3, label_smoothing: float = 0.1,
               sparsity_target: float = 0.05, sparsity_mode: str = "kl") -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the terms, and each computed term (unweighted) by name.

    `outputs` is ReIDModel.forward's dict; `model` is needed only for bce. Terms the autoencoder has
    nothing for are skipped: kl without μ (not a VAE), reconstruction without a decoder (`none`), sparsity
    without a sigmoid code (not an SAE).
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
        idx_i, idx_j, target = mine_pairs(labels, z)
        terms["bce"] = siamese_bce(model.verify(z[idx_i], z[idx_j]), target)
    total = sum((getattr(weights, name) * term for name, term in terms.items()), z.sum() * 0.0)
    return total, terms
