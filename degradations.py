"""Training-time degradations of a normalised image batch: occluding blocks, lighting and colour shifts, box
blur and uniform luminance noise, with per-sample parameters drawn from a torch.Generator.

Our own parameter families, disjoint from the evaluated corruptions (corruptions.py, Market-1501-C): a flat
coloured block rather than erasing noise, a gain·x^γ·cast light model rather than HSV brightness or contrast,
a box kernel rather than Gaussian, defocus, motion or zoom blur, and uniform noise shared by the three channels
rather than Gaussian, shot, impulse or speckle noise. Nothing here calls the benchmark's functions, so gains on
the corrupted test are not memorised corruptions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from datasets import IMAGENET_MEAN, IMAGENET_STD
from utils import device_constant

FAMILIES = ("occlude", "light", "blur", "noise")
# Parameter ranges, in pixel units of [0, 1] images.
OCCLUDE_AREA = (0.1, 0.3)  # share of the image a block covers
OCCLUDE_ASPECT = (0.5, 2.0)  # block height / width, relative to the image's
GAIN = (0.6, 1.4)
GAMMA = (0.6, 1.6)
CAST = (0.85, 1.15)  # per-channel multiplier
BLUR_RADII = (1, 2, 3)  # box kernels of 3, 5, 7 pixels
NOISE_AMPLITUDE = (0.05, 0.2)


def _stats(images: Tensor) -> tuple[Tensor, Tensor]:
    mean = device_constant(IMAGENET_MEAN, images.device, images.dtype)[None, :, None, None]
    std = device_constant(IMAGENET_STD, images.device, images.dtype)[None, :, None, None]
    return mean, std


def to_pixels(images: Tensor) -> Tensor:
    """Normalised images (ImageNet statistics) back to [0, 1] pixels, clamped."""
    mean, std = _stats(images)
    return (images * std + mean).clamp(0, 1)


def to_normalised(pixels: Tensor) -> Tensor:
    """[0, 1] pixels to images normalised with ImageNet statistics."""
    mean, std = _stats(pixels)
    return (pixels - mean) / std


def occlude(pixels: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, colour: Tensor) -> Tensor:
    """Each image with the block rows [top, top+height), columns [left, left+width) painted a flat RGB colour."""
    rows = torch.arange(pixels.shape[2], device=pixels.device)[None, :, None]
    cols = torch.arange(pixels.shape[3], device=pixels.device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + height)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + width)[:, None, None]))
    return torch.where(inside[:, None], colour[:, :, None, None].to(pixels.dtype), pixels)


def shift_light(pixels: Tensor, gain: Tensor, gamma: Tensor, cast: Tensor) -> Tensor:
    """gain · cast_c · x^γ per image (gain, γ: [N]; cast: [N, 3]), clamped to [0, 1]."""
    scale = gain[:, None] * cast
    return (scale[:, :, None, None] * pixels.pow(gamma[:, None, None, None])).clamp(0, 1)


def box_blur(pixels: Tensor, radius: Tensor) -> Tensor:
    """Each image averaged over a (2r+1)² box with edge pixels repeated; r = radius[n], 0 leaves it as it is."""
    out = pixels
    for r in BLUR_RADII:
        padded = F.pad(pixels, (r, r, r, r), mode="replicate")
        blurred = F.avg_pool2d(padded, 2 * r + 1, stride=1)
        out = torch.where((radius == r)[:, None, None, None], blurred, out)
    return out


def add_uniform_noise(pixels: Tensor, amplitude: Tensor, uniform: Tensor) -> Tensor:
    """Luminance noise: amplitude[n] · uniform (in [−1, 1], [N, 1, H, W], the same for the three channels)."""
    return (pixels + amplitude[:, None, None, None] * uniform).clamp(0, 1)


def _uniform(low: float, high: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _log_uniform(low: float, high: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.exp(_uniform(math.log(low), math.log(high), n, generator, device))


def sample_block(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """A block a sample: area share and aspect from their ranges, a place inside the image, an RGB colour."""
    n, _, h, w = shape
    area = _uniform(*OCCLUDE_AREA, n, generator, device)
    aspect = _log_uniform(*OCCLUDE_ASPECT, n, generator, device)
    height = (h * (area * aspect).sqrt()).round().clamp(1, h).long()
    width = (w * (area / aspect).sqrt()).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator, device=device) * (h - height + 1)).long()
    left = (torch.rand(n, generator=generator, device=device) * (w - width + 1)).long()
    colour = torch.rand(n, 3, generator=generator, device=device)
    return {"top": top, "left": left, "height": height, "width": width, "colour": colour}


def sample_light(n: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """Gain and γ (log-uniform) a sample, and a per-channel cast."""
    gamma = _log_uniform(*GAMMA, n, generator, device)
    cast = CAST[0] + (CAST[1] - CAST[0]) * torch.rand(n, 3, generator=generator, device=device)
    return {"gain": _uniform(*GAIN, n, generator, device), "gamma": gamma, "cast": cast}


def degrade(images: Tensor, generator: torch.Generator, prob: float, part: tuple[int, int] = (0, 1)) -> Tensor:
    """A degraded view of a normalised batch: each image, with probability `prob`, gets one family drawn
    uniformly from FAMILIES with parameters of its own; the others are returned unchanged (bit for bit).

    Every parameter is drawn for every image whatever is chosen, so the draws depend on the batch size only. With
    `part` (rank, world), `images` is that rank's rows of a batch world times as large, and takes their draws: a
    batch split over the ranks is degraded as it would be whole.
    """
    rank, world = part
    n, device = images.shape[0] * world, images.device
    rows = slice(rank * images.shape[0], (rank + 1) * images.shape[0])
    chosen = (torch.rand(n, generator=generator, device=device) < prob)[rows]
    family = torch.randint(len(FAMILIES), (n,), generator=generator, device=device)[rows]
    block = {name: value[rows] for name, value in sample_block((n, *images.shape[1:]), generator, device).items()}
    light = {name: value[rows] for name, value in sample_light(n, generator, device).items()}
    radius = device_constant(BLUR_RADII, device)[
        torch.randint(len(BLUR_RADII), (n,), generator=generator, device=device)][rows]
    amplitude = _uniform(*NOISE_AMPLITUDE, n, generator, device)[rows]
    uniform = 2 * torch.rand(n, 1, *images.shape[2:], generator=generator, device=device)[rows] - 1
    with torch.no_grad():
        pixels = to_pixels(images.float())
        views = (occlude(pixels, **block), shift_light(pixels, **light), box_blur(pixels, radius),
                 add_uniform_noise(pixels, amplitude, uniform))
        degraded = pixels
        for index, view in enumerate(views):
            degraded = torch.where((family == index)[:, None, None, None], view, degraded)
        degraded = to_normalised(degraded).to(images.dtype)
    return torch.where(chosen[:, None, None, None], degraded, images)
