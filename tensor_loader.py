"""The decoded data set: images decoded once into one uint8 tensor, batched per-sample augmentation, tensor loaders.

The training images are decoded and resized once (PIL's bicubic, as the PIL path's Resize) into a [N, 3, H, W] uint8
tensor kept on the training device when it fits, else in the CPU's memory; a set that fits neither falls back
to the PIL loader with a message. Each batch is gathered, flipped, padded-and-cropped, normalised and erased as one
batch with per-sample parameters drawn for the global P×K batch from a generator seeded by (seed, epoch, batch), each
rank taking its rows, so --resume repeats an interrupted epoch exactly, whatever the number of processes. The
parameters follow the PIL path's distributions (datasets.build_transforms).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import kornia.enhance
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SATURATION,
    PKSampler,
    build_transforms,
    crop_padding,
    eval_loader,
    load_image,
    train_loader,
)
from layouts import ImageRecord
from utils import LOG, device_constant

LOADERS = ("tensor", "pil")
# Shares of free memory the decoded set may take: on a GPU the model's activations need the rest; on the CPU the
# page cache and the loader's batches.
DEVICE_SHARE, HOST_SHARE = 0.4, 0.5
# torchvision's RandomErasing: area share, log aspect ratio, attempts.
ERASE_SCALE, ERASE_RATIO, ERASE_ATTEMPTS = (0.02, 0.33), (0.3, 3.3), 10


# ---------------------------------------------------------------------------------------------------------
# Decoding once, and where the result fits
# ---------------------------------------------------------------------------------------------------------


def decoded_bytes(count: int, img_size: tuple[int, int]) -> int:
    """Bytes of `count` decoded RGB images at `img_size`."""
    return count * 3 * img_size[0] * img_size[1]


def free_memory(device: torch.device) -> int:
    """Bytes free for the decoded set: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages, where no meminfo
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        lines = [line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:")]
        available = int(lines[0].split()[1]) * 1024 if lines else available
    return available


def store_device(count: int, img_size: tuple[int, int], device: torch.device) -> torch.device | None:
    """Where a decoded set fits: the training device, else the CPU's memory, else None."""
    need = decoded_bytes(count, img_size)
    if device.type == "cuda" and need <= DEVICE_SHARE * free_memory(device):
        return device
    cpu = torch.device("cpu")
    return cpu if need <= HOST_SHARE * free_memory(cpu) else None


def decode_one(path: str, img_size: tuple[int, int]) -> np.ndarray:
    """One image as HWC uint8 at `img_size`, resized as the PIL path's Resize does (bicubic)."""
    image = load_image(path)
    if image.size != (img_size[1], img_size[0]):
        image = image.resize((img_size[1], img_size[0]), Image.BICUBIC)
    return np.array(image)  # writable, so torch takes it without a warning


def decode_records(records: Sequence[ImageRecord], img_size: tuple[int, int], threads: int, device: torch.device,
                   progress: bool = True) -> torch.Tensor:
    """The images as one [N, 3, H, W] uint8 tensor on `device`, decoded by threads (the loader reads it in this
    process, so on the CPU it needs no shared memory)."""
    store = torch.empty(len(records), 3, *img_size, dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes and resizes outside the GIL
        pixels = pool.map(lambda r: decode_one(r.path, img_size), records)
        for i, array in enumerate(tqdm(pixels, total=len(records), desc="decoding", unit="img", disable=not progress)):
            store[i] = torch.from_numpy(array).permute(2, 0, 1)
    return store.to(device)


def decoded_or_none(records: Sequence[ImageRecord], img_size: tuple[int, int], threads: int, device: torch.device,
                    what: str, progress: bool = True) -> torch.Tensor | None:
    """The decoded set where it fits, or None after a message saying why the PIL loader is used instead."""
    where = store_device(len(records), img_size, device)
    if where is None:
        need = decoded_bytes(len(records), img_size) / 2**30
        LOG.warning("--loader tensor: the %d %s images at %d×%d need %.2f GiB decoded, more than fits on %s or in "
                    "host memory (%.2f GiB free); loading them with --loader pil instead", len(records), what,
                    *img_size, need, device, free_memory(torch.device("cpu")) / 2**30)
        return None
    return decode_records(records, img_size, threads, where, progress)


# ---------------------------------------------------------------------------------------------------------
# Batched augmentation with per-sample parameters
# ---------------------------------------------------------------------------------------------------------


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, queued: a host tensor goes to a GPU through pinned memory, so the host does not wait for
    the work already queued there (a plain copy from pageable memory synchronises the stream first)."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, batch): a resumed epoch draws the same parameters."""
    # The fourth entry is 0 for every rank: the draws are the global batch's, and checkpoints resume with them.
    state = np.random.SeedSequence([seed, epoch, batch, 0]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample parameters of one batch, on the CPU: flip, crop offsets in the padded image, erasing boxes
    (top, left, height, width; height 0 means none) and lighting factors (None without --lighting)."""

    flip: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    lighting: torch.Tensor | None
    lighting_order: list[int]

    def rows(self, rows: slice) -> AugmentParams:
        """The parameters of the batch's `rows` alone."""
        return AugmentParams(self.flip[rows], self.offsets[rows], self.boxes[rows],
                             None if self.lighting is None else self.lighting[rows], self.lighting_order)


def erase_boxes(count: int, img_size: tuple[int, int], p: float, generator: torch.Generator) -> torch.Tensor:
    """RandomErasing's boxes [count, 4] as torchvision draws them: with probability p, up to 10 tries of an area share
    in (0.02, 0.33) and a log-uniform aspect in (0.3, 3.3), the first that fits; height 0 where none is erased."""
    h, w = img_size
    erase = torch.rand(count, generator=generator) < p
    area = torch.empty(count, ERASE_ATTEMPTS).uniform_(*ERASE_SCALE, generator=generator) * (h * w)
    log_ratio = torch.empty(count, ERASE_ATTEMPTS).uniform_(*map(math.log, ERASE_RATIO), generator=generator)
    ratio = log_ratio.exp()
    heights = (area * ratio).sqrt().round().long()
    widths = (area / ratio).sqrt().round().long()
    fits = (heights < h) & (widths < w)
    first = fits.int().argmax(1, keepdim=True)
    box_h, box_w = heights.gather(1, first)[:, 0], widths.gather(1, first)[:, 0]
    erase &= fits.any(1)
    top = (torch.rand(count, generator=generator) * (h - box_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (w - box_w + 1)).long()
    return torch.stack([top, left, box_h * erase, box_w * erase], 1)


def draw_params(count: int, img_size: tuple[int, int], erasing: float, lighting: bool,
                generator: torch.Generator) -> AugmentParams:
    """One batch's parameters: flip with probability ½, crop offsets uniform in 0..2·pad, erasing boxes, and with
    --lighting brightness, contrast, saturation and hue factors uniform in ColorJitter's ranges, in a random order."""
    pad = crop_padding(img_size)
    flip = torch.rand(count, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator)
    boxes = erase_boxes(count, img_size, erasing, generator)
    factors, order = None, []
    if lighting:
        low = torch.tensor([1 - BRIGHTNESS, 1 - CONTRAST, 1 - SATURATION, -HUE])
        high = torch.tensor([1 + BRIGHTNESS, 1 + CONTRAST, 1 + SATURATION, HUE])
        factors = low + (high - low) * torch.rand(count, 4, generator=generator)
        order = torch.randperm(4, generator=generator).tolist()
    return AugmentParams(flip, offsets, boxes, factors, order)


def crop_indices(params: AugmentParams, img_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows [B, H] and columns [B, W] of each output pixel: edge padding is a clamped index, the flip a
    reversed one (flip before pad-and-crop, as the PIL path)."""
    h, w = img_size
    pad = crop_padding(img_size)
    rows = (params.offsets[:, :1] - pad + torch.arange(h)).clamp_(0, h - 1)
    cols = (params.offsets[:, 1:] - pad + torch.arange(w)).clamp_(0, w - 1)
    return rows, torch.where(params.flip[:, None], w - 1 - cols, cols)


def gather_crops(store: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Images `indices` of the store [N, 3, H, W], each read at its own rows and columns: [B, 3, H, W] uint8."""
    n, channels, h, w = store.shape
    plane_rows = (indices[:, None, None] * channels + torch.arange(channels)[None, :, None]) * h + rows[:, None, :]
    picked = store.view(-1, w).index_select(0, to_device(plane_rows.view(-1), store.device))
    picked = picked.view(len(indices), channels, rows.shape[1], w)
    return picked.gather(3, to_device(cols, store.device)[:, None, None, :].expand_as(picked))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 pixels (uint8 or float) to float normalised with ImageNet's statistics, (x/255 − mean)/std in one pass
    (uint8 times a float scale is float: no separate conversion, a third of the time on the CPU)."""
    std = device_constant(IMAGENET_STD, pixels.device)[:, None, None]
    mean = device_constant(IMAGENET_MEAN, pixels.device)[:, None, None]
    return torch.addcmul(-mean / std, pixels, 1 / (255 * std))


def jitter_lighting(images: torch.Tensor, factors: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """ColorJitter's four adjustments on [0, 1] images with per-sample factors, by kornia.enhance."""
    factors = to_device(factors, images.device)
    steps = (kornia.enhance.adjust_brightness_accumulative, kornia.enhance.adjust_contrast_with_mean_subtraction,
             kornia.enhance.adjust_saturation_with_gray_subtraction,
             lambda x, f: kornia.enhance.adjust_hue(x, f * 2 * math.pi))  # a share of the hue circle, in radians
    for i in order:
        images = steps[i](images, factors[:, i])
    return images


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by a draw from the host's `generator`: reproducible as it is, and on a GPU the
    noise it draws is made there, with no host work or copy."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def erase(images: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator,
          rows: slice = slice(None)) -> torch.Tensor:
    """Each box filled with standard normal noise (RandomErasing's value='random'); the boxes are host values and
    the noise for all of them is drawn at once on the images' device, so nothing waits on it. `images` are the
    `rows` of the batch `boxes` are drawn for, and take their boxes' share of its noise."""
    erased = [(b, *box) for b, box in enumerate(boxes.tolist()) if box[2] > 0]
    sizes = [images.shape[1] * h * w for _, _, _, h, w in erased]
    noise = torch.randn(sum(sizes), generator=device_generator(generator, images.device), device=images.device)
    mine = range(len(boxes))[rows]
    for (b, top, left, h, w), chunk in zip(erased, noise.split(sizes), strict=True):
        if b in mine:
            images[b - mine.start, :, top:top + h, left:left + w] = chunk.view(-1, h, w)
    return images


def augment_batch(store: torch.Tensor, indices: torch.Tensor, params: AugmentParams, generator: torch.Generator,
                  device: torch.device, batch_rows: slice = slice(None)) -> torch.Tensor:
    """The training batch: gathered with flip and pad-and-crop, normalised, lighting-jittered and erased; `indices`
    are the `batch_rows` of the batch `params` are drawn for (a rank's share of the global batch)."""
    img_size = tuple(store.shape[2:])
    whole, params = params, params.rows(batch_rows)
    rows, cols = crop_indices(params, img_size)
    pixels = to_device(gather_crops(store, indices, rows, cols), device)
    if params.lighting is None:
        images = normalise(pixels)
    else:
        images = jitter_lighting(pixels.float().div_(255), params.lighting, params.lighting_order)
        images = normalise(images * 255)
    return erase(images, whole.boxes, generator, batch_rows)


# ---------------------------------------------------------------------------------------------------------
# Loaders over the decoded set
# ---------------------------------------------------------------------------------------------------------


class DecodedTrainLoader:
    """P×K batches (images, labels, cameras, indices) from the decoded set, as train_loader yields them."""

    def __init__(self, store: torch.Tensor, records: Sequence[ImageRecord], sampler: PKSampler, erasing: float,
                 lighting: bool, device: torch.device):
        self.store, self.sampler, self.device = store, sampler, device
        self.erasing, self.lighting = erasing, lighting
        self.labels = torch.tensor([r.label for r in records]).to(device)
        self.camids = torch.tensor([r.camid for r in records])

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        sampler = self.sampler
        for batch, items in enumerate(sampler, start=sampler.start_batch):
            indices = torch.tensor([index for index, _ in items])
            generator = batch_generator(sampler.seed, sampler.epoch, batch)
            params = draw_params(sampler.p * sampler.k, tuple(self.store.shape[2:]), self.erasing, self.lighting,
                                 generator)
            images = augment_batch(self.store, indices, params, generator, self.device, sampler.rows)
            yield images, self.labels[to_device(indices, self.device)], self.camids[indices], indices


class DecodedEvalLoader:
    """Evaluation batches (images, person ids, cameras, indices) in the records' order from a decoded cache."""

    def __init__(self, store: torch.Tensor, records: Sequence[ImageRecord], batch_size: int, device: torch.device):
        self.store, self.batch_size, self.device = store, batch_size, device
        self.pids = torch.tensor([r.pid for r in records])
        self.camids = torch.tensor([r.camid for r in records])

    def __len__(self) -> int:
        return math.ceil(len(self.pids) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.pids), self.batch_size):
            indices = torch.arange(start, min(start + self.batch_size, len(self.pids)))
            images = normalise(to_device(self.store[start:start + len(indices)], self.device))
            yield images, self.pids[indices], self.camids[indices], indices


def training_loader(kind: str, records: Sequence[ImageRecord], sampler: PKSampler, img_size: tuple[int, int],
                    erasing: float, lighting: bool, workers: int, device: torch.device,
                    progress: bool = True) -> DecodedTrainLoader | DataLoader:
    """--loader tensor's decoded loader where the set fits (else, with a message, pil's), or pil's train_loader."""
    store = decoded_or_none(records, img_size, workers, device, "training", progress) if kind == "tensor" else None
    if store is None:
        return train_loader(records, build_transforms(img_size, True, lighting, erasing), sampler, workers)
    return DecodedTrainLoader(store, records, sampler, erasing, lighting, device)


def evaluation_loader(kind: str, records: Sequence[ImageRecord], img_size: tuple[int, int], batch_size: int,
                      workers: int, device: torch.device, progress: bool = True) -> DecodedEvalLoader | DataLoader:
    """Evaluation batches from a decoded cache (--loader tensor, where it fits), or from eval_loader's workers."""
    store = decoded_or_none(records, img_size, workers, device, "evaluation", progress) if kind == "tensor" else None
    if store is None:
        return eval_loader(records, build_transforms(img_size, False), batch_size, workers)
    return DecodedEvalLoader(store, records, batch_size, device)
