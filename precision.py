"""Mixed precision: the dtype a training step computes in, and float16's dynamic loss scale kept on the device."""

from __future__ import annotations

import torch

# An overflow at a scale this low is not the scale's doing but the gradient's own: it stops the run as a non-finite
# gradient does in float32, instead of halving the scale for ever.
MIN_SCALE = 1.0


def autocast_dtype(amp: bool, device_type: str, native_bf16: bool) -> torch.dtype:
    """The dtype a step computes in: float32 without --amp or off CUDA; bfloat16 on a GPU that has it natively,
    else float16 with a loss scale (V100, T4)."""
    if not amp or device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16 else torch.float16


def has_native_bf16(device: torch.device) -> bool:
    """Whether a device computes bfloat16 natively: a CUDA GPU of compute capability 8 or more (Ampere on), or ROCm;
    older GPUs only emulate it."""
    return device.type == "cuda" and (torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8)


class LossScaler:
    """float16's dynamic loss scale and skip flags, all on the device, so a step never waits on the host.

    The loss is multiplied by `scale` before backward; the fused optimiser divides it out of the gradients (its
    grad_scale) and skips its update while `found_inf` is set. An overflow skips its step's update and halves the
    scale; `growth_interval` steps in a row without one double it (torch.amp.GradScaler's rule and kernel).
    `halted` is the run's lasting skip: set by a non-finite loss, it keeps every later update skipped until the
    host reads it and stops the run."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), device=device)
        self.halted = torch.zeros((), device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def update_(self) -> None:
        """After the optimiser's step: halve the scale if this step was skipped, else count toward doubling it."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, float | int]:
        """The scale and the count of steps since it last changed (read on the host: for checkpoints)."""
        return {"scale": self.scale.item(), "growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Continue from a state_dict."""
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])
