"""degradations.py: each training degradation against values worked out by hand, and the batched draw."""

from __future__ import annotations

import ast
import math

import pytest
import torch

import degradations
from conftest import ROOT
from datasets import IMAGENET_MEAN, IMAGENET_STD
from degradations import add_uniform_noise, box_blur, degrade, occlude, sample_block, shift_light, to_normalised


def test_normalising_uses_imagenet_statistics():
    pixels = torch.full((1, 3, 1, 1), 0.5)
    expected = torch.tensor([(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225])
    assert torch.allclose(to_normalised(pixels).flatten(), expected)
    assert torch.allclose(degradations.to_pixels(to_normalised(pixels)), pixels)


def test_a_block_paints_exactly_its_rows_and_columns():
    pixels = torch.zeros(2, 3, 4, 4)
    out = occlude(pixels, top=torch.tensor([1, 0]), left=torch.tensor([2, 0]), height=torch.tensor([2, 1]),
                  width=torch.tensor([1, 3]), colour=torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]]))
    # Image 0: rows 1-2 of column 2; image 1: row 0, columns 0-2.
    assert torch.equal(out[0, :, 1, 2], torch.tensor([0.2, 0.4, 0.6]))
    assert torch.equal(out[0, :, 2, 2], torch.tensor([0.2, 0.4, 0.6]))
    assert int((out[0, 0] != 0).sum()) == 2
    assert torch.equal(out[1, 0, 0], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert int((out[1, 0] != 0).sum()) == 3


def test_light_is_gain_times_cast_times_x_to_the_gamma_clamped():
    pixels = torch.full((1, 3, 2, 2), 0.25)
    out = shift_light(pixels, gain=torch.tensor([2.0]), gamma=torch.tensor([0.5]),
                      cast=torch.tensor([[1.0, 0.5, 1.5]]))
    # 2 · 0.25^0.5 = 1.0; times the cast 1.0, 0.5, 1.5 (clamped to 1).
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 0.5, 1.0]))


def test_box_blur_spreads_an_impulse_over_its_box_and_repeats_edges():
    pixels = torch.zeros(3, 3, 7, 7)
    pixels[:, :, 3, 3] = 1.0
    pixels[:, :, 0, 0] = 1.0
    out = box_blur(pixels, torch.tensor([0, 1, 2]))
    assert torch.equal(out[0], pixels[0])  # radius 0: unchanged
    assert torch.allclose(out[1, 0, 2:5, 2:5], torch.full((3, 3), 1 / 9))
    assert float(out[1, 0, 1, 3]) == pytest.approx(0.0, abs=1e-7)  # outside the 3×3 box of the centre
    # The corner: its 3×3 box holds the corner 4 times (edge repeated) among 9 pixels.
    assert float(out[1, 0, 0, 0]) == pytest.approx(4 / 9)
    # Radius 2: 5×5 box, the centre impulse contributes 1/25 at (1, 1); the corner's (repeated 9 times) 9/25 at 0, 0.
    assert float(out[2, 0, 1, 1]) == pytest.approx(1 / 25 + 4 / 25)
    assert float(out[2, 0, 0, 0]) == pytest.approx(9 / 25)


def test_uniform_noise_is_shared_by_the_channels_and_clamped():
    pixels = torch.tensor([0.5, 0.95, 0.5]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    uniform = torch.tensor([1.0, 1.0, -0.5]).view(1, 1, 1, 3)
    out = add_uniform_noise(pixels, torch.tensor([0.1]), uniform)
    for channel in range(3):
        assert torch.allclose(out[0, channel, 0], torch.tensor([0.6, 1.0, 0.45]))


def test_sampled_blocks_lie_inside_the_image_with_areas_in_range():
    shape = torch.Size([500, 3, 64, 32])
    block = sample_block(shape, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (block["top"] >= 0).all() and (block["top"] + block["height"] <= 64).all()
    assert (block["left"] >= 0).all() and (block["left"] + block["width"] <= 32).all()
    area = (block["height"] * block["width"]).float() / (64 * 32)
    assert 0.07 < float(area.min()) and float(area.max()) < 0.36  # 0.1 to 0.3, rounded to whole pixels
    assert ((block["colour"] >= 0) & (block["colour"] <= 1)).all()


def test_sampled_lighting_lies_in_its_ranges_and_gamma_is_log_uniform():
    # Gain uniform in 0.6..1.4, a cast a channel uniform in 0.85..1.15, γ log-uniform in 0.6..1.6: log γ uniform,
    # so its median is √(0.6·1.6) = 0.980 where a uniform γ's would be 1.1.
    light = degradations.sample_light(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    gain, gamma, cast = light["gain"], light["gamma"], light["cast"]
    assert gain.shape == gamma.shape == (20000,) and cast.shape == (20000, 3)
    assert 0.6 <= float(gain.min()) and float(gain.max()) <= 1.4 and abs(float(gain.mean()) - 1.0) < 0.01
    assert 0.85 <= float(cast.min()) and float(cast.max()) <= 1.15 and abs(float(cast.mean()) - 1.0) < 0.01
    assert 0.6 <= float(gamma.min()) and float(gamma.max()) <= 1.6
    assert float(gamma.median()) == pytest.approx(math.sqrt(0.6 * 1.6), abs=0.01)


def test_degrade_keeps_unchosen_images_bit_for_bit_and_is_seeded():
    images = to_normalised(torch.rand(16, 3, 32, 16, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(degrade(images, torch.Generator().manual_seed(0), 0.0), images)
    every = degrade(images, torch.Generator().manual_seed(0), 1.0)
    assert every.shape == images.shape and every.dtype == images.dtype
    assert all(not torch.equal(every[i], images[i]) for i in range(16))
    assert torch.equal(every, degrade(images, torch.Generator().manual_seed(0), 1.0))
    assert not torch.equal(every, degrade(images, torch.Generator().manual_seed(1), 1.0))
    half = degrade(images, torch.Generator().manual_seed(0), 0.5)
    changed = sum(not torch.equal(half[i], images[i]) for i in range(16))
    assert 0 < changed < 16
    # degraded images stay valid pictures: each channel within what normalising pixels in [0, 1] can give
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    low, high = ((edge - mean) / std for edge in (0.0, 1.0))
    per_channel = every.transpose(0, 1).reshape(3, -1)
    assert (per_channel.amin(1) >= low - 1e-5).all() and (per_channel.amax(1) <= high + 1e-5).all()


def test_degradations_never_import_the_evaluated_corruptions():
    tree = ast.parse((ROOT / "degradations.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("corrupt" in name for name in imported)
