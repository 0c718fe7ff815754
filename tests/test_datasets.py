"""The Market-1501 data layer: parsing, errors, the P×K sampler and transforms."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import layouts
from conftest import make_market_tree
from datasets import PKSampler, build_transforms
from layouts import ImageRecord, find_dataset, load_market, parse_market_name
from utils import UserError


def test_market_names_parse_to_pid_and_camera():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_012345_00.jpg") == (-1, 3)
    assert parse_market_name("0000_c6s4_002227_02.jpg") == (0, 6)
    assert parse_market_name("Thumbs.db") is None
    assert parse_market_name("002_c1s1_000451_03.jpg") is None
    assert parse_market_name("0002_c1s1_000451_03.png") is None


def test_counts_relabelling_and_ignored_files(market_tree: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="reid"):
        parts = load_market(market_tree)
    assert [len(parts[p]) for p in ("train", "gallery", "query")] == [8, 9, 3]
    assert [(r.pid, r.label) for r in parts["train"]] == [(2, 0)] * 3 + [(7, 1)] * 2 + [(10, 2)] * 3
    assert Counter(r.pid for r in parts["gallery"]) == {1: 2, 3: 5, 0: 1, -1: 1}
    assert all(r.label == -1 for r in parts["gallery"] + parts["query"])
    assert caplog.text.count("ignored 1 files that are not .jpg images") == 3
    assert "1 query identities have no gallery image" in caplog.text


def test_junk_and_distractors_leave_training(tmp_path: Path):
    extra = {"bounding_box_train": ["-1_c1s1_000001_01.jpg", "0000_c2s1_000002_01.jpg"]}
    root = make_market_tree(tmp_path / "m", extra)
    train = load_market(root)["train"]
    assert sorted({r.pid for r in train}) == [2, 7, 10]
    assert sorted({r.label for r in train}) == [0, 1, 2]


def test_root_may_be_the_download_folder_holding_market_child(tmp_path: Path):
    child = make_market_tree(tmp_path / "download" / layouts.MARKET_CHILD)
    assert find_dataset(tmp_path / "download").root == child
    assert find_dataset(tmp_path / "download", "market1501").root == child


def test_missing_folder_is_named_with_what_was_found(market_tree: Path):
    (market_tree / "query").rename(market_tree / "queries")
    with pytest.raises(UserError, match=r"no known data set layout here .*found \['bounding_box_test', "
                       r"'bounding_box_train', 'queries'\]"):
        find_dataset(market_tree)
    with pytest.raises(UserError, match=r"--format market1501: .*market: missing query/ \(expected Market-1501"):
        find_dataset(market_tree, "market1501")


def test_missing_dataset_folder(tmp_path: Path):
    with pytest.raises(UserError, match="nowhere: dataset folder not found"):
        find_dataset(tmp_path / "nowhere")


def test_folder_without_images_is_an_error(market_tree: Path):
    for path in (market_tree / "query").glob("*.jpg"):
        path.unlink()
    with pytest.raises(UserError, match=r"query: no images found"):
        load_market(market_tree)


def test_bad_names_are_listed(tmp_path: Path):
    root = make_market_tree(tmp_path / "m", {"bounding_box_test": ["img_001.jpg", "12_c1s1_000001_01.jpg"]})
    with pytest.raises(UserError, match=r"bounding_box_test: 2 image names do not follow .*'12_c1s1_000001_01.jpg', "
                       r"'img_001.jpg'"):
        load_market(root)


def test_files_that_are_not_jpg_are_ignored_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = make_market_tree(tmp_path / "m", {"query": ["preview.png", "0001_c2s1_000001_00.bmp"]})
    with caplog.at_level(logging.INFO, logger="reid"):
        parts = load_market(root)
    assert len(parts["query"]) == 3
    assert "query: ignored 3 files that are not .jpg images" in caplog.text


def test_pk_batches_hold_p_distinct_identities_of_k_images():
    labels = [0] * 6 + [1] * 5 + [2] * 1 + [3] * 4 + [4] * 4
    sampler = PKSampler(labels, p=3, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # ceil(20 / 12)
    for batch in batches:
        assert len(batch) == 12
        batch_labels = [labels[i] for i, _ in batch]
        assert sorted(Counter(batch_labels).values()) == [4, 4, 4]
    # Identity 2 has a single image: when drawn, that image is repeated K times, each with its own seed.
    assert all([i for i, _ in batch].count(11) in (0, 4) for batch in batches)
    assert all(len({seed for _, seed in batch}) == 12 for batch in batches)


def test_pk_sampler_resumes_mid_epoch_with_the_same_batches():
    labels = np.repeat(np.arange(10), 4).tolist()
    sampler = PKSampler(labels, p=2, k=2, seed=5)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert len(sampler) == len(whole) - 3 and list(sampler) == whole[3:]


def test_pk_sampler_is_reproducible_per_epoch():
    labels = np.repeat(np.arange(10), 4).tolist()
    sampler = PKSampler(labels, p=4, k=2, seed=5)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(4)
    other = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and other != first


def test_pk_sampler_ranks_split_the_single_process_batch():
    labels = np.repeat(np.arange(12), 5).tolist()
    whole = list(PKSampler(labels, p=4, k=3, seed=2))
    rank0 = list(PKSampler(labels, p=4, k=3, seed=2, rank=0, world_size=2))
    rank1 = list(PKSampler(labels, p=4, k=3, seed=2, rank=1, world_size=2))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == whole


def test_pk_sampler_rejects_more_identities_than_exist():
    with pytest.raises(UserError, match="--batch-p 5: the training set has only 2 identities"):
        PKSampler([0, 0, 1, 1], p=5, k=2)


def test_transforms_give_normalised_tensors_of_the_asked_size():
    img = Image.new("RGB", (16, 32), (124, 116, 104))  # about the ImageNet mean
    torch.manual_seed(0)
    train = build_transforms((64, 32), train=True, erasing=0.0)(img)
    test = build_transforms((64, 32), train=False)(img)
    assert train.shape == test.shape == (3, 64, 32)
    assert test.abs().max() < 0.05


def test_dataset_yields_label_for_training_and_pid_for_evaluation(tmp_path: Path):
    Image.new("RGB", (16, 32)).save(tmp_path / "0042_c2s1_000001_01.jpg")
    record = ImageRecord(str(tmp_path / "0042_c2s1_000001_01.jpg"), 42, 2, 7)
    transform = build_transforms((32, 16), train=False)
    assert datasets.ReIDDataset([record], transform)[0][1:] == (7, 2, 0)
    assert datasets.ReIDDataset([record], transform, use_label=False)[0][1:] == (42, 2, 0)


def test_seeded_items_repeat_their_augmentation(tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(tmp_path / "0042_c2s1_000001_01.jpg")
    dataset = datasets.ReIDDataset([ImageRecord(str(tmp_path / "0042_c2s1_000001_01.jpg"), 42, 2, 0)],
                                   build_transforms((32, 16), train=True))
    first, again, other = dataset[(0, 7)][0], dataset[(0, 7)][0], dataset[(0, 8)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)
