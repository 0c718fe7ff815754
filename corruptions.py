"""The Market-1501-C corruptions: ImageNet-C's 19 plus rain, severities 1 to 5, with the reference's parameters.

The reference is the `imagecorruptions` package (ImageNet-C's code) applied, as the CIL-ReID benchmark does, to each
image at its stored size, with the float result truncated to uint8 (`np.uint8`); rain is CIL-ReID's albumentations
RandomRain recipe. Randomness comes from one `numpy.random.Generator` seeded by the caller, so a seed fixes the
output. Frost uses procedural textures (the reference's are photographs), so frost alone is not comparable pixel
for pixel.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates
from skimage.color import hsv2rgb, rgb2hsv

from datasets import load_image
from utils import UserError

SEVERITIES = (1, 2, 3, 4, 5)


def unit(image: np.ndarray) -> np.ndarray:
    """uint8 pixels as floats in [0, 1]."""
    return image.astype(np.float64) / 255.0


def to_pixels(unit_image: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] back to 0..255 floats, clipped as the reference clips."""
    return np.clip(unit_image, 0, 1) * 255


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation c (in [0, 1] units)."""
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = unit(image)
    return to_pixels(x + rng.normal(scale=c, size=x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise: counts drawn with mean c·x, divided by c."""
    c = (60, 25, 12, 5, 3)[severity - 1]
    return to_pixels(rng.poisson(unit(image) * c) / c)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a share c of the values (per channel) set to 0 or 1, half each (skimage's 's&p')."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    x = unit(image)
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return to_pixels(x)


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative Gaussian noise: x + x·N(0, c²)."""
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    x = unit(image)
    return to_pixels(x + x * rng.normal(scale=c, size=x.shape))


# ---------------------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------------------


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian on a colour image: per channel, edges repeated, kernel cut at 4σ."""
    return gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of standard deviation c pixels."""
    c = (1, 2, 3, 4, 6)[severity - 1]
    return to_pixels(gaussian_smooth(unit(image), c))


def local_shuffle_order(shape: tuple[int, int], delta: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """The source pixel of each pixel after ImageNet-C's glass-blur loop, as flat indices: each interior pixel,
    bottom-right first, takes the value of one up to `delta` away. The reference writes a swap,
    `x[h, w], x[h', w'] = x[h', w'], x[h, w]`, but on an H×W×3 array both sides are views, so it copies (h', w')
    onto (h, w) and leaves (h', w') as it was; this repeats that. The offsets are drawn at once."""
    h, w = shape
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    here = (rows[:, None] * w + cols[None, :]).ravel()
    order = list(range(h * w))
    for _ in range(iterations):
        dx, dy = rng.integers(-delta, delta, size=(2, here.size))
        there = (here + dy * w + dx).tolist()
        for a, b in zip(here.tolist(), there, strict=True):
            order[a] = order[b]
    return np.asarray(order)


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, scatter pixels locally (frosted glass), blur again."""
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    x = np.uint8(gaussian_smooth(unit(image), sigma) * 255)
    h, w = x.shape[:2]
    shuffled = x.reshape(h * w, -1)[local_shuffle_order((h, w), delta, iterations, rng)].reshape(x.shape)
    return to_pixels(gaussian_smooth(shuffled / 255.0, sigma))


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's defocus kernel: a normalised disk on a grid of at least 17×17, antialiased by a Gaussian."""
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    size = (3, 3) if radius <= 8 else (5, 5)
    return cv2.GaussianBlur(disk, ksize=size, sigmaX=alias_blur)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a disk (an out-of-focus lens)."""
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    kernel = disk_kernel(radius, alias_blur)
    x = unit(image)
    return to_pixels(np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(x.shape[2])], axis=2))


def translate_edge(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved by (dx, dy) pixels, the uncovered border filled with the nearest edge pixels."""
    h, w = x.shape[:2]
    pad = [(abs(dy), abs(dy)), (abs(dx), abs(dx))] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, pad, mode="edge")
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[top:top + h, left:left + w]


def linear_motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageNet-C's motion blur: a half-Gaussian weighted sum of copies shifted along `angle` degrees."""
    width = 2 * radius + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    kernel /= kernel.sum()
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    blurred = np.zeros(x.shape, dtype=np.float32)
    for i in range(width):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break
        blurred = blurred + kernel[i] * translate_edge(x, dx, dy)
    return blurred


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Linear motion blur at a random angle in [−45°, 45°]."""
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return np.clip(linear_motion_blur(image, radius, sigma, rng.uniform(-45, 45)), 0, 255)


def linear_resize(x: np.ndarray, axis: int, out: int, keep: int) -> np.ndarray:
    """The first `keep` samples of `x` resized along `axis` to `out` samples by linear interpolation with the end
    samples aligned, as scipy.ndimage.zoom(order=1) does (input position o·(size − 1)/(out − 1))."""
    size = x.shape[axis]
    position = np.arange(keep) * ((size - 1) / (out - 1) if out > 1 else 0.0)
    low = np.minimum(np.floor(position).astype(int), size - 1)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = keep
    frac = (position - low).reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def clipped_zoom(x: np.ndarray, factor: float, whole: bool = False) -> np.ndarray:
    """The central 1/factor of the image scaled up by `factor` (bilinear, scipy.ndimage.zoom's grid), cut to the
    input's size unless `whole`. Separable: rows, then columns, only as many as are kept."""
    crop_h, crop_w = math.ceil(x.shape[0] / factor), math.ceil(x.shape[1] / factor)
    top, left = (x.shape[0] - crop_h) // 2, (x.shape[1] - crop_w) // 2
    crop = x[top:top + crop_h, left:left + crop_w].astype(np.float64)
    out_h, out_w = round(crop_h * factor), round(crop_w * factor)
    keep_h, keep_w = (out_h, out_w) if whole else (min(x.shape[0], out_h), min(x.shape[1], out_w))
    return linear_resize(linear_resize(crop, 0, out_h, keep_h), 1, out_w, keep_w).astype(x.dtype)


ZOOM_FACTORS = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of the image and its central zooms (moving towards the camera)."""
    factors = np.arange(*ZOOM_FACTORS[severity - 1])
    x = unit(image).astype(np.float32)
    total = np.zeros_like(x)
    for factor in factors:
        total += clipped_zoom(x, factor)
    return to_pixels((x + total) / (len(factors) + 1))


# ---------------------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------------------


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A size × size diamond-square height map scaled to [0, 1] (ImageNet-C's fog and our frost haze)."""
    heights = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = heights[0:size:step, 0:size:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares += np.roll(squares, -1, axis=1)
        heights[half:size:step, half:size:step] = squares / 4 + wibble * rng.uniform(-wibble, wibble, squares.shape)
        centres = heights[half:size:step, half:size:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        heights[0:size:step, half:size:step] = left / 4 + wibble * rng.uniform(-wibble, wibble, left.shape)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        heights[half:size:step, 0:size:step] = top / 4 + wibble * rng.uniform(-wibble, wibble, top.shape)
        step //= 2
        wibble /= decay
    heights -= heights.min()
    return heights / heights.max()


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A fractal haze added to the image, then the range rescaled."""
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    x = unit(image)
    size = 1 << (max(image.shape) - 1).bit_length()
    peak = x.max()
    x = x + strength * plasma_fractal(size, decay, rng)[:x.shape[0], :x.shape[1], None]
    return to_pixels(x * peak / (peak + strength))


FROST_MEAN, FROST_STD = np.array([146.0, 167.0, 179.0]), 28.0  # the reference's five textures, averaged (RGB)


def frost_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A procedural frost layer in 0..255 (RGB): ice needles over a fractal haze, with the reference textures'
    mean colour and contrast."""
    h, w = shape
    needles = np.zeros((h, w), dtype=np.float32)
    for _ in range(h * w // 24):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(2, 9)
        end = (round(x0 + length * math.cos(angle)), round(y0 + length * math.sin(angle)))
        cv2.line(needles, (round(x0), round(y0)), end, float(rng.uniform(0.3, 1.0)), 1, cv2.LINE_AA)
    needles = cv2.GaussianBlur(needles, (0, 0), 0.6)
    haze = plasma_fractal(1 << (max(h, w) - 1).bit_length(), 1.8, rng)[:h, :w]
    layer = 0.35 * haze + 0.8 * needles
    layer = (layer - layer.mean()) / max(float(layer.std()), 1e-6)
    return np.clip(FROST_MEAN + FROST_STD * layer[:, :, None], 0, 255)


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Frost on the lens: a·image + b·frost texture."""
    keep, add = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    return np.clip(keep * image.astype(np.float64) + add * frost_texture(image.shape[:2], rng), 0, 255)


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Falling snow: a thresholded, zoomed noise layer, motion-blurred, over a whitened image."""
    mean, std, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))[severity - 1]
    x = image.astype(np.float32) / 255
    h, w = x.shape[:2]
    flakes = clipped_zoom(rng.normal(loc=mean, scale=std, size=(h, w, 1)), zoom, whole=True)[..., 0]
    flakes[flakes < threshold] = 0
    flakes = linear_motion_blur(np.clip(flakes, 0, 1), radius, sigma, rng.uniform(-135, -45))
    flakes = (np.round(flakes * 255).astype(np.uint8) / 255.0)[:h, :w, None]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[:, :, None]
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return to_pixels(x + flakes + np.rot90(flakes, k=2))


def water_spatter(x: np.ndarray, liquid: np.ndarray, gain: float) -> np.ndarray:
    """Pale turquoise water drops whose outline comes from the liquid layer's edges (ImageNet-C's OpenCV recipe)."""
    liquid = (liquid * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    mask = liquid * dist
    mask = mask / mask.max() * gain
    colour = np.array([175, 238, 238]) / 255.0
    return np.clip(x + mask[:, :, None] * colour, 0, 1)


def mud_spatter(x: np.ndarray, liquid: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Mud-brown blotches where the liquid layer is thick."""
    mask = gaussian_filter((liquid > threshold).astype(np.float32), sigma, mode="nearest", truncate=4.0)
    mask[mask < 0.8] = 0
    colour = np.array([63, 42, 20]) / 255.0
    return np.clip(x * (1 - mask[:, :, None]) + colour * mask[:, :, None], 0, 1)


def spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water (severities 1–3) or mud (4–5) splashed on the lens."""
    mean, std, sigma, threshold, gain, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1))[severity - 1]
    x = image.astype(np.float32) / 255
    liquid = gaussian_filter(rng.normal(loc=mean, scale=std, size=x.shape[:2]), sigma, mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0
    out = mud_spatter(x, liquid, threshold, gain) if mud else water_spatter(x, liquid, gain)
    return to_pixels(out)


RAIN_TYPES = {"drizzle": (770, 10), "heavy": (600, 30), "torrential": (500, 60)}  # area per drop, drop length


def rain(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """CIL-ReID's rain: albumentations RandomRain (grey streaks, then a box blur), then darkened by 0.05 + 0.05·s."""
    kind = ("drizzle", "heavy", "heavy", "torrential", "torrential")[severity - 1]
    area_per_drop, length = RAIN_TYPES[kind]
    h, w = image.shape[:2]
    slant = int(rng.uniform(-10, 10))
    wet = np.ascontiguousarray(image.copy())
    for _ in range(h * w // area_per_drop):
        x0 = int(rng.integers(slant, w + 1)) if slant < 0 else int(rng.integers(0, w - slant + 1))
        y0 = int(rng.integers(0, max(h - length, 0) + 1))
        cv2.line(wet, (x0, y0), (x0 + slant, y0 + length), (200, 200, 200), 1)
    wet = cv2.blur(wet, (2 + severity, 2 + severity))
    shift = -(0.05 + 0.05 * severity) * 255
    lut = np.clip(np.arange(256, dtype=np.float32) + shift, 0, 255).astype(np.uint8)
    return lut[wet]


# ---------------------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------------------


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value raised by c."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = rgb2hsv(unit(image))
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return to_pixels(hsv2rgb(hsv))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Each channel pulled towards its mean: (x − mean)·c + mean."""
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = unit(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return to_pixels((x - means) * c + means)


def saturate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation scaled by a and raised by b (the first two severities desaturate)."""
    scale, offset = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))[severity - 1]
    hsv = rgb2hsv(unit(image))
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * scale + offset, 0, 1)
    return to_pixels(hsv2rgb(hsv))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A JPEG round trip through Pillow at quality c."""
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-filtered down to a share c of the size, then nearest-neighbour back up."""
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement field (σ = 1% of the size) applied with bilinear sampling."""
    alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)[severity - 1]
    x = image.astype(np.float32) / 255
    h, w = x.shape[:2]
    sigma, reach = (h * 0.01, w * 0.01), h * 0.005
    dx, dy = ((gaussian_filter(rng.uniform(-reach, reach, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha)
              .astype(np.float32) for _ in range(2))
    rows, cols, chans = np.meshgrid(np.arange(h), np.arange(w), np.arange(x.shape[2]), indexing="ij")
    coords = np.stack([rows + dy[:, :, None], cols + dx[:, :, None], chans])
    return to_pixels(map_coordinates(x, coords, order=1, mode="reflect"))


# ---------------------------------------------------------------------------------------------------------
# The registry and the entry point
# ---------------------------------------------------------------------------------------------------------

FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
    "rain": rain,
}
CORRUPTIONS = tuple(FUNCTIONS)


def check_corruption(name: str, severity: int) -> None:
    """A UserError naming the value and the allowed ones when `name` or `severity` is not a Market-1501-C one."""
    if name not in FUNCTIONS:
        raise UserError(f"corruption '{name}': expected one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise UserError(f"severity {severity!r}: expected an integer from 1 to 5")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (uint8 H×W×3) with corruption `name` at `severity` 1–5; the same seed gives the same pixels."""
    check_corruption(name, severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"corrupt: expected a uint8 H×W×3 image, got {image.dtype} {image.shape}")
    out = FUNCTIONS[name](image, int(severity), np.random.default_rng(seed))
    return np.asarray(out).astype(np.uint8)


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
