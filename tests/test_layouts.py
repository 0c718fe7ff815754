"""The published layouts beside Market-1501: DukeMTMC-reID, MSMT17 V1/V2 and CUHK03-NP, from hand-made trees."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import prepare
from datasets import load_eval_records, load_train_records
from layouts import (
    CUHK03_NAME,
    DUKE_NAME,
    MSMT_NAME,
    PUBLISHED,
    count_differences,
    find_dataset,
    looks_complete,
    parse_name,
)
from utils import UserError


def write_images(folder: Path, names: list[str]) -> None:
    """Tiny images under `folder` (names may hold a sub-folder), each a different colour."""
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (i * 30 % 256, 40, 120)).save(folder / name)


# DukeMTMC-reID: ids 1 and 5 train; 11 and 12 test; 99 a gallery-only distractor identity.
DUKE = {
    "bounding_box_train": ["0001_c1_f0000001.jpg", "0001_c2_f0000002.jpg", "0005_c8_f0001000.jpg",
                           "0005_c3_f0001001.jpg", "0005_c3_f0001002.jpg"],
    "query": ["0011_c1_f0002000.jpg", "0012_c7_f0002001.jpg"],
    "bounding_box_test": ["0011_c2_f0003000.jpg", "0011_c5_f0003001.jpg", "0012_c8_f0003002.jpg",
                          "0099_c4_f0003003.jpg"],
}


def make_duke(root: Path) -> Path:
    for folder, names in DUKE.items():
        write_images(root / folder, names)
        (root / folder / "Thumbs.db").write_bytes(b"\0")
    return root


# MSMT17: list ids 0, 1 train and 2 validation (all three train), 0 and 1 test; ids are stored plus one.
MSMT_TRAIN = {"list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                 ("0000/0000_001_02_0303morning_0020_1.jpg", 0),
                                 ("0001/0001_000_05_0303noon_0100_0.jpg", 1),
                                 ("0001/0001_001_05_0303noon_0101_0.jpg", 1)],
              "list_val.txt": [("0002/0002_000_15_0304afternoon_0001_0.jpg", 2),
                               ("0002/0002_001_03_0304afternoon_0002_0.jpg", 2)]}
MSMT_TEST = {"list_query.txt": [("0000/0000_000_04_0113morning_0001_0.jpg", 0)],
             "list_gallery.txt": [("0000/0000_001_07_0113morning_0002_0.jpg", 0),
                                  ("0000/0000_002_04_0113morning_0003_0.jpg", 0),
                                  ("0001/0001_000_10_0113noon_0004_0.jpg", 1)]}
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def make_msmt(parent: Path, version: str) -> Path:
    root = parent / version
    train, test = MSMT_VERSIONS[version]
    for folder, lists in ((train, MSMT_TRAIN), (test, MSMT_TEST)):
        for list_name, rows in lists.items():
            write_images(root / folder, [path for path, _ in rows])
            (root / list_name).write_text("".join(f"{path} {pid}\n" for path, pid in rows))
    write_images(root / train, ["0003/0003_000_01_0305morning_0001_0.jpg"])  # on disk, in no list: not used
    return root


# CUHK03-NP: the two subsets differ (labeled has one more training image of id 3).
CUHK = {
    "detected": {"bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0003_c1_2.png", "0003_c2_7.png"],
                 "query": ["0010_c1_1.png", "0011_c2_7.png"],
                 "bounding_box_test": ["0010_c2_6.png", "0010_c2_8.png", "0011_c1_2.png"]},
    "labeled": {"bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0003_c1_2.png", "0003_c2_7.png",
                                       "0003_c2_8.png"],
                "query": ["0010_c1_1.png", "0011_c2_7.png"],
                "bounding_box_test": ["0010_c2_6.png", "0010_c2_8.png", "0011_c1_2.png"]},
}


def make_cuhk(parent: Path) -> Path:
    root = parent / "cuhk03-np"
    for subset, folders in CUHK.items():
        for folder, names in folders.items():
            write_images(root / subset / folder, names)
    return root


def prepared_splits(raw: Path, out: Path, *flags: str) -> dict:
    """Prepare `raw` and return (identities, images, cameras) of train, query and gallery, and prepare.json."""
    prepare.main(["--data", str(raw), "--out", str(out), "--val-ids", "0", "--quiet", *flags])
    train, _ = load_train_records(out)
    query, gallery = load_eval_records(out, "test")
    counts = {name: (Counter(r.pid for r in records), {r.camid for r in records})
              for name, records in (("train", train), ("query", query), ("gallery", gallery))}
    return {**counts, "prepare": json.loads((out / "prepare.json").read_text())}


def test_each_scheme_gives_person_and_camera():
    assert parse_name("0005_c8_f0001000.jpg", DUKE_NAME) == (5, 8)
    assert parse_name("0000_001_02_0303morning_0020_1.jpg", MSMT_NAME) == (0, 2)
    assert parse_name("0002_000_15_0304afternoon_0001_0.jpg", MSMT_NAME) == (2, 15)
    assert parse_name("0011_c2_7.png", CUHK03_NAME) == (11, 2)
    assert parse_name("0002_c1s1_000451_03.jpg", DUKE_NAME) is None
    assert parse_name("0011_c2_7.jpg", CUHK03_NAME) is None


@pytest.mark.parametrize("where", ["parent", "folder"])
def test_dukemtmc_splits_from_the_folder_or_its_parent(tmp_path: Path, where: str):
    make_duke(tmp_path / "download" / "DukeMTMC-reID")
    raw = tmp_path / "download" if where == "parent" else tmp_path / "download" / "DukeMTMC-reID"
    found = prepared_splits(raw, tmp_path / "out")
    assert found["train"] == (Counter({1: 2, 5: 3}), {1, 2, 3, 8})
    assert found["query"] == (Counter({11: 1, 12: 1}), {1, 7})
    assert found["gallery"] == (Counter({11: 2, 12: 1, 99: 1}), {2, 4, 5, 8})
    assert (found["prepare"]["name"], found["prepare"]["format"]) == ("dukemtmc", "dukemtmc")
    assert found["prepare"]["found"] == {"train": [2, 5, 4], "query": [2, 2, 2], "gallery": [3, 4, 4]}
    published = found["prepare"]["published"]  # a sample, not a download: the counts are not compared
    assert not published["looks_complete"] and published["differences"] == []
    assert published["published"]["train"] == [702, 16522, 8]


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_identities_come_from_the_lists_and_cameras_from_the_names(tmp_path: Path, version: str):
    make_msmt(tmp_path / "raw", version)
    found = prepared_splits(tmp_path / "raw", tmp_path / "out")
    # list_train + list_val: ids 0, 1, 2 stored as 1, 2, 3; the unlisted id 3 image is not read.
    assert found["train"] == (Counter({1: 2, 2: 2, 3: 2}), {1, 2, 3, 5, 15})
    assert found["query"] == (Counter({1: 1}), {4})
    assert found["gallery"] == (Counter({1: 2, 2: 1}), {4, 7, 10})
    assert found["prepare"]["name"] == version.lower().replace("_", "-")
    assert found["prepare"]["format"] == "msmt17"


@pytest.mark.parametrize(("flags", "train_images"), [([], {1: 2, 3: 2}), (["--subset", "labeled"], {1: 2, 3: 3})])
def test_cuhk03_np_subsets(tmp_path: Path, flags: list[str], train_images: dict[int, int]):
    make_cuhk(tmp_path / "raw")
    found = prepared_splits(tmp_path / "raw", tmp_path / "out", *flags)
    assert found["train"] == (Counter(train_images), {1, 2})
    assert found["query"] == (Counter({10: 1, 11: 1}), {1, 2})
    assert found["gallery"] == (Counter({10: 2, 11: 1}), {1, 2})
    assert found["prepare"]["name"] == f"cuhk03-np-{'labeled' if flags else 'detected'}"
    assert sorted(p.suffix for p in (tmp_path / "out" / "query").iterdir()) == [".png", ".png"]


def test_auto_tells_dukemtmc_from_market_by_the_names(tmp_path: Path, market_tree: Path):
    assert find_dataset(market_tree).format == "market1501"
    assert find_dataset(make_duke(tmp_path / "duke_here")).format == "dukemtmc"


@pytest.mark.parametrize(("fmt", "make", "missing"), [
    ("dukemtmc", lambda p: p.mkdir(), "missing bounding_box_train/, query/, bounding_box_test/"),
    ("msmt17", lambda p: make_duke(p), "missing train/, test/, list_train.txt, list_val.txt, list_query.txt, "
                                       "list_gallery.txt"),
    ("cuhk03-np", lambda p: make_duke(p), "missing detected/bounding_box_train/, detected/query/, "
                                          "detected/bounding_box_test/"),
    ("market1501", lambda p: make_cuhk(p), "missing bounding_box_train/, query/, bounding_box_test/"),
])
def test_format_errors_name_what_is_missing(tmp_path: Path, fmt: str, make, missing: str):
    make(tmp_path / "raw")
    with pytest.raises(UserError, match=rf"--format {fmt}: \S*/raw: {missing} \(expected "):
        prepare.main(["--data", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--format", fmt])


def test_a_missing_list_file_or_subset_is_named(tmp_path: Path):
    (make_msmt(tmp_path / "raw", "MSMT17_V2") / "list_val.txt").unlink()
    with pytest.raises(UserError, match=r"MSMT17_V2: missing list_val.txt \(expected MSMT17_V1"):
        find_dataset(tmp_path / "raw", "msmt17")
    with pytest.raises(UserError, match=r"MSMT17_V2: this MSMT17 folder lacks list_val.txt"):
        find_dataset(tmp_path / "raw")
    cuhk = make_cuhk(tmp_path / "c")
    (cuhk / "labeled" / "query").rename(cuhk / "labeled" / "queries")
    with pytest.raises(UserError, match=r"cuhk03-np: missing labeled/query/"):
        find_dataset(tmp_path / "c", "cuhk03-np", "labeled")


def test_a_malformed_msmt17_list_line_is_named(tmp_path: Path):
    root = make_msmt(tmp_path / "raw", "MSMT17_V1")
    (root / "list_query.txt").write_text("0000/0000_000_04_0113morning_0001_0.jpg\nnot a line\n")
    with pytest.raises(UserError, match=r"list_query.txt: 2 lines are not .*e.g. lines \[1, 2\]"):
        prepare.main(["--data", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])


def test_published_counts_are_compared_only_for_a_download():
    published = PUBLISHED["dukemtmc"]
    sample = {"train": (2, 5, 4), "query": (2, 2, 2), "gallery": (3, 4, 4)}
    partial = {"train": (702, 9000, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)}
    assert not looks_complete(sample, published) and looks_complete(partial, published)
    assert count_differences(partial, published) == ["train: 9,000 images, published 16,522"]
    assert count_differences(dict(published), published) == []
    assert PUBLISHED["msmt17-v2"]["train"] == (1041, 32621, 15)


def test_summary_prints_published_counts_beside_found_ones(caplog: pytest.LogCaptureFixture):
    summary = {"raw": "/d", "name": "dukemtmc", "seed": 0, "val_ids": 100, "unreadable": [],
               **{k: "" for k in ("train", "val query", "val gallery", "test query", "test gallery",
                                  "all_vs_all_test", "all_vs_all_val")},
               "found": {"train": (702, 9000, 8)},
               "published": {"published": {"train": (702, 16522, 8)}, "looks_complete": True,
                             "differences": ["train: 9,000 images, published 16,522"]}}
    with caplog.at_level("INFO", logger="reid"):
        prepare.log_summary(summary, Path("/out"))
    assert "train    (702, 9000, 8), published (702, 16522, 8)" in caplog.text
    assert "warning: train: 9,000 images, published 16,522: a partial or altered download?" in caplog.text
    caplog.clear()
    summary["found"]["train"] = (2, 5, 4)
    summary["published"] = {**summary["published"], "looks_complete": False, "differences": []}
    with caplog.at_level("INFO", logger="reid"):
        prepare.log_summary(summary, Path("/out"))
    assert "5 training images of the published 16,522: a sample" in caplog.text and "warning" not in caplog.text
