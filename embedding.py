"""Embeddings of images by a trained model: batches, loaders and lists of images (paths, PIL images, tensors) with
the test transforms, and the fingerprint a cache of them is keyed by."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from datasets import build_transforms, detach_from_terminal_signals, load_image
from model import ReIDModel
from utils import UserError, sha256_file


def embed_batch(model: ReIDModel, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Embeddings of a transformed batch on the model's device, as float32 on the CPU (summed with the mirror
    image's when `flip`). They are kept raw, as the Siamese head takes them; retrieval normalises them."""
    images = images.to(next(model.parameters()).device, non_blocking=True)
    embedding = model.embed(images).float()
    if flip:
        embedding = embedding + model.embed(torch.flip(images, dims=[3])).float()
    return embedding.cpu()


@torch.no_grad()
def extract_features(model: ReIDModel, loader: Iterable, flip: bool = False,
                     progress: bool = True) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embeddings of every image a record loader yields, with the person ids and cameras (train.py's validation)."""
    model.eval()
    features, pids, camids = [], [], []
    for images, batch_pids, batch_camids, _ in tqdm(loader, desc="embedding", unit="batch", disable=not progress,
                                                    leave=False):
        features.append(embed_batch(model, images, flip))
        pids.append(batch_pids.numpy())
        camids.append(batch_camids.numpy())
    return torch.cat(features), np.concatenate(pids), np.concatenate(camids)


ImageInput = str | Path | Image.Image | torch.Tensor


class ImageList(Dataset):
    """Images given as paths, PIL images or C×H×W RGB tensors (uint8, or float in [0, 1]), each with the test
    transforms: (tensor, index, readable). An unreadable file gives a blank tensor and readable False when
    `skip_unreadable`, else a UserError naming it."""

    def __init__(self, images: Sequence[ImageInput], img_size: tuple[int, int], skip_unreadable: bool = False):
        self.images, self.img_size, self.skip_unreadable = images, tuple(img_size), skip_unreadable
        self.transform = build_transforms(self.img_size, False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        item = self.images[index]
        if isinstance(item, torch.Tensor):
            # Rounded, not truncated as to_pil_image does: a float image read from a file gives its bytes back.
            item = to_pil_image(item if item.dtype == torch.uint8 else (item.clamp(0, 1) * 255).round().byte())
        elif not isinstance(item, Image.Image):
            try:
                item = load_image(str(item))
            except UserError:
                if not self.skip_unreadable:
                    raise
                return torch.zeros(3, *self.img_size), index, False
        return self.transform(item.convert("RGB")), index, True


@torch.no_grad()
def embedding_batches(model: ReIDModel, images: Sequence[ImageInput], batch_size: int = 64, flip: bool = False,
                      workers: int = 0, skip_unreadable: bool = False,
                      progress: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, embeddings) batch by batch, in order; with `skip_unreadable`, unreadable files are left out."""
    model.eval()
    loader = DataLoader(ImageList(images, model.img_size, skip_unreadable), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=detach_from_terminal_signals)
    with tqdm(total=len(images), desc="embedding", unit="image", disable=not progress, leave=False) as bar:
        for batch, indices, readable in loader:
            bar.update(len(indices))
            if readable.any():
                yield indices[readable].numpy(), embed_batch(model, batch[readable], flip)


def embed_images(model: ReIDModel, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64,
                 flip: bool = False, workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Embeddings [N, embed_dim] of paths, PIL images or C×H×W tensors (a 4-D tensor is N of them), resized and
    normalised as the model was tested (its img_size); raw, as eval.py caches them."""
    if len(images) == 0:
        return torch.empty(0, model.embed_dim)
    return torch.cat([embedding for _, embedding in embedding_batches(model, images, batch_size, flip, workers,
                                                                      progress=progress)])


def model_fingerprint(settings: dict, flip: bool) -> str:
    """What a model's embeddings depend on: its embedding parts' bytes, the image size and flipping."""
    digest = hashlib.sha256()
    for part in sorted(settings["files"]):
        if part != "classifier":
            digest.update(sha256_file(settings["files"][part]).encode())
    digest.update(f"{tuple(settings['img_size'])}{flip}raw{settings.get('embedding', 'mu')}".encode())
    return digest.hexdigest()
