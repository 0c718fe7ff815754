"""Three training steps on a fixed 8×4 global batch, in one process or in each torchrun rank's share of it.

python global_batch_worker.py OUT MODE [train.py flags]: MODE `global` is train.py's step (the losses over the
global batch under torchrun), `local` the step without the gather (each rank's losses over its own share). Rank 0
writes OUT: each step's loss values, the first step's gradients, the parameters after the third step, and the first
step's embeddings. The step runs in float64, so that rounding stays far below Adam's ε: its first steps move a
parameter by about the learning rate whatever the size of its gradient, so a gradient that is zero but for float32's
rounding would move it either way. On the CPU BatchNorm's statistics are frozen (its running statistics normalise),
since SyncBatchNorm runs only on CUDA; on CUDA they are the batch's (SyncBatchNorm's under torchrun).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from datasets import PKSampler  # noqa: E402
from trainstep import TrainStep, apply_gradients  # noqa: E402

IDENTITIES, IMAGES_EACH = 8, 4


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: 8 identities × 4 images of 32×16, identity by identity."""
    images = torch.randn(IDENTITIES * IMAGES_EACH, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    return images, torch.arange(IDENTITIES).repeat_interleave(IMAGES_EACH)


def freeze_batch_norm(model: nn.Module) -> None:
    """BatchNorm layers normalise by their running statistics and leave them as they are."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def main(out: Path, mode: str, flags: list[str]) -> None:
    args = train.parse_args(["--batch-p", str(IDENTITIES), "--batch-k", str(IMAGES_EACH), "--img-size", "32", "16",
                             "--latent-dim", "16", "--backbone-name", "resnet18", *flags])
    rank, world, device = train.start_process(args)
    model, _ = train.build_model(args, IDENTITIES, device)
    model.double().train()
    if device.type == "cpu":
        freeze_batch_norm(model)
    weights = train.loss_weights(args)
    balancer = train.build_balancer(args, weights).to(device)
    optimizer = train.build_optimizer(model, args, balancer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(model, weights, balancer, train.step_options(args))
    if mode == "local":
        step.rank, step.world = 0, 1  # no gather: each rank's losses over its own share, as before the global batch
    step_module = train.build_step_module(step, args, world, device)
    images, labels = fixed_batch()
    rows = PKSampler(labels.tolist(), IDENTITIES, IMAGES_EACH, rank=rank, world_size=world).rows
    images, labels = images[rows].to(device, torch.float64), labels[rows].to(device)
    shared, record = train.shared_layer(model), {"losses": []}
    inputs, views = step.views(images)
    with torch.no_grad():
        record["z"] = model(*inputs, views=views)["z"].cpu()
    for index in range(3):
        step.step = index
        total, terms = step_module(images, labels)
        read = apply_gradients(total, terms, balancer, optimizer, scheduler, shared)
        record["losses"].append(read.result().values)
        if index == 0:
            record["grads"] = {name: p.grad.cpu() for name, p in step.named_parameters() if p.grad is not None}
    record["weights"] = {name: p.detach().cpu() for name, p in step.named_parameters()}
    if rank == 0:
        torch.save(record, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
