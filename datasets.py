"""Market-1501, DukeMTMC-reID, MSMT17 and CUHK03-NP parsing, the image check, the prepared-root manifests,
P×K sampling, loaders (the synthetic set is in synthetic.py)."""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from corruptions import CORRUPTIONS, SEVERITIES, corrupt
from utils import LOG, UserError, read_json

# ---------------------------------------------------------------------------------------------------------
# Published data sets on disk: Market-1501, DukeMTMC-reID, MSMT17 V1/V2, CUHK03-NP
# ---------------------------------------------------------------------------------------------------------

# One regex per naming scheme; each yields the person id (group 1) and the camera (group "cam").
# Market-1501, PPPP_cCsS_FFFFFF_NN.jpg: person id (-1 is junk, 0000 a distractor), camera C, sequence S, frame, box.
MARKET_NAME = re.compile(r"^(-1|\d{4})_c(?P<cam>\d)s(\d+)_(\d+)_(\d+)\.jpg$")
# DukeMTMC-reID, PPPP_cC_fFFFFFFF.jpg: person id, camera, frame.
DUKE_NAME = re.compile(r"^(\d{4})_c(?P<cam>\d)_f(\d+)\.jpg$")
# MSMT17, PPPP_NNN_CC_<date, time of day, frame>.jpg: person id, image number, camera 01..15.
MSMT_NAME = re.compile(r"^(\d{4})_(\d{3})_(?P<cam>\d{2})_\w+\.jpg$")
# CUHK03-NP, PPPP_cC_NN.png: person id, camera 1 or 2, image number.
CUHK03_NAME = re.compile(r"^(\d{4})_c(?P<cam>\d)_(\d+)\.png$")

MARKET_FOLDERS = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}
MARKET_CHILD = "Market-1501-v15.09.15"
MSMT_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MSMT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
              "gallery": ("list_gallery.txt",)}
CUHK03_SUBSETS = ("detected", "labeled")
JUNK_PID = -1
DISTRACTOR_PID = 0


@dataclass(frozen=True)
class Layout:
    """A published set's naming scheme, the folders a download extracts to, and its layout for messages."""

    title: str
    pattern: re.Pattern
    scheme: str
    children: tuple[str, ...]
    expected: str


LAYOUTS = {
    "market1501": Layout("Market-1501", MARKET_NAME, "PPPP_cCsS_FFFFFF_NN.jpg", (MARKET_CHILD,),
                         f"{MARKET_CHILD}/{{bounding_box_train,query,bounding_box_test}}"),
    "dukemtmc": Layout("DukeMTMC-reID", DUKE_NAME, "PPPP_cC_fFFFFFFF.jpg", ("DukeMTMC-reID",),
                       "DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}"),
    "msmt17": Layout("MSMT17", MSMT_NAME, "PPPP_NNN_CC_*.jpg", tuple(MSMT_FOLDERS),
                     "MSMT17_V1/{train,test} or MSMT17_V2/{mask_train_v2,mask_test_v2}, each with "
                     "list_train.txt, list_val.txt, list_query.txt, list_gallery.txt"),
    "cuhk03-np": Layout("CUHK03-NP", CUHK03_NAME, "PPPP_cC_NN.png", ("cuhk03-np",),
                        "cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}"),
}
FORMATS = tuple(LAYOUTS)

# The published (identities, images, cameras) of each split as prepare.py counts them: identities without
# junk and distractors, images with them (Market-1501's bounding_box_test holds 3,819 junk and 2,793
# distractor images), MSMT17's training split being list_train + list_val.
PUBLISHED = {
    "market1501": {"train": (751, 12936, 6), "query": (750, 3368, 6), "gallery": (750, 19732, 6)},
    "dukemtmc": {"train": (702, 16522, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)},
    "msmt17-v1": {"train": (1041, 32621, 15), "query": (3060, 11659, 15), "gallery": (3060, 82161, 15)},
    "msmt17-v2": {"train": (1041, 32621, 15), "query": (3060, 11659, 15), "gallery": (3060, 82161, 15)},
    "cuhk03-np-detected": {"train": (767, 7365, 2), "query": (700, 1400, 2), "gallery": (700, 5332, 2)},
    "cuhk03-np-labeled": {"train": (767, 7368, 2), "query": (700, 1400, 2), "gallery": (700, 5328, 2)},
}


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path, person id as in the file name, camera, and training label (-1 when unused)."""

    path: str
    pid: int
    camid: int
    label: int = -1


@dataclass(frozen=True)
class FoundSet:
    """A data set found on disk: its format, name (with version or subset), the folder holding it, and the
    image folder of each part (train, query, gallery)."""

    format: str
    name: str
    root: Path
    folders: dict[str, Path]


def parse_name(name: str, pattern: re.Pattern = MARKET_NAME) -> tuple[int, int] | None:
    """Person id and camera of a file name in a set's naming scheme, or None when it does not follow it."""
    match = pattern.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group("cam"))


def parse_market_name(name: str) -> tuple[int, int] | None:
    """Person id and camera of a Market-1501 file name, or None when the name does not follow the format."""
    return parse_name(name, MARKET_NAME)


def msmt_version_folders(candidate: Path) -> tuple[str, str]:
    """MSMT17's training and test image folders in a candidate folder: V2's when it looks like V2, else V1's."""
    if candidate.name == "MSMT17_V2" or (candidate / MSMT_FOLDERS["MSMT17_V2"][0]).is_dir():
        return MSMT_FOLDERS["MSMT17_V2"]
    return MSMT_FOLDERS["MSMT17_V1"]


def required_paths(candidate: Path, fmt: str, subset: str) -> list[str]:
    """What a folder of the format must hold, relative to it; folders end with '/'."""
    if fmt == "msmt17":
        lists = [name for names in MSMT_LISTS.values() for name in names]
        return [f"{folder}/" for folder in msmt_version_folders(candidate)] + lists
    prefix = f"{subset}/" if fmt == "cuhk03-np" else ""
    return [f"{prefix}{folder}/" for folder in ("bounding_box_train", "query", "bounding_box_test")]


def missing_paths(candidate: Path, fmt: str, subset: str) -> list[str]:
    """The required folders and files a candidate folder lacks."""
    return [p for p in required_paths(candidate, fmt, subset)
            if not ((candidate / p).is_dir() if p.endswith("/") else (candidate / p).is_file())]


def first_image_name(folder: Path) -> str | None:
    """The first .jpg or .png file name in a folder, by name."""
    return next((p.name for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".png")), None)


def found_set(candidate: Path, fmt: str, subset: str) -> FoundSet:
    """The FoundSet of a candidate folder known to hold the format's layout."""
    if fmt == "msmt17":
        train, test = msmt_version_folders(candidate)
        name = "msmt17-v2" if train == MSMT_FOLDERS["MSMT17_V2"][0] else "msmt17-v1"
        return FoundSet(fmt, name, candidate, {"train": candidate / train, "query": candidate / test,
                                               "gallery": candidate / test})
    images = candidate / subset if fmt == "cuhk03-np" else candidate
    name = f"cuhk03-np-{subset}" if fmt == "cuhk03-np" else fmt
    return FoundSet(fmt, name, candidate, {part: images / folder for part, folder in MARKET_FOLDERS.items()})


def detect_format(root: Path, subset: str) -> FoundSet | None:
    """The layout found in `root` or in one of its children named as a download extracts: children first, then
    the folder itself, where DukeMTMC-reID is told from Market-1501 by its file names."""
    for fmt, layout in LAYOUTS.items():
        for child in layout.children:
            if (root / child).is_dir() and not missing_paths(root / child, fmt, subset):
                return found_set(root / child, fmt, subset)
    for fmt in ("msmt17", "cuhk03-np", "market1501"):
        if not missing_paths(root, fmt, subset):
            if fmt == "market1501" and DUKE_NAME.match(first_image_name(root / "bounding_box_train") or ""):
                fmt = "dukemtmc"
            return found_set(root, fmt, subset)
    return None


def find_dataset(root: str | Path, fmt: str = "auto", subset: str = "detected") -> FoundSet:
    """The data set in `root` (the extracted folder or its parent): detected with `fmt` 'auto', else checked to
    follow that format's layout, naming the folder or file it lacks."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if fmt == "auto":
        found = detect_format(root, subset)
        if found is not None:
            return found
        partial = [(root / child, f) for f, layout in LAYOUTS.items() for child in layout.children
                   if (root / child).is_dir()]
        if partial:
            folder, fmt = partial[0]
            missing = ", ".join(missing_paths(folder, fmt, subset))
            raise UserError(f"{folder}: this {LAYOUTS[fmt].title} folder lacks {missing} "
                            f"(expected {LAYOUTS[fmt].expected})")
        listing = sorted(p.name for p in root.iterdir())[:12]
        raise UserError(f"{root}: no known data set layout here or in a child folder (Market-1501, DukeMTMC-reID, "
                        f"MSMT17_V1/V2, cuhk03-np); found {listing}")
    layout = LAYOUTS[fmt]
    candidates = [root / child for child in layout.children if (root / child).is_dir()] or [root]
    for candidate in candidates:
        if not missing_paths(candidate, fmt, subset):
            return found_set(candidate, fmt, subset)
    missing = ", ".join(missing_paths(candidates[0], fmt, subset))
    raise UserError(f"--format {fmt}: {candidates[0]}: missing {missing} (expected {layout.expected}, "
                    "in --data or a child folder)")


def scan_folder(folder: Path, layout: Layout) -> tuple[list[ImageRecord], int]:
    """Records of every image of the layout's type in a folder, sorted by name, and the count of other files
    ignored (Thumbs.db, previews); an image whose name does not follow the layout's scheme is an error."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    suffix = Path(layout.scheme).suffix
    records, bad, ignored = [], [], 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != suffix or not path.is_file():
            ignored += 1
            continue
        parsed = parse_name(path.name, layout.pattern)
        if parsed is None:
            bad.append(path.name)
            continue
        records.append(ImageRecord(str(path), *parsed))
    if bad:
        raise UserError(f"{folder}: {len(bad)} image names do not follow {layout.scheme}, e.g. {bad[:3]}")
    if not records:
        raise UserError(f"{folder}: no images found")
    return records, ignored


def read_msmt_list(list_file: Path, image_folder: Path) -> list[ImageRecord]:
    """Records of an MSMT17 list file ('relative/path.jpg id' a line): the id from the list (plus one, so that
    MSMT17's id 0 is not read as a distractor), the camera from the file name."""
    records, bad = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        parsed = parse_name(Path(fields[0]).name, MSMT_NAME) if len(fields) == 2 and fields[1].isdigit() else None
        if parsed is None:
            bad.append(number)
            continue
        records.append(ImageRecord(str(image_folder / fields[0]), int(fields[1]) + 1, parsed[1]))
    if bad:
        raise UserError(f"{list_file}: {len(bad)} lines are not 'PPPP/{LAYOUTS['msmt17'].scheme} id', "
                        f"e.g. lines {bad[:3]}")
    if not records:
        raise UserError(f"{list_file}: no images listed")
    return records


def load_parts(found: FoundSet) -> dict[str, list[ImageRecord]]:
    """Every part's records as the set lists them: scanned from its folders, or read from MSMT17's lists."""
    parts = {}
    for part, folder in found.folders.items():
        if found.format == "msmt17":
            parts[part] = [r for name in MSMT_LISTS[part] for r in read_msmt_list(found.root / name, folder)]
            continue
        layout = LAYOUTS[found.format]
        parts[part], ignored = scan_folder(folder, layout)
        if ignored:
            LOG.info("%s: ignored %d files that are not %s images", folder, ignored, Path(layout.scheme).suffix)
    return parts


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Training records with contiguous labels 0..N-1 in order of person id."""
    labels = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, r.pid, r.camid, labels[r.pid]) for r in records]


def without_labels(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The same records with the training label cleared, for query and gallery sets."""
    return [ImageRecord(r.path, r.pid, r.camid) for r in records]


def load_dataset(found: FoundSet) -> dict[str, list[ImageRecord]]:
    """The train, gallery and query records of a found set; junk and distractors leave training."""
    parts = load_parts(found)
    dropped = [r for r in parts["train"] if r.pid in (JUNK_PID, DISTRACTOR_PID)]
    if dropped:
        LOG.info("%s: left %d junk/distractor images out of training", found.folders["train"], len(dropped))
    parts["train"] = relabel([r for r in parts["train"] if r.pid not in (JUNK_PID, DISTRACTOR_PID)])
    gallery_pids = {r.pid for r in parts["gallery"]}
    orphans = {r.pid for r in parts["query"]} - gallery_pids
    if orphans:
        LOG.warning("warning: %d query identities have no gallery image, e.g. %s", len(orphans), sorted(orphans)[:5])
    return parts


def load_market(root: str | Path) -> dict[str, list[ImageRecord]]:
    """The train, gallery and query records of a Market-1501 folder (or its parent)."""
    return load_dataset(find_dataset(root, "market1501"))


def split_counts(records: Sequence[ImageRecord]) -> tuple[int, int, int]:
    """Identities (junk and distractors aside), images and cameras of a list of records."""
    return len({r.pid for r in records if r.pid > 0}), len(records), len({r.camid for r in records})


def looks_complete(found: dict[str, tuple[int, int, int]], published: dict[str, tuple[int, int, int]]) -> bool:
    """Whether a set holds at least half the published training images: a download rather than a sample."""
    return found["train"][1] >= published["train"][1] / 2


def count_differences(found: dict[str, tuple[int, int, int]], published: dict[str, tuple[int, int, int]]) -> list[str]:
    """Each count of each part that differs from the published one, as 'part: N things, published M'."""
    lines = []
    for part, counts in found.items():
        for what, have, want in zip(("identities", "images", "cameras"), counts, published[part], strict=True):
            if have != want:
                lines.append(f"{part}: {have:,} {what}, published {want:,}")
    return lines


def image_problem(path: str) -> str | None:
    """Why an image cannot be decoded (missing, not an image, truncated, corrupt), or None when it can."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def find_unreadable(paths: Sequence[str], workers: int, progress: bool = True) -> dict[str, str]:
    """Decode every image once, in parallel threads (Pillow decodes without the GIL); the unreadable ones with
    why."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(tqdm(pool.map(image_problem, paths), total=len(paths), desc="checking images", unit="img",
                             disable=not progress))
    return {path: problem for path, problem in zip(paths, problems, strict=True) if problem is not None}


# ---------------------------------------------------------------------------------------------------------
# Prepared root: splits/*.json manifests written by prepare.py
# ---------------------------------------------------------------------------------------------------------

SPLITS = ("train", "test", "val", "seed_test", "seed_val")


def manifest_path(prepared: str | Path, split: str) -> Path:
    """Where a split's manifest lives inside a prepared root."""
    return Path(prepared) / "splits" / f"{split}.json"


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
        raise UserError("--split train: the training split has no query/gallery; use test, val, seed_test or seed_val")
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


def seed_split(
    gallery: Sequence[ImageRecord], test_share: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[int]]:
    """The seed's split of bounding_box_test: each identity's images at random, `test_share` to test, the rest
    to validation; validation identities with fewer than two images are left out and returned by id."""
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


# ---------------------------------------------------------------------------------------------------------
# The Market-1501-C protocol: a corruption and severity drawn per evaluation image from a fixed seed
# ---------------------------------------------------------------------------------------------------------

QUERY_SIDE, GALLERY_SIDE = 0, 1

Draw = tuple[str, int, int]  # corruption name, severity, noise seed


@dataclass(frozen=True)
class CorruptionSettings:
    """Which corruptions and severities evaluation images draw from, and the seed of the draws."""

    names: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0

    def key(self) -> str:
        """The settings in words, e.g. 'all|s=all|seed=0' or 'fog,rain|s=3|seed=1' (results.json's key)."""
        names = "all" if self.names == CORRUPTIONS else ",".join(self.names)
        severities = "all" if self.severities == SEVERITIES else ",".join(map(str, self.severities))
        return f"{names}|s={severities}|seed={self.seed}"

    def __str__(self) -> str:
        return self.key()


def corruption_draw(settings: CorruptionSettings, side: int, index: int) -> Draw:
    """The corruption, severity and noise seed of image `index` of a side (query or gallery): a function of
    (seed, side, index) alone, so loader workers and batching cannot change it."""
    rng = np.random.default_rng([settings.seed, side, index])
    name = settings.names[int(rng.integers(len(settings.names)))]
    severity = settings.severities[int(rng.integers(len(settings.severities)))]
    return name, severity, int(rng.integers(2**63))


def corruption_draws(settings: CorruptionSettings, num_query: int, num_gallery: int) -> list[Draw]:
    """Draws for the query images then the gallery images, in that order (split_features')."""
    return ([corruption_draw(settings, QUERY_SIDE, i) for i in range(num_query)] +
            [corruption_draw(settings, GALLERY_SIDE, i) for i in range(num_gallery)])


def corrupted_image(image: Image.Image, draw: Draw | None) -> Image.Image:
    """The decoded image with its drawn corruption applied at its stored size (unchanged when `draw` is None)."""
    if draw is None:
        return image
    return Image.fromarray(corrupt(np.asarray(image), *draw))


class CorruptedImages(Sequence):
    """Image files read and corrupted one by one as they are indexed, each by its draw (embed_images takes it)."""

    def __init__(self, paths: Sequence[str], draws: Sequence[Draw]):
        if len(draws) != len(paths):
            raise ValueError(f"{len(draws)} corruption draws for {len(paths)} images")
        self.paths, self.draws = list(paths), list(draws)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return corrupted_image(load_image(self.paths[index]), self.draws[index])


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
