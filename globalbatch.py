"""One global P×K batch over the ranks of a torchrun run: every rank's losses are the whole batch's.

Each rank gathers the loss inputs of every rank (gather_batch) and computes the same global loss L from them. Its
backward pass reaches only its own slice: rank r's parameters get ∂L/∂θ through its own images, and the sum of those
over the ranks is the single process's gradient. DistributedDataParallel averages the ranks' gradients, so the
gather's backward multiplies its slice by the world size; parameters that act on the gathered tensors (the Siamese
head, learned loss weights) get the whole ∂L/∂θ on every rank, which the average leaves as it is. No collective runs
in the backward pass: every rank holds the same L, so the slice of its own gradient is every rank's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from utils import LOG

# What losses.total_loss reads of the model's outputs; the other outputs stay out of the gather.
LOSS_INPUTS = ("z", "logits", "mu", "logvar", "recon", "recon_target", "sparse_code", "feat", "target_feat",
               "view_logits")


def world_size() -> int:
    """The number of processes of a distributed run (1 for a single process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in a distributed run (0 for a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


class GatherRows(torch.autograd.Function):
    """The ranks' tensors concatenated along the batch, in rank order; the gradient goes to this rank's rows, times
    the world size (DistributedDataParallel's average over the ranks then sums their shares)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, local: Tensor) -> Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = slice(dist.get_rank() * len(local), (dist.get_rank() + 1) * len(local))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return grad[ctx.rows] * dist.get_world_size()


def gather_rows(local: Tensor) -> Tensor:
    """Every rank's `local` [B, ...] as one [world·B, ...] tensor, differentiable in this rank's rows."""
    return GatherRows.apply(local)


@torch.compiler.disable
def gather_batch(outputs: dict[str, Tensor | None], labels: Tensor) -> tuple[dict[str, Tensor | None], Tensor]:
    """The global batch's loss inputs and labels from each rank's share (every rank calls this together; outside a
    compiled graph, which then breaks here)."""
    gathered = {name: None if outputs.get(name) is None else gather_rows(outputs[name]) for name in LOSS_INPUTS}
    return gathered, gather_rows(labels)


def sync_batch_norm(requested: bool | None, world: int, device: torch.device) -> bool:
    """--sync-bn as it applies (`requested` None: the default): on under torchrun on CUDA; off in one process, and on
    the CPU, where SyncBatchNorm does not run (said in the log, louder when asked for)."""
    if world == 1 or requested is False:
        return False
    if device.type != "cuda":
        log = LOG.warning if requested else LOG.info
        log("--sync-bn does not apply on %s: SyncBatchNorm runs only on CUDA, so each rank's BatchNorm normalises "
            "by its own share of the batch", device.type)
        return False
    return True


def has_sync_batch_norm(model: torch.nn.Module) -> bool:
    """Whether the model's BatchNorm layers are SyncBatchNorm (--sync-bn as applied)."""
    return any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules())


def batch_record(p: int, k: int, world: int, sync_bn: bool) -> dict:
    """config.json's record of the global batch: P×K images a step, each rank's share, and SyncBatchNorm."""
    return {"identities": p, "images_per_identity": k, "images": p * k, "world_size": world,
            "images_per_rank": p * k // world, "sync_bn": sync_bn}
