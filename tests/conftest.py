"""Shared fixtures: a hand-made Market-1501 tree and a tiny prepared synthetic set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)

# The short CPU schedule from random weights (configs/study.yaml): tests train for an epoch or two, offline.
SHORT_SCHEDULE = ["--config", str(ROOT / "configs" / "study.yaml")]

# The hand-made tree: ids 2, 7, 10 train; 1 and 3 test, 5 a query with no gallery image.
TRAIN_NAMES = [
    "0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0002_c3s1_000651_01.jpg",
    "0007_c1s1_000100_01.jpg", "0007_c2s1_000200_01.jpg",
    "0010_c1s1_000300_01.jpg", "0010_c4s2_000400_01.jpg", "0010_c4s2_000401_01.jpg",
]
GALLERY_NAMES = [
    "0001_c1s1_001000_01.jpg", "0001_c2s1_001100_01.jpg",
    "0003_c1s1_002000_01.jpg", "0003_c3s1_002100_01.jpg", "0003_c3s1_002200_01.jpg",
    "0003_c4s1_002300_01.jpg", "0003_c5s1_002400_01.jpg",
    "0000_c1s1_003000_01.jpg", "-1_c2s1_004000_01.jpg",
]
QUERY_NAMES = ["0001_c3s1_005000_01.jpg", "0003_c2s1_005100_01.jpg", "0005_c1s1_005200_01.jpg"]


def make_market_tree(root: Path, extra: dict[str, list[str]] | None = None) -> Path:
    """Tiny blank images with real Market names, a Thumbs.db in each folder; `extra` adds files by folder."""
    folders = {"bounding_box_train": TRAIN_NAMES, "bounding_box_test": GALLERY_NAMES, "query": QUERY_NAMES}
    for folder, names in folders.items():
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(names + (extra or {}).get(folder, [])):
            Image.new("RGB", (8, 16), (i * 20 % 256, 50, 90)).save(root / folder / name)
        (root / folder / "Thumbs.db").write_bytes(b"\0\1")
    return root


@pytest.fixture
def market_tree(tmp_path: Path) -> Path:
    """A fresh hand-made Market tree."""
    return make_market_tree(tmp_path / "market")


TINY_SYNTHETIC = ["--train-ids", "10", "--test-ids", "6", "--cameras", "3", "--images-per-camera", "3", "--height",
                  "64", "--width", "32", "--distractors", "6", "--junk", "3", "--val-ids", "2", "--quiet"]


@pytest.fixture(scope="session")
def synthetic_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic Market-format set (10 train ids, 6 test ids, 64×32 images), prepared with 2 val ids."""
    import prepare

    base = tmp_path_factory.mktemp("synthetic")
    prepare.main(["--synthetic", str(base / "raw"), "--out", str(base / "prepared"), *TINY_SYNTHETIC])
    return base / "prepared"


@pytest.fixture(scope="session")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set big enough for validation mAP to mean something: 16 training and 8 validation ids."""
    import prepare

    base = tmp_path_factory.mktemp("learnable")
    prepare.main(["--synthetic", str(base / "raw"), "--out", str(base / "prepared"), "--train-ids", "24",
                  "--test-ids", "4", "--cameras", "3", "--images-per-camera", "3", "--height", "64", "--width", "32",
                  "--distractors", "4", "--junk", "2", "--val-ids", "8", "--seed", "1", "--quiet"])
    return base / "prepared"


@pytest.fixture(scope="session")
def other_domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny synthetic set drawn with seed 1: other people, cameras and backgrounds (data set
    'synthetic-seed1'), for cross-domain evaluation."""
    import prepare

    base = tmp_path_factory.mktemp("synthetic_seed1")
    prepare.main(["--synthetic", str(base / "raw"), "--out", str(base / "prepared"), "--seed", "1", *TINY_SYNTHETIC])
    return base / "prepared"


@pytest.fixture(scope="session")
def tiny_run(synthetic_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 + vae trained for one epoch on the tiny synthetic set: a result directory for eval.py and topk.py."""
    import train

    result = tmp_path_factory.mktemp("eval_runs") / "run"
    train.main([*SHORT_SCHEDULE, "--data", str(synthetic_prepared), "--result-dir", str(result), "--epochs", "1",
                "--backbone-name", "resnet18", "--ae-name", "vae", "--latent-dim", "32", "--img-size", "64", "32",
                "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--quiet"])
    return result
