"""precision.py: the dtype --amp picks by GPU, and float16's loss scale through trainstep's sync-free step."""

from __future__ import annotations

import pytest
import torch

import precision
import train
import trainstep


@pytest.mark.parametrize(("amp", "device_type", "native_bf16", "expected"), [
    (False, "cuda", True, torch.float32), (False, "cuda", False, torch.float32),
    (True, "cpu", True, torch.float32), (True, "cpu", False, torch.float32),
    (True, "cuda", True, torch.bfloat16), (True, "cuda", False, torch.float16)])
def test_amp_picks_bfloat16_where_native_else_float16_and_float32_without_cuda(amp: bool, device_type: str,
                                                                               native_bf16: bool,
                                                                               expected: torch.dtype):
    assert precision.autocast_dtype(amp, device_type, native_bf16) == expected


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_native_bfloat16_is_compute_capability_8_or_more(capability: tuple[int, int], native: bool,
                                                         monkeypatch: pytest.MonkeyPatch):
    """V100 (7.0) and T4 (7.5) emulate bfloat16 (torch.cuda.is_bf16_supported() says yes by default): float16."""
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    device = torch.device("cuda", 1)
    assert precision.has_native_bf16(device) is native
    assert asked == [device]
    expected = torch.bfloat16 if native else torch.float16
    assert precision.autocast_dtype(True, device.type, precision.has_native_bf16(device)) == expected
    assert not precision.has_native_bf16(torch.device("cpu"))


def scaled_step(init_scale: float = 16.0, growth_interval: int = 2000):
    """One parameter of three ones under fused Adam (lr 0.1) with a loss scale, and a function running
    apply_gradients on a loss made from it; the gradients backward produced (scaled) are kept in `seen`."""
    weight = torch.nn.Parameter(torch.ones(3))
    scaler = precision.LossScaler(torch.device("cpu"), init_scale=init_scale, growth_interval=growth_interval)
    optimizer = trainstep.guard_updates(torch.optim.Adam([weight], lr=0.1, fused=True), scaler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = train.parse_args([])
    balancer = train.build_balancer(args, train.loss_weights(args))
    seen = []
    weight.register_hook(lambda grad: seen.append(grad.clone()))

    def step(total: torch.Tensor) -> trainstep.StepResult:
        return trainstep.apply_gradients(total, {"id": total}, balancer, optimizer, scheduler, weight,
                                         scaler=scaler).result()

    return weight, optimizer, scaler, seen, step


def test_the_loss_is_scaled_before_backward_and_adam_unscales_it():
    """Backward sees 16 × the loss; the update is the unscaled one, bit for bit (a power of 2 divides exactly)."""
    weight, optimizer, scaler, seen, step = scaled_step(16.0)
    reference = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.Adam([reference], lr=0.1, fused=True)
    for _ in range(2):
        expected = float((reference.detach() ** 2).sum())
        assert step((weight ** 2).sum()) == ({"loss": expected, "id": expected}, False, False)
        plain.zero_grad()
        (reference ** 2).sum().backward()
        assert torch.equal(seen[-1], 16.0 * reference.grad)
        plain.step()
        assert torch.equal(weight.detach(), reference.detach())
    assert optimizer.state[weight]["step"].item() == 2.0
    assert scaler.state_dict() == {"scale": 16.0, "growth_tracker": 2}


def test_an_overflow_skips_its_update_halves_the_scale_and_training_goes_on():
    weight, optimizer, scaler, _, step = scaled_step(2.0**16)
    step(weight.sum())
    moved = weight.detach().clone()
    values, skipped, stop = step(weight.sum() * 1e36)  # finite, but 1e36 × 2¹⁶ overflows float32's gradient
    assert values["loss"] == pytest.approx(float(moved.sum()) * 1e36) and not skipped and not stop
    assert torch.equal(weight.detach(), moved)
    assert optimizer.state[weight]["step"].item() == 1.0
    assert scaler.state_dict() == {"scale": 2.0**15, "growth_tracker": 0}
    assert step(weight.sum()) == ({"loss": pytest.approx(float(moved.sum())), "id": pytest.approx(float(moved.sum()))},
                                  False, False)
    assert (weight.detach() < moved).all()  # the next update lands
    assert optimizer.state[weight]["step"].item() == 2.0
    assert scaler.state_dict() == {"scale": 2.0**15, "growth_tracker": 1}


def test_the_scale_doubles_after_growth_interval_steps_without_an_overflow():
    weight, _, scaler, _, step = scaled_step(4.0, growth_interval=3)
    scales = []
    for _ in range(7):
        step(weight.sum())
        scales.append(scaler.state_dict()["scale"])
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_a_non_finite_loss_halts_under_a_loss_scale_as_in_float32():
    """A NaN loss is not an overflow: its update and every later one are skipped until the host stops the run."""
    weight, optimizer, _, _, step = scaled_step()
    step(weight.sum())
    moved = weight.detach().clone()
    assert step(weight.sum() * float("nan"))[1]
    assert step(weight.sum())[1]
    assert torch.equal(weight.detach(), moved)
    assert optimizer.state[weight]["step"].item() == 1.0


def test_a_non_finite_gradient_halts_once_the_scale_is_down_to_min_scale():
    """√(0·w) has a finite value and an infinite gradient at any scale: an overflow at scale 2 (halved to 1), a
    halt at 1 (precision.MIN_SCALE), as no lower scale would make it finite."""
    weight, optimizer, scaler, _, step = scaled_step(2.0)
    values, skipped, _ = step(weight.sum() + (weight * 0).sqrt().sum())
    assert values["loss"] == 3.0 and not skipped and scaler.state_dict()["scale"] == precision.MIN_SCALE
    assert step(weight.sum() + (weight * 0).sqrt().sum())[1]
    assert step(weight.sum())[1]
    assert torch.equal(weight.detach(), torch.ones(3))
    assert optimizer.state[weight]["step"].item() == 0.0


def test_scaler_state_round_trips():
    scaler = precision.LossScaler(torch.device("cpu"), init_scale=2.0**16)
    scaler.found_inf.fill_(1.0)
    scaler.update_()
    other = precision.LossScaler(torch.device("cpu"))
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == {"scale": 2.0**15, "growth_tracker": 0}
    assert other.scale.dtype == torch.float32 and other.growth_tracker.dtype == torch.int32
