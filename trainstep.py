"""The training step: forward and losses in one module, and an update queued on the device without a sync.

A step's loss values travel to the host while the device works on and are read one step later; an update whose
loss or gradients are not finite is skipped on the device (fused Adam's found_inf flag) and stays skipped until
that read stops the run, so the parameters it leaves are the last good ones. Under float16's loss scale
(precision.LossScaler) a gradient overflow skips its own step's update alone, lowers the scale, and training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from augmix import augmix_views
from degradations import degrade
from globalbatch import gather_batch, rank, world_size
from losses import LossBalancer, LossWeights, pk_pair_count, total_loss
from model import ReIDModel
from precision import MIN_SCALE, LossScaler

# The streams of a step's own draws (step_seed): the degraded views', the Siamese head's random negatives', and the
# AugMix views'.
VIEW_DRAWS, PAIR_DRAWS, AUGMIX_DRAWS = 0, 1, 2
# With --augmix the model sees the clean batch and two AugMix views of it (CIL's three).
AUGMIX_VIEWS = 3


def kl_beta(step: int, warmup_steps: int, beta: float) -> float:
    """The KL's β at a step: linear from 0 at step 0 to `beta` at `warmup_steps`, then `beta`."""
    return beta if step >= warmup_steps else beta * step / warmup_steps


def step_seed(seed: int, stream: int, step: int) -> int:
    """The seed of a step's draws of one stream: a function of the run's seed, the stream and the step alone, so a
    resumed run draws as an uninterrupted one would, and every rank, whatever their number, as one process would."""
    return (seed * 1_000_003 + stream) * 1_000_003 + step


def step_generator(seed: int, stream: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by step_seed."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, stream, step))


@dataclass(frozen=True)
class StepOptions:
    """What a training step needs beyond the model and the loss weights: the loss options, the batch's images an
    identity, the views and their draws' seed, and the KL's β schedule in steps."""

    margin: float = 0.3
    label_smoothing: float = 0.1
    sparsity_target: float = 0.05
    sparsity_mode: str = "kl"
    batch_k: int = 4
    degraded_views: bool = True
    degrade_prob: float = 0.5
    augmix: bool = False
    seed: int = 0
    kl_warmup_steps: int = 0
    beta: float = 1.0

    def loss_options(self) -> dict:
        """total_loss's keyword options."""
        return {"margin": self.margin, "label_smoothing": self.label_smoothing,
                "sparsity_target": self.sparsity_target, "sparsity_mode": self.sparsity_mode}


class TrainStep(nn.Module):
    """Forward and losses in one module, so DistributedDataParallel sees every parameter the losses use.

    Under torchrun the losses are the global batch's: each rank's share of the P×K batch goes through the model,
    and the loss inputs of every rank are gathered (globalbatch.py). The loop sets `step` before each batch: it
    fixes the KL's β (--kl-warmup, --beta), the views' draws (--degraded-views, --degrade-prob, --augmix) and the
    Siamese head's random negatives, each drawn for the global batch whatever the number of ranks."""

    def __init__(self, model: ReIDModel, weights: LossWeights, balancer: LossBalancer, options: StepOptions):
        super().__init__()
        self.model, self.weights, self.balancer = model, weights, balancer
        self.options = options.loss_options()
        self.batch_k = options.batch_k
        self.degraded_views, self.degrade_prob, self.seed = options.degraded_views, options.degrade_prob, options.seed
        self.augmix = options.augmix
        # The clean view goes through the backbone only for what is made from it: a reconstruction target or the
        # consistency term's feature.
        self.needs_clean = model.ae_name != "none" or model.recon_target == "image" or weights.consistency > 0
        # Only a feature target or the consistency term needs the clean view's backbone pass; an image target reads
        # the clean images themselves.
        self.clean_pass = (model.ae_name != "none" and model.recon_target == "feature") or weights.consistency > 0
        self.kl_warmup_steps, self.beta = options.kl_warmup_steps, options.beta
        # β at this step on the device, shared with the balancer: a compiled step reads the tensor, so a new step
        # neither recompiles it nor changes its CUDA graph.
        self.register_buffer("kl_scale", torch.ones((), device=next(model.parameters()).device), persistent=False)
        balancer.kl_scale = self.kl_scale
        self.step = 0
        self.rank, self.world = rank(), world_size()  # this process's share of the global batch

    @property
    def step(self) -> int:
        """The step the next batch is: it fixes β (kl_scale) and the degraded views' draws."""
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        self._step = step
        self.kl_scale.fill_(kl_beta(step, self.kl_warmup_steps, self.beta))

    @torch.compiler.disable
    def views(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int]:
        """The model's inputs and their number of stacked views. --augmix: the clean batch and two AugMix views,
        stacked (3). --degraded-views: the degraded batch, which every loss sees, and the clean one, which only the
        targets are made from, when something is (else plain augmentation). Else the batch alone."""
        if self.augmix:
            seed = step_seed(self.seed, AUGMIX_DRAWS, self.step)
            mixed = augmix_views(images, seed, AUGMIX_VIEWS - 1, (self.rank, self.world))
            return (torch.cat([images, *mixed]),), AUGMIX_VIEWS
        if not self.degraded_views:
            return (images,), 1
        generator = step_generator(self.seed, VIEW_DRAWS, self.step, images.device)
        degraded = degrade(images, generator, self.degrade_prob, (self.rank, self.world))
        return ((degraded, images) if self.needs_clean else (degraded,)), 1

    @torch.compiler.disable
    def pair_lottery(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The Siamese head's random negatives' draw (mine_pairs' `lottery`) for a batch of `batch` images, the same
        on every rank; None when the term is off."""
        if not self.weights.bce:
            return None
        generator = step_generator(self.seed, PAIR_DRAWS, self.step, device)
        return torch.rand(batch * (batch - 1) // 2, generator=generator, device=device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lottery = self.pair_lottery(len(labels) * self.world, images.device)
        inputs, views = self.views(images)
        outputs = self.model(*inputs, views=views, clean_pass=self.clean_pass)
        if views > 1:
            outputs = clean_view_rows(outputs, views)
        if not self.weights.consistency:  # only the consistency term reads them: no gather for them
            outputs = {**outputs, "feat": None, "target_feat": None}
        if self.world > 1:
            outputs, labels = gather_batch(outputs, labels)
        # A P×K batch's pair count follows from its size, so mining the Siamese pairs never reads the labels.
        total, terms = total_loss(outputs, labels, self.weights, self.model, kl_scale=self.kl_scale, **self.options,
                                  pair_count=pk_pair_count(len(labels), self.batch_k), lottery=lottery)
        if self.balancer.mode != "fixed":
            total = self.balancer(terms)  # it weighs the KL, and GradNorm measures its gradient, by kl_scale
        return total, terms


def clean_view_rows(outputs: dict[str, torch.Tensor | None], views: int) -> dict[str, torch.Tensor | None]:
    """Outputs of stacked views (clean first) as CIL's losses take them: the embedding and identity logits of the
    clean view, which triplet, identity and Siamese terms see, and every view's logits, [B, views, C], for the JS
    term; the per-row terms (reconstruction, consistency, KL, sparsity) keep every view's rows."""
    rows = len(outputs["z"]) // views
    logits = outputs["logits"]
    return {**outputs, "z": outputs["z"][:rows], "logits": logits[:rows],
            "view_logits": logits.view(views, rows, -1).transpose(0, 1)}


def average_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the processes of a distributed run (itself in a single process)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0/1 flag's maximum over the processes of a distributed run (itself in a single process)."""
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def batch_losses(step_module: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 precision: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch to the device and through the model and losses: autocast to `precision` and channels_last, unless
    it is float32 (precision.autocast_dtype's choice)."""
    amp = precision != torch.float32
    images = images.to(device, non_blocking=True)
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=precision, enabled=amp):
        return step_module(images, labels)


def guard_updates(optimizer: torch.optim.Optimizer, scaler: LossScaler | None = None) -> torch.optim.Optimizer:
    """Arm a fused Adam to skip its update on the device while its flag is set (GradScaler's found_inf protocol),
    and with a float16 loss scale, to divide the scale out of the gradients itself; apply_gradients sets the flag."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("skipping a non-finite update on the device needs a fused optimiser (fused=True)")
    if scaler is not None:
        optimizer.grad_scale, optimizer.found_inf = scaler.scale, scaler.found_inf
        return optimizer
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    optimizer.grad_scale, optimizer.found_inf = None, torch.zeros((), device=device)
    return optimizer


def grad_norms(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The norm of each gradient the optimiser holds, in one kernel (clip_grad_norm_'s); a norm is finite iff its
    tensor is."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads))


def flag_non_finite(optimizer: torch.optim.Optimizer, values: torch.Tensor,
                    stop_requested: bool = False) -> torch.Tensor:
    """Set the optimiser's skip flag when a loss value or a gradient is not finite, on any rank (once set it stays
    set, so no later update lands on top of a skipped one); return [1] when any rank was asked to stop, else [0]."""
    finite = torch.isfinite(values).all() & torch.isfinite(grad_norms(optimizer)).all()
    # one all-reduce for both flags: every rank reads the same stop request at the same step
    flags = any_rank(torch.stack([(~finite).float(), values.new_full((), float(stop_requested))]))
    torch.maximum(optimizer.found_inf, flags[0], out=optimizer.found_inf)
    return flags[1:]


def flag_overflow(optimizer: torch.optim.Optimizer, scaler: LossScaler, values: torch.Tensor,
                  stop_requested: bool = False) -> torch.Tensor:
    """flag_non_finite under a float16 loss scale, on any rank: a non-finite loss sets the scaler's lasting skip
    (halted); a non-finite unscaled gradient with finite losses is an overflow, which skips this step alone (and
    lowers the scale), unless the scale is down to MIN_SCALE already: then it halts too. Return [stop] as
    flag_non_finite does."""
    overflow = ~torch.isfinite(grad_norms(optimizer) / scaler.scale).all()
    flags = any_rank(torch.stack([(~torch.isfinite(values).all()).float(), overflow.float(),
                                  values.new_full((), float(stop_requested))]))
    halt = torch.maximum(flags[0], flags[1] * (scaler.scale <= MIN_SCALE))
    torch.maximum(scaler.halted, halt, out=scaler.halted)
    torch.maximum(scaler.halted, flags[1], out=scaler.found_inf)
    return flags[2:]


class StepResult(NamedTuple):
    """A step's values as read on the host: the loss and each term by name, whether its update was skipped for a
    non-finite value that stops the run (a float16 overflow's skip is not reported: training goes on), and whether
    any rank was asked to stop."""

    values: dict[str, float]
    skipped: bool
    stop: bool


@dataclass
class LossRead:
    """One step's loss values, skip and stop flags on their way to the host, and where the step stood in its epoch."""

    names: tuple[str, ...]
    host: torch.Tensor
    ready: torch.cuda.Event | None
    step: int = 0
    batch: int = 0
    images: int = 0

    def result(self) -> StepResult:
        """The values and flags on the host; waits only for this step's forward and backward passes, long finished
        when read a step later."""
        if self.ready is not None:
            self.ready.synchronize()
        *values, skipped, stop = self.host.tolist()
        return StepResult(dict(zip(self.names, values, strict=True)), skipped > 0, stop > 0)


def queue_read(names: tuple[str, ...], values: torch.Tensor) -> LossRead:
    """Start copying a step's values to the host: into pinned memory without waiting on CUDA, at once elsewhere."""
    if values.device.type != "cuda":
        return LossRead(names, values, None)
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return LossRead(names, host, ready)


def apply_gradients(total: torch.Tensor, terms: dict[str, torch.Tensor], balancer: LossBalancer,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    shared: torch.Tensor, stop_requested: bool = False, scaler: LossScaler | None = None) -> LossRead:
    """Backward, GradNorm's weight gradient when balancing so, the finite check, the optimiser and schedule steps
    (and with a float16 `scaler`, the scaled backward and the scale's update), all queued without a device sync; the
    step's values and flags come back as a LossRead (optimizer from guard_updates, with the same scaler;
    `stop_requested`, this rank's, is shared with the others in the same all-reduce)."""
    optimizer.zero_grad(set_to_none=True)
    balance_grad = balancer.gradnorm_grad(terms, shared, average_over_ranks) if balancer.mode == "gradnorm" else None
    (total if scaler is None else total * scaler.scale).backward()
    if balance_grad is not None:  # in the gradients' units: the optimiser divides every one by the scale
        balancer.weights.grad = balance_grad if scaler is None else balance_grad * scaler.scale
    values = torch.stack([value.detach().float() for value in (total, *terms.values())])
    skipped, stop = ((optimizer.found_inf, flag_non_finite(optimizer, values, stop_requested)) if scaler is None
                     else (scaler.halted, flag_overflow(optimizer, scaler, values, stop_requested)))
    read = queue_read(("loss", *terms), torch.cat([values, skipped[None], stop]))
    optimizer.step()
    if scaler is not None:
        scaler.update_()
    balancer.renormalise_()
    scheduler.step()
    return read


def rewind_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Set the schedule (and the optimiser's learning rates) back to where it stood before `step`'s update."""
    scheduler.last_epoch = step - 1
    scheduler.step()
