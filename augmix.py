"""AugMix views of a normalised batch (Hendrycks et al., ICLR 2020), as CIL trains with them (Chen et al., NeurIPS
2021): torchvision's AugMix restricted to the operations that are none of the benchmark's corruptions.

torchvision's AugMix draws one set of operations for a whole batch and reads the global generator, so each image is
augmented on its own, on the host, under a seed of its own: the views are the same whatever the number of ranks,
and a resumed run draws them as an uninterrupted one. On a GPU this host loop runs before each step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from degradations import to_normalised, to_pixels

# AugMix's operations without brightness, colour, contrast and sharpness (all_ops=False): the paper leaves those
# out because they overlap the corruption benchmark (brightness, contrast, saturate are Market-1501-C's).
AUGMIX_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Solarize", "AutoContrast",
              "Equalize")
SEED_SPACE = 2**63


def augmix_transform() -> v2.AugMix:
    """torchvision's AugMix at its defaults (severity 3, 3 chains of 1 to 3 operations, α = 1) over AUGMIX_OPS."""
    return v2.AugMix(all_ops=False)


def image_seed(step_seed: int, view: int, row: int) -> int:
    """The seed of one image's AugMix draws: a function of the step's seed, the view and the image's row in the
    global batch alone."""
    return ((step_seed * 7 + view) * 1_000_003 + row) % SEED_SPACE


def augmix_views(images: Tensor, step_seed: int, count: int = 2, part: tuple[int, int] = (0, 1)) -> list[Tensor]:
    """`count` AugMix views of a normalised batch, each image mixed under image_seed; with `part` (rank, world),
    `images` is that rank's rows of a global batch world times as large and takes those rows' draws."""
    rank, _ = part
    transform = augmix_transform()
    pixels = (to_pixels(images.detach().float()) * 255).round().to(torch.uint8).cpu()
    first_row = rank * len(images)
    views = []
    for view in range(count):
        mixed = torch.empty_like(pixels)
        for index, image in enumerate(pixels):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(image_seed(step_seed, view, first_row + index))
                mixed[index] = transform(image)
        views.append(to_normalised(mixed.float() / 255).to(images.device, images.dtype))
    return views
