"""The synthetic Market-format set: drawn people seen by cameras, in presets from the demo's set to Market's size.

A person is a set of traits (clothes, colours, build, accessories); a camera a look (background, lighting, colour
cast, blur, noise, preferred viewpoint). A preset names a `Look` (how people and cameras are drawn) and the set's
sizes. `default` is the demo's set and stays byte-identical for a seed; `hard` adds families of near-identical
people, stronger camera shifts, viewpoint-dependent clothes, pose changes, more occluders and misaligned boxes;
`market` is `hard` at Market-1501's counts; `domain-b` is the default set seen by other cameras in other clothes.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from layouts import DISTRACTOR_PID, JUNK_PID, MARKET_FOLDERS
from utils import UserError, atomic_write_bytes

PALETTE = np.array(
    [
        (200, 30, 30), (30, 60, 190), (30, 150, 50), (230, 200, 40), (240, 240, 240), (25, 25, 25),
        (130, 130, 130), (120, 60, 160), (240, 130, 30), (120, 80, 40), (40, 180, 190), (240, 150, 180),
        (20, 40, 90), (90, 110, 40),
    ],
    dtype=np.float32,
)
# Domain B dresses its people in muted, earthy and pastel colours none of which is in PALETTE.
PALETTE_B = np.array(
    [
        (150, 90, 70), (70, 110, 120), (170, 160, 110), (205, 185, 150), (95, 70, 105), (60, 85, 60),
        (180, 120, 140), (110, 140, 175), (210, 115, 80), (55, 55, 75), (160, 170, 170), (125, 100, 60),
        (90, 135, 90), (185, 85, 100),
    ],
    dtype=np.float32,
)
SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 80), (100, 70, 50)], dtype=np.float32)
HAIR = np.array([(20, 20, 20), (90, 60, 30), (200, 170, 90), (150, 150, 150)], dtype=np.float32)
UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "twotone", "logo")
LOWER_KINDS = ("trousers", "shorts", "skirt")
# The traits a family member may have of its own; build, skin and the rest stay the family's.
MEMBER_TRAITS = ("upper", "upper2", "pattern", "lower", "lower_kind", "shoes", "hair", "hat", "backpack", "bag",
                 "jacket")


@dataclass(frozen=True)
class Look:
    """How a preset draws people and cameras: (low, high) ranges of uniform draws, probabilities, sizes."""

    palette: np.ndarray
    camera_stream: int  # the cameras' random stream: another stream gives other cameras
    wall: tuple[float, float]
    ground: tuple[float, float]
    gain: tuple[float, float]
    cast: tuple  # per-channel multipliers: (low, high), each a number or three
    blur: float  # largest Gaussian blur radius
    noise: tuple[float, float]
    view_focus: float  # Dirichlet concentration of a camera's viewpoints: smaller, more one-sided cameras
    flicker: tuple[float, float]  # per-image lighting change within a camera
    family_size: int  # people a family of near-identical outfits holds (1: everyone drawn independently)
    member_changes: tuple[int, int]  # traits a family member draws anew, fewest and most; siblings differ in 2+
    backpack: float  # probability a person carries one
    backpack_views: tuple[int, ...]  # viewpoints it is drawn in: 0 front, 1 back, 2 side
    backpack_over: bool  # drawn over the torso; under it (the original drawing) a back view hides it
    jacket: float  # probability of an open jacket, its shirt seen from the front only
    scale: tuple[float, float]  # body height in the box: pose and distance
    shift: float  # horizontal position jitter, a share of the width
    lift: float  # vertical position jitter, a share of the height
    stride: float
    arm: float
    occluders: int  # chances of an occluder per image
    occlusion: float  # probability of each
    occluder_top: tuple[float, float]
    occluder_width: tuple[float, float]
    crop_zoom: tuple[float, float]  # a misaligned box: its share of the drawn frame (1, 1: aligned)


DEFAULT_LOOK = Look(
    palette=PALETTE, camera_stream=1, wall=(60, 220), ground=(60, 200), gain=(0.65, 1.25), cast=(0.8, 1.2),
    blur=1.2, noise=(2, 10), view_focus=0.8, flicker=(0.9, 1.1), family_size=1, member_changes=(0, 0),
    backpack=0.35, backpack_views=(1, 2), backpack_over=False, jacket=0.0, scale=(0.9, 1.05), shift=0.08, lift=0.03,
    stride=0.6, arm=0.5, occluders=1, occlusion=0.2, occluder_top=(0.3, 0.7), occluder_width=(0.3, 0.45),
    crop_zoom=(1.0, 1.0),
)
HARD_LOOK = dataclasses.replace(
    DEFAULT_LOOK, gain=(0.6, 1.3), cast=(0.8, 1.2), blur=1.3, noise=(3, 12), view_focus=0.5, flicker=(0.85, 1.15),
    family_size=2, member_changes=(2, 3), backpack=0.5, backpack_views=(1,), backpack_over=True, jacket=0.35,
    scale=(0.8, 1.08), shift=0.12, lift=0.06, stride=0.9, arm=0.9, occluders=2, occlusion=0.2,
    occluder_top=(0.2, 0.7), occluder_width=(0.25, 0.4), crop_zoom=(0.88, 0.98),
)
# Domain B: dim, blue-cast cameras over dark walls and pale floors, and another wardrobe.
DOMAIN_B_LOOK = dataclasses.replace(
    DEFAULT_LOOK, palette=PALETTE_B, camera_stream=11, wall=(25, 130), ground=(110, 240), gain=(0.55, 0.95),
    cast=((0.7, 0.85, 1.0), (0.95, 1.05, 1.3)), noise=(4, 12),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic set: its preset (the look) and sizes; the defaults are the demo's small CPU set.

    `train_images`, `query_images`, `gallery_images` (identity images; distractors and junk come on top) fix the
    totals exactly, spread at random over people and cameras; 0 draws cameras and images per person instead.
    """

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
    preset: str = "default"
    train_images: int = 0
    query_images: int = 0
    gallery_images: int = 0


# Market-1501's counts: bounding_box_test holds 13,120 identity images, 2,793 distractors and 3,819 junk boxes
# (19,732 files; 15,913 without junk, the gallery size torchreid reports).
MARKET_SIZES = {"train_ids": 751, "test_ids": 750, "train_images": 12936, "query_images": 3368,
                "gallery_images": 13120, "distractors": 2793, "junk": 3819}
PRESETS: dict[str, tuple[Look, dict]] = {
    "default": (DEFAULT_LOOK, {}),
    "hard": (HARD_LOOK, {"images_per_camera": 4}),
    "market": (HARD_LOOK, MARKET_SIZES),
    "domain-b": (DOMAIN_B_LOOK, {}),
}


def preset_config(preset: str, **overrides) -> SyntheticConfig:
    """A preset's configuration, with any of its sizes (or the seed) overridden."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    return SyntheticConfig(**{**PRESETS[preset][1], **overrides, "preset": preset})


def identity_traits(rng: np.random.Generator, look: Look = DEFAULT_LOOK) -> dict:
    """The appearance that defines one person: clothes, colours, build and accessories."""
    palette = look.palette
    upper, second, lower = rng.choice(len(palette), size=3, replace=False)
    traits = {
        "upper": palette[upper], "upper2": palette[second], "pattern": UPPER_PATTERNS[rng.integers(5)],
        "lower": palette[lower], "lower_kind": LOWER_KINDS[rng.integers(3)],
        "shoes": palette[rng.integers(len(palette))], "skin": SKIN[rng.integers(4)], "hair": HAIR[rng.integers(4)],
        "hat": palette[rng.integers(len(palette))] if rng.random() < 0.25 else None,
        "backpack": palette[rng.integers(len(palette))] if rng.random() < look.backpack else None,
        "bag": palette[rng.integers(len(palette))] if rng.random() < 0.25 else None,
        "width": float(rng.uniform(0.8, 1.2)), "height": float(rng.uniform(0.85, 1.0)), "jacket": None,
    }
    if look.jacket > 0:  # drawn last, so looks without jackets keep the original random stream
        traits["jacket"] = palette[rng.integers(len(palette))] if rng.random() < look.jacket else None
    return traits


def same_trait(a: object, b: object) -> bool:
    """Whether two trait values are equal (colours are arrays, absent accessories None)."""
    if a is None or b is None:
        return a is b
    if isinstance(a, str):
        return a == b
    return bool(np.array_equal(a, b))


def family_member(base: dict, rng: np.random.Generator, look: Look, siblings: list[dict]) -> dict:
    """A member of a family: the family's traits with `look.member_changes` of MEMBER_TRAITS drawn anew until they
    differ from the base, and the whole drawn again should it differ from a sibling in fewer than two traits."""
    fewest, most = look.member_changes
    while True:
        traits = dict(base)
        for key in rng.choice(MEMBER_TRAITS, size=int(rng.integers(fewest, most + 1)), replace=False).tolist():
            while same_trait(traits[key], base[key]):
                traits[key] = identity_traits(rng, look)[key]
        if all(sum(not same_trait(traits[k], sibling[k]) for k in traits) >= 2 for sibling in siblings):
            return traits


def camera_conditions(rng: np.random.Generator, look: Look = DEFAULT_LOOK) -> dict:
    """One camera's look: background, lighting gain, colour cast, blur, noise and preferred viewpoint."""
    return {
        "ground": rng.uniform(*look.ground, 3), "wall": rng.uniform(*look.wall, 3),
        "horizon": float(rng.uniform(0.45, 0.8)), "gain": float(rng.uniform(*look.gain)),
        "cast": rng.uniform(*look.cast, 3), "blur": float(rng.uniform(0, look.blur)),
        "noise": float(rng.uniform(*look.noise)), "views": rng.dirichlet(np.ones(3) * look.view_focus),
    }


def _colour(rgb: np.ndarray, shade: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(rgb * shade, 0, 255))


@dataclass(frozen=True)
class Figure:
    """Where a person stands in the box: centre, top, body height and half the torso width, in pixels."""

    cx: float
    top: float
    body_h: float
    half: float

    def y(self, share: float) -> float:
        """The height `share` of the way down the body."""
        return self.top + share * self.body_h


def draw_scene(camera: dict, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The camera's background: wall, ground and a few clutter boxes."""
    h, w = size
    img = Image.new("RGB", (w, h), _colour(camera["wall"]))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(h * camera["horizon"]), w, h], fill=_colour(camera["ground"]))
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.rectangle([x0, y0, x0 + rng.uniform(0.05, 0.33) * w, y0 + rng.uniform(0.03, 0.25) * h],
                       fill=_colour(rng.uniform(40, 230, 3)))
    return img


def place_figure(traits: dict, view: int, size: tuple[int, int], rng: np.random.Generator, look: Look) -> Figure:
    """The person's position and size in the box, with pose jitter; side views are narrower."""
    h, w = size
    scale = traits["height"] * rng.uniform(*look.scale)
    cx = w / 2 + rng.uniform(-look.shift, look.shift) * w
    top = h * (1 - scale) / 2 + rng.uniform(-look.lift, look.lift) * h
    half = w * 0.2 * traits["width"] * (0.7 if view == 2 else 1.0)
    return Figure(cx, top, h * scale, half)


def draw_legs(draw: ImageDraw.ImageDraw, traits: dict, fig: Figure, rng: np.random.Generator, look: Look) -> None:
    """Legs mid-stride, trousers, shorts or a skirt, and shoes."""
    half, y = fig.half, fig.y
    stride = rng.uniform(-1, 1) * half * look.stride
    lower = traits["lower"]
    leg_end = y(0.93) if traits["lower_kind"] == "trousers" else y(0.72)
    for side, swing in ((-1, stride), (1, -stride)):
        x = fig.cx + side * half * 0.45
        draw.polygon([(x - half * 0.3, y(0.55)), (x + half * 0.3, y(0.55)), (x + swing + half * 0.25, y(0.95)),
                      (x + swing - half * 0.25, y(0.95))], fill=_colour(traits["skin"]))
        if traits["lower_kind"] != "skirt":
            draw.polygon([(x - half * 0.32, y(0.55)), (x + half * 0.32, y(0.55)),
                          (x + swing * 0.9 + half * 0.27, leg_end), (x + swing * 0.9 - half * 0.27, leg_end)],
                         fill=_colour(lower))
        draw.rectangle([x + swing - half * 0.3, y(0.95), x + swing + half * 0.35, y(1.0)],
                       fill=_colour(traits["shoes"]))
    if traits["lower_kind"] == "skirt":
        cx = fig.cx
        skirt = [(cx - half, y(0.55)), (cx + half, y(0.55)), (cx + half * 1.3, y(0.78)), (cx - half * 1.3, y(0.78))]
        draw.polygon(skirt, fill=_colour(lower))


def draw_backpack(draw: ImageDraw.ImageDraw, traits: dict, fig: Figure, view: int) -> None:
    """A backpack on the person's back, shifted to one side in a side view."""
    bx = fig.cx + (fig.half * 0.6 if view == 2 else 0)
    draw.rectangle([bx - fig.half * 0.8, fig.y(0.22), bx + fig.half * 0.8, fig.y(0.5)],
                   fill=_colour(traits["backpack"], 0.9))


def draw_torso(draw: ImageDraw.ImageDraw, traits: dict, fig: Figure, view: int, look: Look) -> None:
    """Backpack (in the views that show it), the upper garment's pattern, the front-only logo and jacket."""
    cx, half, y = fig.cx, fig.half, fig.y
    backpack = traits["backpack"] is not None and view in look.backpack_views
    if backpack and not look.backpack_over:
        draw_backpack(draw, traits, fig, view)
    torso = [cx - half, y(0.18), cx + half, y(0.57)]
    draw.rectangle(torso, fill=_colour(traits["upper"]))
    pattern, second = traits["pattern"], _colour(traits["upper2"])
    if pattern == "hstripes":
        for k in range(4):
            y0 = torso[1] + (k + 0.5) * (torso[3] - torso[1]) / 4.5
            draw.rectangle([torso[0], y0, torso[2], y0 + fig.body_h * 0.03], fill=second)
    elif pattern == "vstripes":
        for k in range(3):
            x0 = torso[0] + (k + 0.5) * (torso[2] - torso[0]) / 3.5
            draw.rectangle([x0, torso[1], x0 + max(1.0, half * 0.2), torso[3]], fill=second)
    elif pattern == "twotone":
        draw.rectangle([torso[0], (torso[1] + torso[3]) / 2, torso[2], torso[3]], fill=second)
    elif pattern == "logo" and view == 0:
        draw.ellipse([cx - half * 0.4, y(0.27), cx + half * 0.4, y(0.27) + half * 0.8], fill=second)
    if traits["jacket"] is not None and view == 0:  # an open jacket shows its shirt from the front only
        draw.rectangle([cx - half * 0.35, torso[1], cx + half * 0.35, torso[3]], fill=_colour(traits["jacket"]))
    if backpack and look.backpack_over:
        draw_backpack(draw, traits, fig, view)


def draw_arms_and_head(draw: ImageDraw.ImageDraw, traits: dict, fig: Figure, view: int,
                       rng: np.random.Generator, look: Look) -> None:
    """Swinging arms, a hand bag, the head (hair from behind) and a hat."""
    cx, half, y = fig.cx, fig.half, fig.y
    arm = rng.uniform(-look.arm, look.arm) * half
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


def draw_occluders(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: np.random.Generator, look: Look) -> None:
    """Passers-by or objects in front of the person, rising from the bottom at the left or right."""
    h, w = size
    for _ in range(look.occluders):
        if rng.random() < look.occlusion:
            ox = rng.choice([0, w * 0.6])
            oy = rng.uniform(*look.occluder_top) * h
            draw.rectangle([ox, oy, ox + w * rng.uniform(*look.occluder_width), h],
                           fill=_colour(rng.uniform(30, 230, 3)))


def misalign(img: Image.Image, rng: np.random.Generator, look: Look) -> Image.Image:
    """A detector's loose box: a shifted sub-box of the frame, scaled back to the frame's size."""
    w, h = img.size
    zoom = rng.uniform(*look.crop_zoom)
    x0, y0 = rng.uniform(0, w * (1 - zoom)), rng.uniform(0, h * (1 - zoom))
    return img.crop((round(x0), round(y0), round(x0 + w * zoom), round(y0 + h * zoom))).resize(
        (w, h), Image.Resampling.BILINEAR)


def draw_person(traits: dict, camera: dict, size: tuple[int, int], rng: np.random.Generator,
                look: Look = DEFAULT_LOOK) -> Image.Image:
    """One crop of a person seen by a camera: viewpoint, pose jitter, occlusion and box drawn at random."""
    img = draw_scene(camera, size, rng)
    draw = ImageDraw.Draw(img)
    view = int(rng.choice(3, p=camera["views"]))  # 0 front, 1 back, 2 side
    fig = place_figure(traits, view, size, rng, look)
    draw_legs(draw, traits, fig, rng, look)
    draw_torso(draw, traits, fig, view, look)
    draw_arms_and_head(draw, traits, fig, view, rng, look)
    draw_occluders(draw, size, rng, look)
    return misalign(img, rng, look) if look.crop_zoom[0] < 1 else img


def apply_camera(img: Image.Image, camera: dict, rng: np.random.Generator, look: Look = DEFAULT_LOOK) -> Image.Image:
    """The camera's optics and sensor: blur, lighting gain with per-image flicker, colour cast and noise."""
    if camera["blur"] > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(camera["blur"]))
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels * camera["gain"] * rng.uniform(*look.flicker) * camera["cast"]
    pixels += rng.normal(0, camera["noise"], pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def junk_image(camera: dict, size: tuple[int, int], rng: np.random.Generator, traits: dict,
               look: Look = DEFAULT_LOOK) -> Image.Image:
    """A bad detection: a background patch or a fragment of a person (Market's junk and distractor boxes)."""
    h, w = size
    if rng.random() < 0.5:
        person = draw_person(traits, camera, (h * 2, w * 2), rng, look)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        img = person.crop((x0, y0, x0 + w, y0 + h))
    else:
        img = Image.new("RGB", (w, h), _colour(camera["wall"]))
        ImageDraw.Draw(img).rectangle([0, int(h * camera["horizon"]), w, h], fill=_colour(camera["ground"]))
    return apply_camera(img, camera, rng, look)


def market_name(pid: int, cam: int, frame: int, box: int = 1) -> str:
    """A Market-1501 file name; the sequence number is fixed at 1."""
    person = "-1" if pid == JUNK_PID else f"{pid:04d}"
    return f"{person}_c{cam}s1_{frame:06d}_{box:02d}.jpg"


def save_jpeg(img: Image.Image, path: Path) -> None:
    """An image written as a quality-92 JPEG, atomically."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=92)
    atomic_write_bytes(path, buffer.getvalue())


def person_ids(config: SyntheticConfig) -> tuple[list[int], list[int]]:
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


def spread(total: int, slots: int, rng: np.random.Generator, low: int, high: int, what: str) -> np.ndarray:
    """`total` split at random into `slots` whole numbers between `low` and `high`."""
    if not low * slots <= total <= high * slots:
        raise UserError(f"synthetic set: {total} {what} cannot be spread over {slots} slots, {low} to {high} each; "
                        "a preset with fixed totals needs --train-ids, --test-ids and --cameras that allow it")
    counts = np.full(slots, low)
    while (left := total - int(counts.sum())) > 0:
        open_slots = np.flatnonzero(counts < high)
        counts[open_slots] += rng.multinomial(left, np.full(len(open_slots), 1 / len(open_slots)))
        counts = np.minimum(counts, high)
    return counts


def exact_shots(config: SyntheticConfig, part: str, people: int) -> list[list[tuple[int, str]]]:
    """Each person's (camera, folder) shots when the preset fixes the image totals: every person is seen by
    `min_cameras` or more cameras; a test person has one query a camera and at least one gallery image there."""
    rng = np.random.default_rng([config.seed, 5, 0 if part == "train" else 1])
    if part == "train":
        n_cams = rng.integers(config.min_cameras, config.cameras + 1, size=people)
        per_slot = spread(config.train_images, int(n_cams.sum()), rng, 1, config.train_images, "training images")
    else:
        n_cams = spread(config.query_images, people, rng, config.min_cameras, config.cameras, "queries")
        per_slot = spread(config.gallery_images, config.query_images, rng, 1, config.gallery_images,
                          "gallery images")
    shots, slot = [], 0
    for n in n_cams.tolist():
        mine = []
        for cam in sorted(rng.choice(config.cameras, size=n, replace=False).tolist()):
            if part == "train":
                mine += [(cam, "train")] * int(per_slot[slot])
            else:
                mine += [(cam, "query")] + [(cam, "gallery")] * int(per_slot[slot])
            slot += 1
        shots.append(mine)
    return shots


def drawn_shots(config: SyntheticConfig, part: str, rng: np.random.Generator) -> list[tuple[int, str]]:
    """A person's (camera, folder) shots drawn from its own stream: 2..cameras cameras, `images_per_camera` a
    camera, and for a test person one more, the first being the query."""
    n_cams = int(rng.integers(config.min_cameras, config.cameras + 1))
    shots = []
    for cam in sorted(rng.choice(config.cameras, size=n_cams, replace=False).tolist()):
        for shot in range(config.images_per_camera + (1 if part == "test" else 0)):
            shots.append((cam, "train" if part == "train" else ("query" if shot == 0 else "gallery")))
    return shots


@dataclass
class Person:
    """One identity of the plan: its traits, its shots as (camera, folder), and the stream that draws them."""

    pid: int
    part: str
    family: int
    traits: dict
    shots: list[tuple[int, str]]
    rng: np.random.Generator


def synthetic_plan(config: SyntheticConfig) -> list[Person]:
    """Every identity of the set, training then test, with traits and shots; families are runs of
    `family_size` consecutive ids within a part, sharing a base outfit drawn from the family's own stream."""
    look = PRESETS[config.preset][0]
    train_pids, test_pids = person_ids(config)
    exact = {"train": config.train_images > 0, "test": config.query_images > 0}
    people = []
    for part_no, (part, pids) in enumerate((("train", train_pids), ("test", test_pids))):
        fixed = exact_shots(config, part, len(pids)) if exact[part] else None
        for i, pid in enumerate(pids):
            rng = np.random.default_rng([config.seed, 2, pid])
            family = i // look.family_size
            if look.family_size > 1:
                base = identity_traits(np.random.default_rng([config.seed, 4, part_no, family]), look)
                siblings = [p.traits for p in people[len(people) - i % look.family_size:]]
                traits = family_member(base, rng, look, siblings)
            else:
                traits = identity_traits(rng, look)
            shots = fixed[i] if fixed is not None else drawn_shots(config, part, rng)
            people.append(Person(pid, part, family, traits, shots, rng))
    return people


def plan_counts(config: SyntheticConfig, people: list[Person]) -> dict[str, int]:
    """Images a folder the plan writes: train, gallery (identities, distractors and junk) and query."""
    counts = {"train": 0, "gallery": config.distractors + config.junk, "query": 0}
    for person in people:
        for _, folder in person.shots:
            counts[folder] += 1
    return counts


def write_person(person: Person, first_frame: int, cameras: list[dict], size: tuple[int, int], look: Look,
                 folders: dict[str, Path]) -> dict[str, int]:
    """Write one person's shots, numbered from `first_frame`, from the person's own stream; images a folder."""
    counts: dict[str, int] = {}
    for frame, (cam, target) in enumerate(person.shots, start=first_frame):
        img = apply_camera(draw_person(person.traits, cameras[cam], size, person.rng, look), cameras[cam],
                           person.rng, look)
        save_jpeg(img, folders[target] / market_name(person.pid, cam + 1, frame))
        counts[target] = counts.get(target, 0) + 1
    return counts


def write_people(people: list[Person], cameras: list[dict], size: tuple[int, int], look: Look,
                 folders: dict[str, Path], workers: int, bar) -> dict[str, int]:
    """Every person's shots, in `workers` processes; frames numbered in plan order, so the set is the same for
    any number of workers."""
    firsts = (np.cumsum([0] + [len(p.shots) for p in people])[:-1] + 1).tolist()
    jobs = [(person, first, cameras, size, look, folders) for person, first in zip(people, firsts, strict=True)]
    counts = {part: 0 for part in folders}
    if workers <= 1:
        done = (write_person(*job) for job in jobs)
        return add_counts(counts, done, bar)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return add_counts(counts, pool.map(write_person, *zip(*jobs, strict=True), chunksize=16), bar)


def add_counts(counts: dict[str, int], done: Iterable[dict[str, int]], bar) -> dict[str, int]:
    """Sum the images a folder of finished people into `counts`, moving the progress bar."""
    for person_counts in done:
        for part, n in person_counts.items():
            counts[part] += n
            bar.update(n)
    return counts


def write_synthetic(out: str | Path, config: SyntheticConfig, progress: bool = True,
                    workers: int = 1) -> dict[str, int]:
    """Write a Market-format synthetic set under `out` (its three image folders) and return image counts; the
    people are drawn in `workers` processes, with the same images for any number of them."""
    from tqdm import tqdm

    look = PRESETS[config.preset][0]
    out = Path(out)
    folders = {part: out / name for part, name in MARKET_FOLDERS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    size = (config.height, config.width)
    cameras = [camera_conditions(np.random.default_rng([config.seed, look.camera_stream, c]), look)
               for c in range(config.cameras)]
    people = synthetic_plan(config)
    bar = tqdm(total=sum(plan_counts(config, people).values()), desc=f"synthetic {config.preset}", unit="img",
               disable=not progress)
    counts = write_people(people, cameras, size, look, folders, workers, bar)
    frame = sum(len(p.shots) for p in people)
    rng = np.random.default_rng([config.seed, 3])
    for pid, count in ((DISTRACTOR_PID, config.distractors), (JUNK_PID, config.junk)):
        for _ in range(count):
            frame += 1
            cam = int(rng.integers(config.cameras))
            img = junk_image(cameras[cam], size, rng, identity_traits(rng, look), look)
            save_jpeg(img, folders["gallery"] / market_name(pid, cam + 1, frame))
            counts["gallery"] += 1
            bar.update()
    bar.close()
    return counts
