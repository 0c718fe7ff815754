"""The Market-1501-C corruptions and the corrupted evaluation protocol, against values worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import eval_inputs
import prepare
from corruptions import CORRUPTIONS, GALLERY_SIDE, QUERY_SIDE, CorruptionSettings, corrupt, corruption_draw
from datasets import load_eval_records, load_image
from metrics import rank_split
from utils import UserError

# Corruptions whose reference parameters are not ordered by distance to the clean image at every step: saturate's
# first two severities desaturate and the rest oversaturate; snow's severity 3 has fewer, larger flakes than 2;
# frost's later severities keep less image but add about as much texture; glass blur's severity 3 makes three passes
# of its pixel loop against severity 4's two. Their worst severity is still the farthest.
NOT_MONOTONE = {"saturate", "snow", "frost", "glass_blur"}


def smooth_image(seed: int, height: int = 128, width: int = 64) -> np.ndarray:
    """A person-crop-like test image: smooth colour gradients and a few blocks, uint8 H×W×3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([80 + 120 * yy, 60 + 100 * xx, 140 - 60 * yy * xx], axis=2)
    for _ in range(4):
        top, left = rng.integers(0, height - 20), rng.integers(0, width - 16)
        image[top:top + 20, left:left + 16] = rng.integers(20, 235, size=3)
    return image.astype(np.uint8)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_is_deterministic_for_a_seed_and_keeps_shape_and_dtype(name: str):
    image = smooth_image(0, 96, 48)
    first, again = corrupt(image, name, 3, seed=7), corrupt(image, name, 3, seed=7)
    assert first.dtype == np.uint8 and first.shape == image.shape
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, image)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distance_to_the_clean_image_grows_with_severity(name: str):
    images = [smooth_image(seed) for seed in range(3)]
    distance = [np.mean([np.abs(corrupt(img, name, s, seed=k).astype(float) - img).mean()
                         for k, img in enumerate(images)]) for s in range(1, 6)]
    if name in NOT_MONOTONE:
        assert distance[4] > distance[0], distance
    else:
        assert all(b > a for a, b in zip(distance, distance[1:], strict=False)), distance


def test_a_new_seed_gives_new_noise():
    image = smooth_image(1)
    assert not np.array_equal(corrupt(image, "gaussian_noise", 2, 0), corrupt(image, "gaussian_noise", 2, 1))


@pytest.mark.parametrize(("name", "severity", "message"), [
    ("fogg", 1, "corruption 'fogg': expected one of gaussian_noise"),
    ("fog", 6, "severity 6: expected an integer from 1 to 5"),
    ("fog", 0, "severity 0: expected an integer from 1 to 5"),
])
def test_a_bad_name_or_severity_is_named(name: str, severity: int, message: str):
    with pytest.raises(UserError, match=message):
        corrupt(smooth_image(0), name, severity, 0)


# ---------------------------------------------------------------------------------------------------------
# Reference formulas, values worked out by hand
# ---------------------------------------------------------------------------------------------------------


def test_contrast_pulls_each_channel_towards_its_mean():
    # Half the pixels 0, half 201: mean 100.5; severity 1 keeps 0.4 of the spread: 100.5 ∓ 40.2 = 60.3 and
    # 140.7, truncated to uint8 as the reference does: 60 and 140.
    image = np.zeros((64, 32, 3), np.uint8)
    image[:32] = 201
    out = corrupt(image, "contrast", 1, 0)
    assert (out[32:] == 60).all() and (out[:32] == 140).all()


def test_brightness_raises_the_hsv_value():
    # Severity 1 adds 0.1 (25.5 grey levels) to V = max(R, G, B) and keeps hue and saturation, so every channel is
    # scaled by (200 + 25.5) / 200: (200, 100, 50) → (225.5, 112.75, 56.375) → (225, 112, 56).
    image = np.tile(np.array([200, 100, 50], np.uint8), (64, 32, 1))
    assert (corrupt(image, "brightness", 1, 0) == [225, 112, 56]).all()
    # A grey pixel has no saturation: 100 + 76.5 = 176.5 → 176 at severity 3.
    assert (corrupt(np.full((64, 32, 3), 100, np.uint8), "brightness", 3, 0) == 176).all()


def test_saturate_scales_the_hsv_saturation():
    # (200, 100, 50): V = 200, S = 150 / 200 = 0.75; severity 3 doubles S, clipped to 1: the minimum channel goes to
    # V·(1 − S) = 0 and the middle one keeps its relative place, (100 − 50) / (200 − 50) = 1/3 of the way: 66.67.
    image = np.tile(np.array([200, 100, 50], np.uint8), (64, 32, 1))
    assert (corrupt(image, "saturate", 3, 0) == [200, 66, 0]).all()


def test_pixelate_averages_blocks_and_repeats_them():
    # Severity 5 keeps a quarter of each side: 128×64 → 32×16 by box averages of 4×4 blocks, then each average
    # repeated over its block. Blocks of a base value ± 8 in a pattern that sums to zero average to the base.
    rng = np.random.default_rng(0)
    base = rng.integers(10, 240, size=(32, 16, 3))
    pattern = np.tile(np.array([[8, -8], [-8, 8]]), (2, 2))
    image = (base[:, None, :, None, :] + pattern[None, :, None, :, None]).reshape(128, 64, 3).astype(np.uint8)
    expected = np.repeat(np.repeat(base, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(corrupt(image, "pixelate", 5, 0), expected)


def test_gaussian_noise_has_the_reference_standard_deviation():
    # Severity 1: N(0, 0.08²) in [0, 1] units, 20.4 grey levels; on mid-grey nothing is clipped, and truncation to
    # uint8 lowers the mean by 0.5 and adds 1/12 to the variance.
    out = corrupt(np.full((128, 64, 3), 128, np.uint8), "gaussian_noise", 1, 3).astype(float)
    assert out.std() == pytest.approx(math.sqrt(20.4**2 + 1 / 12), rel=0.02)
    assert out.mean() == pytest.approx(127.5, abs=0.5)


def test_shot_noise_is_poisson_with_c_photons_at_full_scale():
    # Severity 1 (c = 60) on grey 0.5: counts ~ Poisson(30), divided by 60: standard deviation √30 / 60 · 255.
    out = corrupt(np.full((128, 64, 3), 255 // 2 + 1, np.uint8), "shot_noise", 1, 4).astype(float)
    assert out.std() == pytest.approx(math.sqrt(128 / 255 * 60) / 60 * 255, rel=0.03)


def test_impulse_noise_sets_a_share_of_values_to_black_or_white():
    # Severity 2 flips 6% of the values, half to 0 and half to 255.
    out = corrupt(np.full((128, 64, 3), 128, np.uint8), "impulse_noise", 2, 5)
    assert (out == 0).mean() == pytest.approx(0.03, abs=0.004)
    assert (out == 255).mean() == pytest.approx(0.03, abs=0.004)
    assert ((out == 0) | (out == 255) | (out == 128)).all()


def test_defocus_kernel_is_a_normalised_disk():
    # Radius 3 covers the 29 grid points with x² + y² ≤ 9; with a tiny antialiasing blur each weighs 1/29.
    from corruptions import disk_kernel

    kernel = disk_kernel(3, 1e-6)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.count_nonzero(kernel > 1e-6) == 29 and kernel.max() == pytest.approx(1 / 29, rel=1e-5)


def skimage_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 pixels through skimage's Gaussian (the reference's blur), clipped and truncated back to uint8."""
    import skimage.filters

    return np.uint8(np.clip(skimage.filters.gaussian(image / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)


def reference_glass_loop(x: np.ndarray, delta: int, offsets: list[np.ndarray]) -> np.ndarray:
    """ImageNet-C's glass-blur pixel loop as its code reads, on an H×W×3 array, with the offsets of each pass given
    (dx and dy of the k-th pixel visited at [0, k] and [1, k]) instead of drawn one pixel at a time."""
    h, w = x.shape[:2]
    for (dxs, dys) in offsets:
        k = 0
        for row in range(h - delta, delta, -1):
            for col in range(w - delta, delta, -1):
                row_prime, col_prime = row + dys[k], col + dxs[k]
                x[row, col], x[row_prime, col_prime] = x[row_prime, col_prime], x[row, col]
                k += 1
    return x


@pytest.mark.parametrize(("delta", "iterations"), [(1, 2), (2, 1), (4, 2)])
def test_glass_blur_moves_pixels_as_the_reference_loop_does(delta: int, iterations: int):
    from corruptions import local_shuffle_order

    h, w = 20, 12
    visited = (h - 2 * delta) * (w - 2 * delta)
    draws = np.random.default_rng(3)
    offsets = [draws.integers(-delta, delta, size=(2, visited)) for _ in range(iterations)]
    ids = np.arange(h * w)
    pixels = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=1).reshape(h, w, 3)
    expected = reference_glass_loop(pixels.copy(), delta, offsets).reshape(-1, 3)
    order = local_shuffle_order((h, w), delta, iterations, np.random.default_rng(3))
    np.testing.assert_array_equal(order, expected[:, 0] + 256 * expected[:, 1])
    # The reference's tuple assignment of views copies rather than swaps: some pixels are repeated, some lost.
    assert len(np.unique(order)) < h * w


def test_glass_blur_is_blur_scatter_blur():

    image = smooth_image(2, 48, 32)
    sigma, delta = 0.9, 2  # severity 2: one pass
    blurred = skimage_blur(image, sigma)
    visited = (48 - 2 * delta) * (32 - 2 * delta)
    offsets = [np.random.default_rng(9).integers(-delta, delta, size=(2, visited))]
    scattered = reference_glass_loop(blurred.copy(), delta, offsets)
    expected = skimage_blur(scattered, sigma)
    np.testing.assert_array_equal(corrupt(image, "glass_blur", 2, 9), expected)


def test_speckle_noise_is_multiplicative():
    # Severity 1: x + x·N(0, 0.15²); at grey 128 the spread is 0.15·128 = 19.2 grey levels, at 64 half that, plus
    # the 1/12 variance of truncation to uint8 (which lowers the mean by 0.5).
    for grey, spread in ((128, 19.2), (64, 9.6)):
        out = corrupt(np.full((128, 64, 3), grey, np.uint8), "speckle_noise", 1, 3).astype(float)
        assert out.std() == pytest.approx(math.sqrt(spread**2 + 1 / 12), rel=0.02)
        assert out.mean() == pytest.approx(grey - 0.5, abs=0.5)


def test_gaussian_blur_spreads_a_point_into_the_gaussian_kernel():
    # A white point blurred with σ = 1 (severity 1) or 2 (severity 2), the kernel cut at 4σ and normalised as
    # skimage's gaussian does: 255·g(dy)·g(dx), g(d) = exp(−d²/2σ²) / Σ_{|k| ≤ 4σ} exp(−k²/2σ²), truncated.
    image = np.zeros((33, 33, 3), np.uint8)
    image[16, 16] = 255
    for severity, sigma in ((1, 1), (2, 2)):
        reach = 4 * sigma
        g = np.exp(-np.arange(-reach, reach + 1) ** 2 / (2 * sigma**2))
        g /= g.sum()
        expected = np.zeros((33, 33))
        expected[16 - reach:17 + reach, 16 - reach:17 + reach] = 255 * np.outer(g, g)
        out = corrupt(image, "gaussian_blur", severity, 0)
        np.testing.assert_array_equal(out, np.repeat(np.floor(expected)[:, :, None], 3, axis=2))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_gaussian_blur_matches_skimage(severity: int):

    image = smooth_image(4)
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    expected = skimage_blur(image, sigma)
    np.testing.assert_array_equal(corrupt(image, "gaussian_blur", severity, 0), expected)


def test_defocus_blur_spreads_a_point_over_the_disk():
    # Severity 1: a disk of radius 3 (29 grid points, 1/29 each; its antialiasing blur of σ 0.1 leaves it as it
    # is), so a white point becomes 255/29 = 8.79 → 8 on the 29 pixels within distance 3, and 0 elsewhere.
    image = np.zeros((33, 33, 3), np.uint8)
    image[16, 16] = 255
    yy, xx = np.mgrid[-16:17, -16:17]
    expected = np.where(xx**2 + yy**2 <= 9, 8, 0)
    np.testing.assert_array_equal(corrupt(image, "defocus_blur", 1, 0), np.repeat(expected[:, :, None], 3, axis=2))


def direct_motion_sum(x: np.ndarray, radius: int, sigma: float, axis: int) -> np.ndarray:
    """Σ_i k_i · x shifted i pixels back along `axis` (edges repeated), k_i ∝ exp(−i²/2σ²) over i = 0..2·radius,
    the copies that would leave the image dropped, as the reference's loop breaks."""
    k = np.exp(-np.arange(2 * radius + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    size = x.shape[axis]
    index = np.arange(size)
    return sum(k[i] * np.take(x, np.minimum(index + i, size - 1), axis=axis) for i in range(min(2 * radius + 1, size)))


@pytest.mark.parametrize(("angle", "axis", "shape"), [(0.0, 1, (40, 24, 3)), (90.0, 0, (40, 24, 3)),
                                                      (0.0, 1, (12, 8, 3))])
def test_motion_blur_is_a_half_gaussian_sum_of_shifted_copies(angle: float, axis: int, shape: tuple[int, ...]):
    from corruptions import linear_motion_blur

    x = np.random.default_rng(1).integers(0, 256, size=shape).astype(np.float32)
    np.testing.assert_allclose(linear_motion_blur(x, 10, 3, angle), direct_motion_sum(x, 10, 3, axis), rtol=1e-5)


def test_motion_blur_draws_its_angle_from_the_seed():
    from corruptions import linear_motion_blur

    image = smooth_image(5)
    angle = np.random.default_rng(6).uniform(-45, 45)
    expected = np.clip(linear_motion_blur(image, 15, 5, angle), 0, 255).astype(np.uint8)  # severity 2
    np.testing.assert_array_equal(corrupt(image, "motion_blur", 2, 6), expected)


def reference_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """ImageNet-C's clipped zoom: the central ceil(size/factor) crop, scipy.ndimage.zoom(order=1) by the factor,
    then the centre cut back to the image's size."""
    from scipy.ndimage import zoom

    h, w = x.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = zoom(x[top:top + ch, left:left + cw], (factor, factor, 1), order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top:trim_top + h, trim_left:trim_left + w]


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_zoom_blur_averages_the_reference_zooms(severity: int):
    image = smooth_image(7)
    x = (image / 255.0).astype(np.float32)
    factors = np.arange(1, (1.11, 1.16, 1.21, 1.26, 1.31)[severity - 1], (0.01, 0.01, 0.02, 0.02, 0.03)[severity - 1])
    total = sum(reference_zoom(x, f) for f in factors)
    expected = np.uint8(np.clip((x + total) / (len(factors) + 1), 0, 1) * 255)
    np.testing.assert_array_equal(corrupt(image, "zoom_blur", severity, 0), expected)


def test_plasma_fractal_spans_zero_to_one_and_is_smooth():
    from corruptions import plasma_fractal

    heights = plasma_fractal(128, 2.0, np.random.default_rng(0))
    assert heights.shape == (128, 128) and heights.min() == 0.0 and heights.max() == 1.0
    # neighbours differ by far less than the range: a haze, not noise (uniform noise would differ by 1/3)
    assert np.abs(np.diff(heights, axis=0)).mean() < 0.05 and np.abs(np.diff(heights, axis=1)).mean() < 0.05


def test_fog_adds_the_haze_and_rescales_by_the_peak():
    # Severity 1 (strength 1.5, decay 2) on grey v: (v + 1.5·P)·v/(v + 1.5), P the fractal of side 128 cropped.
    from corruptions import plasma_fractal

    v = 128 / 255
    haze = plasma_fractal(128, 2.0, np.random.default_rng(5))[:128, :64]
    expected = np.floor(np.clip((v + 1.5 * haze) * v / (v + 1.5), 0, 1) * 255)
    out = corrupt(np.full((128, 64, 3), 128, np.uint8), "fog", 1, 5)
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))


def test_frost_blends_a_texture_of_the_reference_colour():
    from corruptions import FROST_MEAN, FROST_STD, frost_texture

    texture = frost_texture((128, 64), np.random.default_rng(8))
    np.testing.assert_allclose(texture.mean(axis=(0, 1)), FROST_MEAN, atol=1.0)
    np.testing.assert_allclose(texture.std(axis=(0, 1)), FROST_STD, atol=1.0)
    image = smooth_image(8)
    expected = np.clip(0.8 * image + 0.6 * texture, 0, 255).astype(np.uint8)  # severity 2: 0.8 image + 0.6 frost
    np.testing.assert_array_equal(corrupt(image, "frost", 2, 8), expected)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_snow_whitens_the_background(severity: int):
    # Where no flake falls, snow is keep·x + (1 − keep)·max(x, 1.5·grey + 0.5); on a uniform grey image grey = x.
    # Flakes only add, so the darkest pixels are that background: 0 → 25 at severity 1 (0.2 · 0.5 · 255 = 25.5).
    keep = (0.8, 0.7, 0.7, 0.65, 0.55)[severity - 1]
    for grey in (0, 60):
        x = grey / 255
        background = math.floor((keep * x + (1 - keep) * max(x, 1.5 * x + 0.5)) * 255)
        out = corrupt(np.full((128, 64, 3), grey, np.uint8), "snow", severity, 1)
        assert out.min() == background and (out == background).mean() > 0.1


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_water_spatter_adds_pale_turquoise(severity: int):
    # On black, water adds mask·(175, 238, 238)/255: green equals blue and red is 175/238 of it (±1 truncation).
    out = corrupt(np.zeros((128, 64, 3), np.uint8), "spatter", severity, 2).reshape(-1, 3).astype(int)
    wet = out[out.sum(1) > 0]
    assert len(wet) > 100
    assert (wet[:, 1] == wet[:, 2]).all()
    assert np.abs(wet[:, 0] - wet[:, 1] * 175 / 238).max() <= 1


@pytest.mark.parametrize("severity", [4, 5])
def test_mud_spatter_covers_with_mud_brown(severity: int):
    # Mud replaces the image by (63, 42, 20) with weight m ∈ [0.8, 1] (smaller weights are dropped), so on black
    # every pixel is 0 or m·(63, 42, 20), truncated.
    out = corrupt(np.zeros((128, 64, 3), np.uint8), "spatter", severity, 2).reshape(-1, 3).astype(int)
    muddy = out[out.sum(1) > 0]
    assert len(muddy) > 100
    weight = muddy / np.array([63, 42, 20])
    assert (weight >= 0.8 - 1 / 20).all() and (weight <= 1).all()


def test_rain_darkens_by_a_twentieth_per_severity():
    # 16×30 has fewer pixels than one drop needs at every severity (500 at the most), so rain is the box blur of a
    # uniform image and the darkening, 255·(0.05 + 0.05·s) off 128, truncated: 102.5, 89.75, 77, 64.25, 51.5.
    image = np.full((16, 30, 3), 128, np.uint8)
    for severity, expected in zip(range(1, 6), (102, 89, 77, 64, 51), strict=True):
        assert (corrupt(image, "rain", severity, 0) == expected).all()


def test_elastic_transform_samples_at_the_displaced_positions():
    # On a ramp bilinear sampling is exact: at column c + dx a horizontal ramp 3·c reads 3·(c + dx), a vertical
    # one 2·(r + dy). The displacements are the reference's: uniform draws in ±0.005·H smoothed by a Gaussian
    # of σ = 1% of each side (reflected, cut at 3σ), times α = 250·0.05 at severity 1; dx first, then dy.
    from scipy.ndimage import gaussian_filter

    h, w = 128, 64
    draws = np.random.default_rng(4)
    dx, dy = (gaussian_filter(draws.uniform(-0.005 * h, 0.005 * h, size=(h, w)), (0.01 * h, 0.01 * w),
                              mode="reflect", truncate=3) * 12.5 for _ in range(2))
    rows, cols = np.mgrid[0:h, 0:w]
    inner = (slice(12, h - 12), slice(12, w - 12))  # displacements stay under 8 px: no reflection at the edge
    ramps = {"horizontal": (3.0 * cols, 3.0 * (cols + dx)), "vertical": (2.0 * rows, 2.0 * (rows + dy))}
    for name, (ramp, expected) in ramps.items():
        image = np.repeat(ramp[:, :, None], 3, axis=2).astype(np.uint8)
        out = corrupt(image, "elastic_transform", 1, 4)[..., 0].astype(float)
        assert np.abs(out - expected)[inner].max() <= 1, name
    assert np.abs(dx).max() > 1  # the field moves pixels by more than the truncation


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_compression_is_a_pillow_round_trip_at_the_reference_quality(severity: int):
    import io

    image = smooth_image(6)

    def round_trip(quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("RGB"))

    quality = (25, 18, 15, 10, 7)[severity - 1]
    out = corrupt(image, "jpeg_compression", severity, 0)
    np.testing.assert_array_equal(out, round_trip(quality))
    assert not np.array_equal(out, round_trip(quality + 5))


# ---------------------------------------------------------------------------------------------------------
# The protocol on a hand-made case
# ---------------------------------------------------------------------------------------------------------

GREYS = {  # name → grey level of a uniform 64×32 image
    "bounding_box_train/0002_c1s1_000100_01.jpg": 40, "bounding_box_train/0002_c2s1_000200_01.jpg": 45,
    "bounding_box_train/0007_c1s1_000300_01.jpg": 200, "bounding_box_train/0007_c2s1_000400_01.jpg": 205,
    "bounding_box_train/0008_c1s1_000500_01.jpg": 20, "bounding_box_train/0008_c3s1_000600_01.jpg": 25,
    "query/0001_c3s1_005000_01.jpg": 100, "query/0003_c2s1_005100_01.jpg": 150, "query/0004_c2s1_005200_01.jpg": 60,
    "bounding_box_test/0001_c1s1_001000_01.jpg": 104, "bounding_box_test/0003_c1s1_002000_01.jpg": 146,
    "bounding_box_test/0004_c1s1_003000_01.jpg": 66, "bounding_box_test/0005_c1s1_004000_01.jpg": 125,
    "bounding_box_test/0006_c1s1_004100_01.jpg": 180,
}


class GreyAngle(torch.nn.Module):
    """A stand-in model: the image's mean red level v ∈ [0, 1] as the unit vector at angle v·π/2, so Euclidean
    distance between embeddings grows with the difference of the grey levels. It has the input size and the one
    (unused) parameter embed_images reads the device from."""

    img_size, embed_dim = (64, 32), 2

    def __init__(self):
        super().__init__()
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        red = (images[:, 0] * 0.229 + 0.485).mean(dim=(1, 2))  # undo ImageNet normalisation
        return torch.stack([torch.cos(red * math.pi / 2), torch.sin(red * math.pi / 2)], dim=1)


@pytest.fixture(scope="module")
def grey_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("grey")
    for name, grey in GREYS.items():
        (base / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 64), (grey, grey, grey)).save(base / "raw" / name)
    prepare.main(["--data", str(base / "raw"), "--out", str(base / "prepared"), "--val-ids", "0"])
    return base / "prepared"


def expected_map(q_greys: list[float], g_greys: list[float], q_pids: list[int], g_pids: list[int]) -> float:
    """mAP when each query has one true match, worked out directly: AP = 1 / rank of that match, where the rank
    counts gallery images strictly closer in grey level (ties go to the lower gallery index, as evaluate_rank)."""
    aps = []
    for q_grey, q_pid in zip(q_greys, q_pids, strict=True):
        true = g_pids.index(q_pid)
        gaps = [abs(q_grey - g) for g in g_greys]
        rank = 1 + sum(gap < gaps[true] or (gap == gaps[true] and i < true) for i, gap in enumerate(gaps) if i != true)
        aps.append(1 / rank)
    return float(np.mean(aps))


def test_corrupted_evaluation_of_a_hand_made_case(grey_prepared: Path):
    # Brightness at severities 1, 3 or 5 adds 25.5, 76.5 or 127.5 grey levels to a grey image (hue-free), truncated
    # to uint8 and capped at 255; the protocol draws one severity per image from (seed, side, index).
    query, gallery = load_eval_records(grey_prepared, "test")
    q_clean = [float(np.asarray(load_image(r.path))[..., 0].mean()) for r in query]
    g_clean = [float(np.asarray(load_image(r.path))[..., 0].mean()) for r in gallery]
    settings = CorruptionSettings(("brightness",), (1, 3, 5), seed=3)
    q_severity = [corruption_draw(settings, QUERY_SIDE, i)[1] for i in range(len(query))]
    g_severity = [corruption_draw(settings, GALLERY_SIDE, i)[1] for i in range(len(gallery))]
    q_bright = [min(255, math.floor(v + 25.5 * s)) for v, s in zip(q_clean, q_severity, strict=True)]
    g_bright = [min(255, math.floor(v + 25.5 * s)) for v, s in zip(g_clean, g_severity, strict=True)]
    q_pids, g_pids = [r.pid for r in query], [r.pid for r in gallery]

    model_settings = {"files": {}, "img_size": (64, 32)}
    runs = {}
    for label, corruption, batch in (("clean", None, 4), ("corrupted", settings, 4), ("one by one", settings, 1)):
        found = eval_inputs.split_features(GreyAngle(), model_settings, grey_prepared, "test", False, None, batch, 0,
                                        corruption)
        runs[label] = found
        distances = eval_inputs.ranking_distances(found, eval_inputs.RankingOptions())
        result = rank_split(distances, found, "test", grey_prepared)
        expected = expected_map(*((q_clean, g_clean) if corruption is None else (q_bright, g_bright)), q_pids, g_pids)
        assert result["mAP"] == pytest.approx(expected), label
    assert expected_map(q_clean, g_clean, q_pids, g_pids) == 1.0
    assert expected_map(q_bright, g_bright, q_pids, g_pids) < 1.0  # the case is one the corruption hurts
    np.testing.assert_array_equal(runs["corrupted"]["qf"], runs["one by one"]["qf"])  # batching changes nothing


# ---------------------------------------------------------------------------------------------------------
# eval.py and topk.py
# ---------------------------------------------------------------------------------------------------------


def test_eval_reports_corrupted_figures_beside_clean_ones_and_repeats_them(tiny_run: Path, tmp_path: Path):
    flags = ["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0", "--corrupt", "all",
             "--out", str(tmp_path)]
    first = evaluation.main(flags)
    second = evaluation.main([*flags, "--no-cache"])
    key = "all|s=all|seed=0"
    assert first["corrupted"][key] == second["corrupted"][key]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["corrupted"][key]["mAP"] == first["corrupted"][key]["mAP"]
    assert stored["mAP"] == evaluation.main(["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0",
                                             "--out", str(tmp_path / "clean")])["mAP"]
    assert (tmp_path / "features_test_c-all_s-all_seed-0.npz").is_file()
    other = evaluation.main([*flags, "--corrupt-seed", "1"])
    assert "all|s=all|seed=1" in other["corrupted"]


def test_corrupt_grid_writes_json_heat_map_and_table(tiny_run: Path, tmp_path: Path):
    evaluation.main(["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0", "--corrupt-grid",
                     "--corrupt", "fog,rain", "--severity", "1,5", "--out", str(tmp_path)])
    grid = json.loads((tmp_path / "robustness.json").read_text())["grid"]
    assert set(grid) == {"fog", "rain"} and all(set(row) == {"1", "5"} for row in grid.values())
    table = (tmp_path / "robustness.md").read_text()
    assert "| fog |" in table and "| rain |" in table and (tmp_path / "robustness.png").stat().st_size > 0
    # a cell is the evaluation with that corruption and severity alone
    single = evaluation.main(["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0",
                              "--corrupt", "fog", "--severity", "5", "--out", str(tmp_path / "single")])
    assert grid["fog"]["5"]["mAP"] == pytest.approx(single["corrupted"]["fog|s=5|seed=0"]["mAP"])


def test_the_grid_table_holds_each_cell_and_the_means():
    from robustness import grid_markdown

    grid = {"fog": {"1": {"mAP": 0.5}, "5": {"mAP": 0.1}}, "rain": {"1": {"mAP": 0.7}, "5": {"mAP": 0.3}}}
    lines = grid_markdown(grid, 0.8, "# t").splitlines()
    assert lines[2] == "Clean mAP 80.0%."
    assert lines[4:] == ["| corruption | s1 | s5 | mean |", "|---|---|---|---|", "| fog | 50.0 | 10.0 | 30.0 |",
                         "| rain | 70.0 | 30.0 | 50.0 |", "| **mean** | 60.0 | 20.0 | 40.0 |"]


def test_the_grid_takes_severity_with_or_without_corrupt():
    from robustness import grid_settings

    def chosen(flags: list[str]) -> CorruptionSettings:
        args = evaluation.parse_args(["--result-dir", "x", "--corrupt-grid", *flags])
        return grid_settings(args.corruption, args.severity, args.corrupt_seed)

    alone = chosen(["--severity", "3"])
    assert alone.names == CORRUPTIONS and alone.severities == (3,)
    named = chosen(["--corrupt", "fog"])
    assert named.names == ("fog",) and named.severities == (1, 2, 3, 4, 5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--corrupt", "fog,smog"], "--corrupt fog,smog: unknown smog; expected all or names from gaussian_noise"),
    (["--corrupt", "all", "--severity", "6"], "--severity 6: expected all, or severities from 1 to 5"),
    (["--corrupt", "all", "--severity", "x"], "--severity x: expected all, or severities from 1 to 5"),
])
def test_bad_corruption_flags_are_named(flags: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--result-dir", "runs/demo", *flags])
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_topk_shows_the_corrupted_images_the_model_ranked(tiny_run: Path, tmp_path: Path):
    import topk

    flags = ["--result-dir", str(tiny_run), "--workers", "0", "--queries", "random:1", "--k", "3"]
    clean = topk.main([*flags, "--out", str(tmp_path / "clean")])
    corrupted = topk.main([*flags, "--corrupt", "fog", "--severity", "5", "--out", str(tmp_path / "fog")])
    grid = clean["queries"][0]["grid"]
    assert corrupted["queries"][0]["grid"] == grid
    clean_pixels = np.asarray(Image.open(tmp_path / "clean" / grid))
    fog_pixels = np.asarray(Image.open(tmp_path / "fog" / grid))
    assert clean_pixels.shape == fog_pixels.shape and not np.array_equal(clean_pixels, fog_pixels)
    assert str(corrupted["flags"]["corruption"]) == "fog|s=5|seed=0"
