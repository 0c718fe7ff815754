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
import features
import prepare
from corruptions import CORRUPTIONS, corrupt
from datasets import GALLERY_SIDE, QUERY_SIDE, CorruptionSettings, corruption_draw, load_eval_records, load_image
from utils import UserError

# Corruptions whose reference parameters are not ordered by distance to the clean image at every step: saturate's
# first two severities desaturate and the rest oversaturate; snow's severity 3 has fewer, larger flakes than 2;
# frost's later severities keep less image but add about as much texture. Their worst severity is still the farthest.
NOT_MONOTONE = {"saturate", "snow", "frost"}


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


def test_glass_blur_swaps_only_pixels_within_its_reach():
    from corruptions import local_shuffle_order

    order = local_shuffle_order((20, 12), delta=2, iterations=1, rng=np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(240))  # a permutation: pixels are moved, never lost or copied
    rows, cols = np.divmod(np.arange(240), 12)
    assert not np.array_equal(order, np.arange(240))
    # the swaps start at row and column delta + 1 and reach at most delta up or left: the first row and column stay
    assert (order[rows == 0] == np.arange(12)).all() and (order[cols == 0] == np.arange(0, 240, 12)).all()


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
    args = evaluation.parse_args(["--all-dir", "x", "--workers", "0"])
    runs = {}
    for label, corruption, batch in (("clean", None, 4), ("corrupted", settings, 4), ("one by one", settings, 1)):
        found = features.split_features(GreyAngle(), model_settings, grey_prepared, "test", False,
                                        torch.device("cpu"), None, batch, 0, corruption)
        runs[label] = found
        result = features.rank_split(features.ranking_distances(found, args), found, "test", grey_prepared)
        expected = expected_map(*((q_clean, g_clean) if corruption is None else (q_bright, g_bright)), q_pids, g_pids)
        assert result["mAP"] == pytest.approx(expected), label
    assert expected_map(q_clean, g_clean, q_pids, g_pids) == 1.0
    assert expected_map(q_bright, g_bright, q_pids, g_pids) < 1.0  # the case is one the corruption hurts
    np.testing.assert_array_equal(runs["corrupted"]["qf"], runs["one by one"]["qf"])  # batching changes nothing


# ---------------------------------------------------------------------------------------------------------
# eval.py and topk.py
# ---------------------------------------------------------------------------------------------------------


def test_eval_reports_corrupted_figures_beside_clean_ones_and_repeats_them(tiny_run: Path, tmp_path: Path):
    flags = ["--all-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0", "--corrupt", "all",
             "--out", str(tmp_path)]
    first = evaluation.main(flags)
    second = evaluation.main([*flags, "--no-cache"])
    key = "all|s=all|seed=0"
    assert first["corrupted"][key] == second["corrupted"][key]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["corrupted"][key]["mAP"] == first["corrupted"][key]["mAP"]
    assert stored["mAP"] == evaluation.main(["--all-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0",
                                             "--out", str(tmp_path / "clean")])["mAP"]
    assert (tmp_path / "features_test_c-all_s-all_seed-0.npz").is_file()
    other = evaluation.main([*flags, "--corrupt-seed", "1"])
    assert "all|s=all|seed=1" in other["corrupted"]


def test_corrupt_grid_writes_json_heat_map_and_table(tiny_run: Path, tmp_path: Path):
    evaluation.main(["--all-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0", "--corrupt-grid",
                     "--corrupt", "fog,rain", "--severity", "1,5", "--out", str(tmp_path)])
    grid = json.loads((tmp_path / "robustness.json").read_text())["grid"]
    assert set(grid) == {"fog", "rain"} and all(set(row) == {"1", "5"} for row in grid.values())
    table = (tmp_path / "robustness.md").read_text()
    assert "| fog |" in table and "| rain |" in table and (tmp_path / "robustness.png").stat().st_size > 0


def test_the_grid_takes_severity_with_or_without_corrupt():
    from robustness import grid_settings

    alone = grid_settings(evaluation.parse_args(["--all-dir", "x", "--corrupt-grid", "--severity", "3"]))
    assert alone.names == CORRUPTIONS and alone.severities == (3,)
    named = grid_settings(evaluation.parse_args(["--all-dir", "x", "--corrupt-grid", "--corrupt", "fog"]))
    assert named.names == ("fog",) and named.severities == (1, 2, 3, 4, 5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--corrupt", "fog,smog"], "--corrupt fog,smog: unknown smog; expected all or names from gaussian_noise"),
    (["--corrupt", "all", "--severity", "6"], "--severity 6: expected all, or severities from 1 to 5"),
    (["--corrupt", "all", "--severity", "x"], "--severity x: expected all, or severities from 1 to 5"),
])
def test_bad_corruption_flags_are_named(flags: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--all-dir", "runs/demo", *flags])
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_topk_shows_the_corrupted_images_the_model_ranked(tiny_run: Path, tmp_path: Path):
    import topk

    flags = ["--all-dir", str(tiny_run), "--workers", "0", "--queries", "random:1", "--k", "3"]
    clean = topk.main([*flags, "--out", str(tmp_path / "clean")])
    corrupted = topk.main([*flags, "--corrupt", "fog", "--severity", "5", "--out", str(tmp_path / "fog")])
    grid = clean["queries"][0]["grid"]
    assert corrupted["queries"][0]["grid"] == grid
    clean_pixels = np.asarray(Image.open(tmp_path / "clean" / grid))
    fog_pixels = np.asarray(Image.open(tmp_path / "fog" / grid))
    assert clean_pixels.shape == fog_pixels.shape and not np.array_equal(clean_pixels, fog_pixels)
    assert str(corrupted["flags"]["corruption"]) == "fog|s=5|seed=0"
