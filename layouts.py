"""The published data sets as they are downloaded: Market-1501, DukeMTMC-reID, MSMT17 (V1, V2) and CUHK03-NP, their
folders and file names, found and parsed into image records, with the published counts and the image check."""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from utils import LOG, UserError

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
