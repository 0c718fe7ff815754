"""Market-1501 parsing, the prepared-root manifests, the synthetic Market-format set, P×K sampling, loaders."""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from corruptions import CORRUPTIONS, SEVERITIES, corrupt
from utils import UserError, read_json

LOG = logging.getLogger("reid")

# ---------------------------------------------------------------------------------------------------------
# Market-1501 on disk
# ---------------------------------------------------------------------------------------------------------

# PPPP_cCsS_FFFFFF_NN.jpg: person id (-1 is junk, 0000 a distractor), camera C, sequence S, frame, box.
MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d+)_(\d+)_(\d+)\.jpg$")
MARKET_FOLDERS = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}
MARKET_CHILD = "Market-1501-v15.09.15"
JUNK_PID = -1
DISTRACTOR_PID = 0


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path, person id as in the file name, camera, and training label (-1 when unused)."""

    path: str
    pid: int
    camid: int
    label: int = -1


def parse_market_name(name: str) -> tuple[int, int] | None:
    """Person id and camera of a Market-1501 file name, or None when the name does not follow the format."""
    match = MARKET_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def find_market_root(root: str | Path) -> Path:
    """The folder holding Market's image folders: `root` itself or its `Market-1501-v15.09.15` child."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    for candidate in (root, root / MARKET_CHILD):
        if all((candidate / folder).is_dir() for folder in MARKET_FOLDERS.values()):
            return candidate
    found = sorted(p.name for p in root.iterdir())[:12]
    wanted = ", ".join(MARKET_FOLDERS.values())
    raise UserError(f"{root}: expected Market-1501 folders {wanted} (here or in {MARKET_CHILD}/); found {found}")


def scan_market_folder(folder: Path) -> tuple[list[ImageRecord], int]:
    """Records of every .jpg image in a Market folder, sorted by name, and the count of other files ignored (as
    DESIGN says: Thumbs.db, previews, any non-jpg); a .jpg whose name is not Market's is an error."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    records, bad, ignored = [], [], 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".jpg" or not path.is_file():
            ignored += 1
            continue
        parsed = parse_market_name(path.name)
        if parsed is None:
            bad.append(path.name)
            continue
        records.append(ImageRecord(str(path), *parsed))
    if bad:
        raise UserError(f"{folder}: {len(bad)} image names do not follow PPPP_cCsS_FFFFFF_NN.jpg, e.g. {bad[:3]}")
    if not records:
        raise UserError(f"{folder}: no images found")
    return records, ignored


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Training records with contiguous labels 0..N-1 in order of person id."""
    labels = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, r.pid, r.camid, labels[r.pid]) for r in records]


def without_labels(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The same records with the training label cleared, for query and gallery sets."""
    return [ImageRecord(r.path, r.pid, r.camid) for r in records]


def load_market(root: str | Path) -> dict[str, list[ImageRecord]]:
    """The train, gallery and query records of a Market-1501 folder; junk and distractors leave training."""
    market = find_market_root(root)
    parts = {}
    for part, folder in MARKET_FOLDERS.items():
        records, ignored = scan_market_folder(market / folder)
        if ignored:
            LOG.info("%s: ignored %d files that are not .jpg images", market / folder, ignored)
        parts[part] = records
    dropped = [r for r in parts["train"] if r.pid in (JUNK_PID, DISTRACTOR_PID)]
    if dropped:
        LOG.info("%s: left %d junk/distractor images out of training", market / MARKET_FOLDERS["train"], len(dropped))
    parts["train"] = relabel([r for r in parts["train"] if r.pid not in (JUNK_PID, DISTRACTOR_PID)])
    gallery_pids = {r.pid for r in parts["gallery"]}
    orphans = {r.pid for r in parts["query"]} - gallery_pids
    if orphans:
        LOG.warning("warning: %d query identities have no gallery image, e.g. %s", len(orphans), sorted(orphans)[:5])
    return parts


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
# The synthetic Market-format set
# ---------------------------------------------------------------------------------------------------------

PALETTE = np.array(
    [
        (200, 30, 30), (30, 60, 190), (30, 150, 50), (230, 200, 40), (240, 240, 240), (25, 25, 25),
        (130, 130, 130), (120, 60, 160), (240, 130, 30), (120, 80, 40), (40, 180, 190), (240, 150, 180),
        (20, 40, 90), (90, 110, 40),
    ],
    dtype=np.float32,
)
SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 80), (100, 70, 50)], dtype=np.float32)
HAIR = np.array([(20, 20, 20), (90, 60, 30), (200, 170, 90), (150, 150, 150)], dtype=np.float32)
UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "twotone", "logo")
LOWER_KINDS = ("trousers", "shorts", "skirt")


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of a synthetic Market-format set; the defaults keep CPU work small."""

    train_ids: int = 100
    test_ids: int = 100
    cameras: int = 6
    images_per_camera: int = 4
    min_cameras: int = 2
    height: int = 128
    width: int = 64
    distractors: int = 200
    junk: int = 50
    seed: int = 0


def identity_traits(rng: np.random.Generator) -> dict:
    """The appearance that defines one person: clothes, colours, build and accessories."""
    upper, second, lower = rng.choice(len(PALETTE), size=3, replace=False)
    return {
        "upper": PALETTE[upper], "upper2": PALETTE[second], "pattern": UPPER_PATTERNS[rng.integers(5)],
        "lower": PALETTE[lower], "lower_kind": LOWER_KINDS[rng.integers(3)],
        "shoes": PALETTE[rng.integers(len(PALETTE))], "skin": SKIN[rng.integers(4)], "hair": HAIR[rng.integers(4)],
        "hat": PALETTE[rng.integers(len(PALETTE))] if rng.random() < 0.25 else None,
        "backpack": PALETTE[rng.integers(len(PALETTE))] if rng.random() < 0.35 else None,
        "bag": PALETTE[rng.integers(len(PALETTE))] if rng.random() < 0.25 else None,
        "width": float(rng.uniform(0.8, 1.2)), "height": float(rng.uniform(0.85, 1.0)),
    }


def camera_conditions(rng: np.random.Generator) -> dict:
    """One camera's look: background, lighting gain, colour cast, blur, noise and preferred viewpoint."""
    return {
        "ground": rng.uniform(60, 200, 3), "wall": rng.uniform(60, 220, 3), "horizon": float(rng.uniform(0.45, 0.8)),
        "gain": float(rng.uniform(0.65, 1.25)), "cast": rng.uniform(0.8, 1.2, 3), "blur": float(rng.uniform(0, 1.2)),
        "noise": float(rng.uniform(2, 10)), "views": rng.dirichlet(np.ones(3) * 0.8),
    }


def _colour(rgb: np.ndarray, shade: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(rgb * shade, 0, 255))


def draw_person(traits: dict, camera: dict, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One crop of a person seen by a camera: viewpoint, pose jitter and occlusion drawn at random."""
    h, w = size
    img = Image.new("RGB", (w, h), _colour(camera["wall"]))
    draw = ImageDraw.Draw(img)
    horizon = int(h * camera["horizon"])
    draw.rectangle([0, horizon, w, h], fill=_colour(camera["ground"]))
    for _ in range(int(rng.integers(0, 4))):  # background clutter
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.rectangle([x0, y0, x0 + rng.uniform(0.05, 0.33) * w, y0 + rng.uniform(0.03, 0.25) * h],
                       fill=_colour(rng.uniform(40, 230, 3)))
    view = int(rng.choice(3, p=camera["views"]))  # 0 front, 1 back, 2 side
    scale = traits["height"] * rng.uniform(0.9, 1.05)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    top = h * (1 - scale) / 2 + rng.uniform(-0.03, 0.03) * h
    body_h = h * scale
    half = w * 0.2 * traits["width"] * (0.7 if view == 2 else 1.0)
    y = lambda f: top + f * body_h  # noqa: E731  fractions of the body height
    stride = rng.uniform(-1, 1) * half * 0.6
    lower, shoes = traits["lower"], traits["shoes"]
    leg_end = y(0.93) if traits["lower_kind"] == "trousers" else y(0.72)
    for side, swing in ((-1, stride), (1, -stride)):
        x = cx + side * half * 0.45
        draw.polygon([(x - half * 0.3, y(0.55)), (x + half * 0.3, y(0.55)), (x + swing + half * 0.25, y(0.95)),
                      (x + swing - half * 0.25, y(0.95))], fill=_colour(traits["skin"]))
        if traits["lower_kind"] != "skirt":
            draw.polygon([(x - half * 0.32, y(0.55)), (x + half * 0.32, y(0.55)),
                          (x + swing * 0.9 + half * 0.27, leg_end), (x + swing * 0.9 - half * 0.27, leg_end)],
                         fill=_colour(lower))
        draw.rectangle([x + swing - half * 0.3, y(0.95), x + swing + half * 0.35, y(1.0)], fill=_colour(shoes))
    if traits["lower_kind"] == "skirt":
        skirt = [(cx - half, y(0.55)), (cx + half, y(0.55)), (cx + half * 1.3, y(0.78)), (cx - half * 1.3, y(0.78))]
        draw.polygon(skirt, fill=_colour(lower))
    if traits["backpack"] is not None and view != 0:
        bx = cx + (half * 0.6 if view == 2 else 0)
        draw.rectangle([bx - half * 0.8, y(0.22), bx + half * 0.8, y(0.5)], fill=_colour(traits["backpack"], 0.9))
    torso = [cx - half, y(0.18), cx + half, y(0.57)]
    draw.rectangle(torso, fill=_colour(traits["upper"]))
    pattern, second = traits["pattern"], _colour(traits["upper2"])
    if pattern == "hstripes":
        for k in range(4):
            y0 = torso[1] + (k + 0.5) * (torso[3] - torso[1]) / 4.5
            draw.rectangle([torso[0], y0, torso[2], y0 + body_h * 0.03], fill=second)
    elif pattern == "vstripes":
        for k in range(3):
            x0 = torso[0] + (k + 0.5) * (torso[2] - torso[0]) / 3.5
            draw.rectangle([x0, torso[1], x0 + max(1.0, half * 0.2), torso[3]], fill=second)
    elif pattern == "twotone":
        draw.rectangle([torso[0], (torso[1] + torso[3]) / 2, torso[2], torso[3]], fill=second)
    elif pattern == "logo" and view == 0:
        draw.ellipse([cx - half * 0.4, y(0.27), cx + half * 0.4, y(0.27) + half * 0.8], fill=second)
    arm = rng.uniform(-0.5, 0.5) * half
    for side in (-1, 1):
        x = cx + side * half * 1.1
        hand = x + side * arm * 0.5
        draw.polygon([(x - half * 0.18, y(0.2)), (x + half * 0.18, y(0.2)), (hand + half * 0.15, y(0.52)),
                      (hand - half * 0.15, y(0.52))], fill=_colour(traits["upper"], 0.85))
    if traits["bag"] is not None:
        side = 1 if view != 2 else -1
        bx = cx + side * half * 1.35
        draw.rectangle([bx - half * 0.35, y(0.45), bx + half * 0.35, y(0.62)], fill=_colour(traits["bag"]))
    head_r = half * 0.55
    draw.ellipse([cx - head_r, y(0.02), cx + head_r, y(0.02) + 2.2 * head_r],
                 fill=_colour(traits["hair"] if view == 1 else traits["skin"]))
    draw.chord([cx - head_r, y(0.02) - 1, cx + head_r, y(0.02) + 1.4 * head_r], 180, 360, fill=_colour(traits["hair"]))
    if traits["hat"] is not None:
        draw.rectangle([cx - head_r * 1.1, y(0.0), cx + head_r * 1.1, y(0.045)], fill=_colour(traits["hat"]))
    if rng.random() < 0.2:  # occlusion by a passer-by or an object
        ox = rng.choice([0, w * 0.6])
        oy = rng.uniform(0.3, 0.7) * h
        draw.rectangle([ox, oy, ox + w * rng.uniform(0.3, 0.45), h], fill=_colour(rng.uniform(30, 230, 3)))
    return img


def apply_camera(img: Image.Image, camera: dict, rng: np.random.Generator) -> Image.Image:
    """The camera's optics and sensor: blur, lighting gain with per-image flicker, colour cast and noise."""
    if camera["blur"] > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(camera["blur"]))
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels * camera["gain"] * rng.uniform(0.9, 1.1) * camera["cast"]
    pixels += rng.normal(0, camera["noise"], pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def junk_image(camera: dict, size: tuple[int, int], rng: np.random.Generator, traits: dict) -> Image.Image:
    """A bad detection: a background patch or a fragment of a person (Market's junk and distractor boxes)."""
    h, w = size
    if rng.random() < 0.5:
        person = draw_person(traits, camera, (h * 2, w * 2), rng)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        img = person.crop((x0, y0, x0 + w, y0 + h))
    else:
        img = Image.new("RGB", (w, h), _colour(camera["wall"]))
        ImageDraw.Draw(img).rectangle([0, int(h * camera["horizon"]), w, h], fill=_colour(camera["ground"]))
    return apply_camera(img, camera, rng)


def market_name(pid: int, cam: int, frame: int, box: int = 1) -> str:
    """A Market-1501 file name; the sequence number is fixed at 1."""
    person = "-1" if pid == JUNK_PID else f"{pid:04d}"
    return f"{person}_c{cam}s1_{frame:06d}_{box:02d}.jpg"


def _save_jpeg(img: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=92)
    path.write_bytes(buffer.getvalue())


def synthetic_plan(config: SyntheticConfig) -> tuple[list[int], list[int]]:
    """Person ids for training and test, drawn without overlap from Market's range 1..1501."""
    total = config.train_ids + config.test_ids
    if total > 9999 or config.train_ids < 2 or config.test_ids < 1:
        raise UserError("synthetic set: need 2..9999 identities in all, at least 2 for training and 1 for test")
    if config.cameras < config.min_cameras or config.cameras > 9:
        raise UserError(f"synthetic set: --cameras must be between {config.min_cameras} and 9")
    if config.height < 16 or config.width < 8:
        raise UserError(f"synthetic set: --height {config.height} --width {config.width}: at least 16×8 pixels")
    rng = np.random.default_rng([config.seed, 0])
    pids = np.sort(rng.choice(np.arange(1, max(1502, total + 1)), size=total, replace=False))
    order = rng.permutation(total)
    return sorted(pids[order[: config.train_ids]].tolist()), sorted(pids[order[config.train_ids:]].tolist())


def write_synthetic(out: str | Path, config: SyntheticConfig, progress: bool = True) -> dict[str, int]:
    """Write a Market-format synthetic set under `out` (its three image folders) and return image counts."""
    from tqdm import tqdm

    out = Path(out)
    folders = {part: out / name for part, name in MARKET_FOLDERS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    size = (config.height, config.width)
    cameras = [camera_conditions(np.random.default_rng([config.seed, 1, c])) for c in range(config.cameras)]
    train_pids, test_pids = synthetic_plan(config)
    counts = {part: 0 for part in folders}
    frame = 0
    jobs = [("train", pid) for pid in train_pids] + [("test", pid) for pid in test_pids]
    for part, pid in tqdm(jobs, desc="synthetic identities", unit="id", disable=not progress):
        rng = np.random.default_rng([config.seed, 2, pid])
        traits = identity_traits(rng)
        n_cams = int(rng.integers(config.min_cameras, config.cameras + 1))
        for cam in sorted(rng.choice(config.cameras, size=n_cams, replace=False).tolist()):
            for shot in range(config.images_per_camera + (1 if part == "test" else 0)):
                frame += 1
                img = apply_camera(draw_person(traits, cameras[cam], size, rng), cameras[cam], rng)
                target = "train" if part == "train" else ("query" if shot == 0 else "gallery")
                _save_jpeg(img, folders[target] / market_name(pid, cam + 1, frame))
                counts[target] += 1
    rng = np.random.default_rng([config.seed, 3])
    for pid, count in ((DISTRACTOR_PID, config.distractors), (JUNK_PID, config.junk)):
        for _ in range(count):
            frame += 1
            cam = int(rng.integers(config.cameras))
            img = junk_image(cameras[cam], size, rng, identity_traits(rng))
            _save_jpeg(img, folders["gallery"] / market_name(pid, cam + 1, frame))
            counts["gallery"] += 1
    return counts


# ---------------------------------------------------------------------------------------------------------
# Transforms, datasets, the P×K sampler and loaders
# ---------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(img_size: tuple[int, int], train: bool, lighting: bool = False, erasing: float = 0.5) -> T.Compose:
    """Resize, then for training flip, pad-and-crop, optional lighting jitter and random erasing; normalise."""
    steps: list = [T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        pad = max(1, round(img_size[0] / 25.6))  # 10 px at 256×128, as in the re-ID baselines
        steps += [T.RandomHorizontalFlip(), T.Pad(pad, padding_mode="edge"), T.RandomCrop(img_size)]
        if lighting:
            steps.append(T.ColorJitter(brightness=0.3, contrast=0.2, saturation=0.2, hue=0.03))
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
    """Draws for the query images then the gallery images, in that order (eval_loader's)."""
    return ([corruption_draw(settings, QUERY_SIDE, i) for i in range(num_query)] +
            [corruption_draw(settings, GALLERY_SIDE, i) for i in range(num_gallery)])


def corrupted_image(image: Image.Image, draw: Draw | None) -> Image.Image:
    """The decoded image with its drawn corruption applied at its stored size (unchanged when `draw` is None)."""
    if draw is None:
        return image
    return Image.fromarray(corrupt(np.asarray(image), *draw))


class ReIDDataset(Dataset):
    """Images of a list of records: (tensor, label or pid, camera, index); `draws`, one per record, corrupts each
    decoded image before the transforms."""

    def __init__(self, records: Sequence[ImageRecord], transform: T.Compose, use_label: bool = True,
                 draws: Sequence[Draw] | None = None):
        if draws is not None and len(draws) != len(records):
            raise ValueError(f"{len(draws)} corruption draws for {len(records)} images")
        self.records = list(records)
        self.transform = transform
        self.use_label = use_label
        self.draws = draws

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        target = record.label if self.use_label else record.pid
        image = corrupted_image(load_image(record.path), None if self.draws is None else self.draws[index])
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
    the same global batches and keeps its share of the P identities, so the ranks together see exactly the
    single-process batch.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.index_by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.index_by_label[int(label)].append(index)
        self.labels = sorted(self.index_by_label)
        if p > len(self.labels):
            raise UserError(f"--batch-p {p}: the training set has only {len(self.labels)} identities")
        if p % world_size:
            raise UserError(f"--batch-p {p} must be divisible by the number of processes ({world_size})")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.num_batches = math.ceil(len(labels) / (p * k))
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (each draws its own reproducible batches) and the batch to start from on resume."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

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


def eval_loader(records: Sequence[ImageRecord], transform: T.Compose, batch_size: int, workers: int,
                draws: Sequence[Draw] | None = None) -> DataLoader:
    """A loader over evaluation images in their given order, targets being person ids; `draws` corrupts them."""
    return DataLoader(ReIDDataset(records, transform, use_label=False, draws=draws), batch_size=batch_size,
                      shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=detach_from_terminal_signals, generator=torch.Generator())
