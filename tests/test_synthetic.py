"""The synthetic Market-format set: naming, determinism, preset counts, families, looks, the default's bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layouts import load_market
from synthetic import (
    HARD_LOOK,
    PALETTE,
    PALETTE_B,
    SyntheticConfig,
    camera_conditions,
    draw_person,
    identity_traits,
    plan_counts,
    preset_config,
    spread,
    synthetic_plan,
    write_synthetic,
)
from utils import UserError

SMALL = SyntheticConfig(train_ids=4, test_ids=3, cameras=3, images_per_camera=2, height=32, width=16,
                        distractors=5, junk=2, seed=3)
# SHA-256 over (relative path, bytes) of every image of HASHED, computed with the generator as it stood in
# datasets.py before the presets (commit 8240c64) with Pillow 11's JPEG encoder: the default preset must not move.
HASHED = SyntheticConfig(train_ids=6, test_ids=4, cameras=4, images_per_camera=2, height=64, width=32,
                         distractors=5, junk=3, seed=7)
HASHED_SHA256 = "6f1448cfb9e0c917430d0730a0d1152f89e29e44b751803aa8c76cae70716956"


def tree_sha256(root: Path) -> str:
    """One hash over every .jpg under `root`: its relative path and its bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_synthetic_set_follows_market_naming_and_counts(tmp_path: Path):
    counts = write_synthetic(tmp_path, SMALL, progress=False)
    parts = load_market(tmp_path)
    assert counts == {"train": len(parts["train"]), "gallery": len(parts["gallery"]), "query": len(parts["query"])}
    assert counts == plan_counts(SMALL, synthetic_plan(SMALL))
    train_pids = {r.pid for r in parts["train"]}
    test_pids = {r.pid for r in parts["query"]}
    assert len(train_pids) == 4 and len(test_pids) == 3 and not train_pids & test_pids
    gallery_pids = Counter(r.pid for r in parts["gallery"])
    assert gallery_pids[0] == 5 and gallery_pids[-1] == 2
    # Every test identity has one query per camera it appears in and two gallery images per such camera.
    for pid in test_pids:
        query_cams = sorted(r.camid for r in parts["query"] if r.pid == pid)
        gallery_cams = Counter(r.camid for r in parts["gallery"] if r.pid == pid)
        assert len(query_cams) >= 2 and gallery_cams == {c: 2 for c in query_cams}
    with Image.open(parts["train"][0].path) as img:
        assert img.size == (16, 32)


def test_synthetic_set_is_deterministic_for_a_seed(tmp_path: Path):
    write_synthetic(tmp_path / "a", SMALL, progress=False)
    write_synthetic(tmp_path / "b", SMALL, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)


def test_default_preset_writes_the_same_images_as_before_presets(tmp_path: Path):
    write_synthetic(tmp_path, HASHED, progress=False)
    assert tree_sha256(tmp_path) == HASHED_SHA256


def test_worker_processes_write_the_same_images_as_one(tmp_path: Path):
    counts = write_synthetic(tmp_path, HASHED, progress=False, workers=3)
    assert tree_sha256(tmp_path) == HASHED_SHA256
    assert counts == plan_counts(HASHED, synthetic_plan(HASHED))


def test_market_preset_plans_market_1501s_counts():
    config = preset_config("market")
    people = synthetic_plan(config)
    assert Counter(p.part for p in people) == {"train": 751, "test": 750}
    assert len({p.pid for p in people}) == 1501
    # bounding_box_test: 13,120 identity images + 2,793 distractors + 3,819 junk = 19,732 (15,913 without junk).
    assert plan_counts(config, people) == {"train": 12936, "gallery": 19732, "query": 3368}
    assert plan_counts(config, people)["gallery"] - config.junk == 15913
    for person in people:
        cams = Counter(cam for cam, _ in person.shots)
        assert 2 <= len(cams) <= 6
        if person.part == "test":  # one query a camera, and a gallery image beside it
            queries = Counter(cam for cam, folder in person.shots if folder == "query")
            assert queries == {cam: 1 for cam in cams} and all(n >= 2 for n in cams.values())


@pytest.mark.parametrize(("preset", "per_camera"), [("default", (4, 5)), ("hard", (4, 5)), ("domain-b", (4, 5))])
def test_drawn_presets_give_their_images_per_camera(preset: str, per_camera: tuple[int, int]):
    config = preset_config(preset)
    people = synthetic_plan(config)
    assert Counter(p.part for p in people) == {"train": 100, "test": 100}
    for person in people:
        cams = Counter(cam for cam, _ in person.shots)
        assert set(cams.values()) == {per_camera[person.part == "test"]} and 2 <= len(cams) <= 6


def test_domain_b_keeps_the_default_names_and_counts():
    default, domain_b = synthetic_plan(preset_config("default")), synthetic_plan(preset_config("domain-b"))
    assert [(p.pid, p.shots) for p in default] == [(p.pid, p.shots) for p in domain_b]


def test_preset_sizes_can_be_overridden():
    config = preset_config("hard", train_ids=5, seed=2)
    assert (config.preset, config.train_ids, config.test_ids, config.images_per_camera, config.seed) == (
        "hard", 5, 100, 4, 2)
    with pytest.raises(UserError, match="--preset easy: expected one of default, hard, market, domain-b"):
        preset_config("easy")


def trait_differences(a: dict, b: dict) -> int:
    """How many traits two people do not share (colours compared exactly, a missing accessory as None)."""
    def same(x: object, y: object) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return bool(np.all(np.asarray(x) == np.asarray(y)))
    return sum(not same(a[key], b[key]) for key in a)


def test_hard_families_differ_in_two_or_three_traits_each():
    people = synthetic_plan(preset_config("hard", train_ids=24, test_ids=24))
    families: dict[tuple[str, int], list[dict]] = {}
    for person in people:
        families.setdefault((person.part, person.family), []).append(person.traits)
    assert sorted(len(f) for f in families.values()) == [2] * 24
    within = [trait_differences(a, b) for f in families.values() for a, b in itertools.combinations(f, 2)]
    # Each member changes two or three traits of the family's outfit, and siblings differ in at least two.
    assert min(within) >= 2 and max(within) <= 6
    across = [trait_differences(a.traits, b.traits) for a, b in itertools.combinations(people, 2)
              if (a.part, a.family) != (b.part, b.family)]
    assert np.mean(across) > 2 * np.mean(within) and min(across) > 2
    assert all(len({t["width"] for t in f}) == 1 for f in families.values())  # one build a family


def colour_pixels(img: Image.Image, rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly this colour."""
    return int(np.all(np.asarray(img) == rgb, axis=2).sum())


@pytest.mark.parametrize(("view", "backpack", "jacket"), [(0, False, True), (1, True, False)])
def test_hard_backpacks_show_from_behind_and_jackets_from_the_front(view: int, backpack: bool, jacket: bool):
    rng = np.random.default_rng(0)
    traits = {**identity_traits(rng, HARD_LOOK), "backpack": np.array([1, 254, 3.0]),
              "jacket": np.array([7, 9, 250.0]), "bag": None}
    camera = {**camera_conditions(rng, HARD_LOOK), "views": np.eye(3)[view]}
    look = dataclasses.replace(HARD_LOOK, occluders=0, crop_zoom=(1.0, 1.0))
    img = draw_person(traits, camera, (128, 64), rng, look)
    assert (colour_pixels(img, (0, 228, 2)) > 20) == backpack  # drawn at 0.9 of its colour
    assert (colour_pixels(img, (7, 9, 250)) > 20) == jacket


def mean_rgb(root: Path) -> np.ndarray:
    """The mean colour of every image under `root`."""
    return np.mean([np.asarray(Image.open(p), dtype=np.float64).mean(axis=(0, 1)) for p in root.rglob("*.jpg")], 0)


def test_domain_b_is_darker_and_bluer_than_the_default(tmp_path: Path):
    sizes = {"train_ids": 6, "test_ids": 6, "height": 64, "width": 32, "distractors": 0, "junk": 0}
    write_synthetic(tmp_path / "a", preset_config("default", **sizes), progress=False)
    write_synthetic(tmp_path / "b", preset_config("domain-b", **sizes), progress=False)
    (ra, ga, ba), (rb, gb, bb) = mean_rgb(tmp_path / "a"), mean_rgb(tmp_path / "b")
    assert (rb + gb + bb) / 3 < (ra + ga + ba) / 3 - 15
    assert (bb - rb) > (ba - ra) + 15
    assert not {tuple(c) for c in PALETTE} & {tuple(c) for c in PALETTE_B}


def test_spread_keeps_totals_and_bounds():
    counts = spread(17, 5, np.random.default_rng(1), 2, 4, "queries")
    assert counts.sum() == 17 and counts.min() >= 2 and counts.max() <= 4
    with pytest.raises(UserError, match="21 queries cannot be spread over 5 slots, 2 to 4 each"):
        spread(21, 5, np.random.default_rng(1), 2, 4, "queries")
