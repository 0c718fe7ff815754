"""The prepared root: its split manifests (and the splits prepare.py draws), transforms, P×K sampling and loaders.
The published data sets' layouts on disk are in layouts.py, the synthetic set in synthetic.py."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from layouts import DISTRACTOR_PID, JUNK_PID, ImageRecord, relabel, without_labels
from utils import UserError, read_json

# ---------------------------------------------------------------------------------------------------------
# Prepared root: splits/*.json manifests written by prepare.py
# ---------------------------------------------------------------------------------------------------------

SPLITS = ("train", "test", "val", "all_vs_all_test", "all_vs_all_val")
# The all-vs-all splits' earlier names, accepted by --split and read from roots prepared under them.
SPLIT_ALIASES = {"seed_test": "all_vs_all_test", "seed_val": "all_vs_all_val"}


def split_name(name: str) -> str:
    """A split's name, an earlier name (SPLIT_ALIASES) read as the current one."""
    return SPLIT_ALIASES.get(name, name)


def manifest_path(prepared: str | Path, split: str) -> Path:
    """Where a split's manifest lives inside a prepared root (under its earlier name in a root prepared so)."""
    path = Path(prepared) / "splits" / f"{split}.json"
    earlier = {new: old for old, new in SPLIT_ALIASES.items()}.get(split)
    if earlier and not path.is_file() and (legacy := path.with_name(f"{earlier}.json")).is_file():
        return legacy
    return path


def records_to_rows(records: Sequence[ImageRecord], base: Path) -> list[list]:
    """Compact manifest rows [relative file, pid, camid, label]."""
    return [[Path(r.path).relative_to(base).as_posix(), r.pid, r.camid, r.label] for r in records]


def rows_to_records(rows: Sequence[Sequence], base: Path) -> list[ImageRecord]:
    """Records from manifest rows, with paths made absolute against the prepared root."""
    return [ImageRecord(str(base / file), int(pid), int(camid), int(label)) for file, pid, camid, label in rows]


def dataset_identity(prepared: str | Path) -> dict[str, str | None]:
    """A prepared root's path and its data set's name and format, from its prepare.json (the folder's name when
    it has none)."""
    record = Path(prepared) / "prepare.json"
    written = read_json(record) if record.is_file() else {}
    return {"root": str(prepared), "name": written.get("name") or Path(prepared).resolve().name,
            "format": written.get("format")}


def load_manifest(prepared: str | Path, split: str) -> dict:
    """A split's manifest, with a clear message when the root was never prepared."""
    split = split_name(split)
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    path = manifest_path(prepared, split)
    if not path.is_file():
        raise UserError(f"{path}: no manifest for split '{split}'; run prepare.py --data RAW --out {prepared} first")
    return read_json(path)


def load_train_records(prepared: str | Path) -> tuple[list[ImageRecord], int]:
    """Training records (relabelled 0..N-1, validation identities excluded) and the number of identities."""
    manifest = load_manifest(prepared, "train")
    return rows_to_records(manifest["images"], Path(prepared)), int(manifest["num_classes"])


def load_eval_records(prepared: str | Path, split: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Query and gallery records of an evaluation split."""
    if split == "train":
        raise UserError("--split train: the training split has no query/gallery; use test, val, all_vs_all_test or "
                        "all_vs_all_val")
    manifest = load_manifest(prepared, split)
    base = Path(prepared)
    return rows_to_records(manifest["query"], base), rows_to_records(manifest["gallery"], base)


def split_validation_ids(
    train: Sequence[ImageRecord], num_val_ids: int, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Hold `num_val_ids` identities out of training: per held-out identity one query per camera, rest gallery.

    Returns (remaining training records relabelled, val query, val gallery).
    """
    by_pid: dict[int, list[ImageRecord]] = defaultdict(list)
    for r in train:
        by_pid[r.pid].append(r)
    eligible = sorted(pid for pid, rs in by_pid.items() if len({r.camid for r in rs}) >= 2)
    if num_val_ids > len(eligible) or len(by_pid) - num_val_ids < 2:
        raise UserError(
            f"--val-ids {num_val_ids}: the training set has {len(by_pid)} identities, {len(eligible)} seen by "
            "two or more cameras; choose fewer validation identities"
        )
    rng = np.random.default_rng(seed)
    val_pids = set(rng.choice(eligible, size=num_val_ids, replace=False).tolist()) if num_val_ids else set()
    query, gallery = [], []
    for pid in sorted(val_pids):
        by_cam: dict[int, list[ImageRecord]] = defaultdict(list)
        for r in by_pid[pid]:
            by_cam[r.camid].append(r)
        for cam in sorted(by_cam):
            pick = int(rng.integers(len(by_cam[cam])))
            query.append(by_cam[cam][pick])
            gallery.extend(r for i, r in enumerate(by_cam[cam]) if i != pick)
    if val_pids and not gallery:
        raise UserError(f"--val-ids {num_val_ids}: the held-out identities have one image a camera, so every one "
                        "is a query and the validation gallery is empty; use --val-ids 0 or a set with more images")
    remaining = relabel([r for r in train if r.pid not in val_pids])
    return remaining, without_labels(query), without_labels(gallery)


def all_vs_all_split(
    gallery: Sequence[ImageRecord], test_share: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[int]]:
    """The all-vs-all split of bounding_box_test (the original project's): each identity's images at random,
    `test_share` to test, the rest to validation; validation identities with fewer than two images are left out
    and returned by id."""
    by_pid: dict[int, list[ImageRecord]] = defaultdict(list)
    for r in gallery:
        if r.pid not in (JUNK_PID, DISTRACTOR_PID):
            by_pid[r.pid].append(r)
    rng = np.random.default_rng(seed)
    test, val, left_out = [], [], []
    for pid in sorted(by_pid):
        images = by_pid[pid]
        order = rng.permutation(len(images))
        n_test = int(round(test_share * len(images)))
        test.extend(images[i] for i in sorted(order[:n_test]))
        val_part = [images[i] for i in sorted(order[n_test:])]
        if len(val_part) >= 2:
            val.extend(val_part)
        elif val_part:
            left_out.append(pid)
    return test, val, left_out


# ---------------------------------------------------------------------------------------------------------
# Transforms, datasets, the P×K sampler and loaders
# ---------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --lighting's ColorJitter ranges: brightness, contrast, saturation (factors 1 ± r), hue (a share of the circle, ± r).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.3, 0.2, 0.2, 0.03


def crop_padding(img_size: tuple[int, int]) -> int:
    """The pad-and-crop margin: 10 px at 256×128, as in the re-ID baselines."""
    return max(1, round(img_size[0] / 25.6))


def build_transforms(img_size: tuple[int, int], train: bool, lighting: bool = False, erasing: float = 0.5) -> T.Compose:
    """Resize, then for training flip, pad-and-crop, optional lighting jitter and random erasing; normalise."""
    steps: list = [T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        steps += [T.RandomHorizontalFlip(), T.Pad(crop_padding(img_size), padding_mode="edge"), T.RandomCrop(img_size)]
        if lighting:
            steps.append(T.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and erasing > 0:
        steps.append(T.RandomErasing(p=erasing, value="random"))
    return T.Compose(steps)


def load_image(path: str) -> Image.Image:
    """An RGB image from disk, naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise UserError(f"{path}: cannot read image ({err})") from err


class ReIDDataset(Dataset):
    """Images of a list of records: (tensor, label or pid, camera, index)."""

    def __init__(self, records: Sequence[ImageRecord], transform: T.Compose, use_label: bool = True):
        self.records = list(records)
        self.transform = transform
        self.use_label = use_label

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        target = record.label if self.use_label else record.pid
        image = load_image(record.path)
        if sample_seed is not None:
            # Augmentation drawn from the sample's own seed: the same batch gets the same pixels whichever worker
            # loads it, and a resumed epoch repeats the interrupted one exactly.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.transform(image), target, record.camid, index
        return self.transform(image), target, record.camid, index


class PKSampler(Sampler[list[int]]):
    """Batches of P identities × K images; identities with fewer than K images are sampled with replacement.

    Each item is (index, augmentation seed). An epoch has ceil(images / (P·K)) batches. Identities cycle
    through seeded permutations so each is seen about equally often. With `world_size` > 1 every rank draws
    the same global batches and keeps its share of the P identities (its `rows`), so the ranks together, in rank
    order, see exactly the single-process batch: the draws do not depend on the number of processes.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.index_by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.index_by_label[int(label)].append(index)
        self.labels = sorted(self.index_by_label)
        if p > len(self.labels):
            raise UserError(f"--batch-p {p}: the training set has only {len(self.labels)} identities")
        if p % world_size:
            raise UserError(f"--batch-p {p}: the global batch's identities are split evenly over the processes, and "
                            f"{world_size} do not divide {p}")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.num_batches = math.ceil(len(labels) / (p * k))
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (each draws its own reproducible batches) and the batch to start from on resume."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    @property
    def rows(self) -> slice:
        """This rank's rows of the global P×K batch."""
        share = self.p // self.world_size * self.k
        return slice(self.rank * share, (self.rank + 1) * share)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queue: list[int] = []
        share = self.p // self.world_size
        for step in range(self.num_batches):
            while len(queue) < self.p:
                queue.extend(rng.permutation(self.labels).tolist())
            chosen, queue = queue[: self.p], queue[self.p:]
            if len(set(chosen)) < self.p:  # a permutation boundary repeated an identity: draw distinct ones
                chosen = rng.choice(self.labels, size=self.p, replace=False).tolist()
            batch = []
            for label in chosen:
                pool = self.index_by_label[label]
                batch.append(rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist())
            seeds = rng.integers(0, 2**62, size=(self.p, self.k)).tolist()
            if step >= self.start_batch:
                mine = range(self.rank * share, (self.rank + 1) * share)
                yield [(i, seed) for j in mine for i, seed in zip(batch[j], seeds[j], strict=True)]


def detach_from_terminal_signals(_worker_id: int) -> None:
    """In a loader worker: leave the process group, so Ctrl-C and a SIGTERM to the group reach only the main process
    (train.py checkpoints first), which then shuts the workers down; they still exit should it die."""
    os.setpgrp()


def train_loader(records: Sequence[ImageRecord], transform: T.Compose, sampler: PKSampler, workers: int) -> DataLoader:
    """A loader of P×K training batches."""
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run would diverge.
    return DataLoader(ReIDDataset(records, transform), batch_sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=detach_from_terminal_signals,
                      generator=torch.Generator().manual_seed(sampler.seed))


def eval_loader(records: Sequence[ImageRecord], transform: T.Compose, batch_size: int, workers: int) -> DataLoader:
    """A loader over evaluation images in their given order, targets being person ids."""
    return DataLoader(ReIDDataset(records, transform, use_label=False), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=detach_from_terminal_signals, generator=torch.Generator())
