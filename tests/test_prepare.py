"""prepare.py: exact split counts on a hand-made tree, idempotence, safety of the user's images, clear errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import prepare
from conftest import ROOT, SHORT_SCHEDULE, make_market_tree
from datasets import load_eval_records, load_manifest, load_train_records
from utils import UserError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_split_counts_on_the_hand_made_tree(market_tree: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1", "--seed", "0"])
    train, num_classes = load_train_records(out)
    val_query, val_gallery = load_eval_records(out, "val")
    held_out = {r.pid for r in val_query}
    # One of ids 2 (cameras 1,2,3), 7 (1,2), 10 (1,4,4) is held out; the other two train, relabelled 0 and 1.
    assert num_classes == 2 and len(held_out) == 1 and {r.pid for r in val_gallery} == held_out
    images_per_id = {2: 3, 7: 2, 10: 3}
    cameras_per_id = {2: 3, 7: 2, 10: 2}
    (pid,) = held_out
    assert len(val_query) == cameras_per_id[pid] and len({r.camid for r in val_query}) == len(val_query)
    assert len(val_query) + len(val_gallery) == images_per_id[pid]
    assert len(train) == 8 - images_per_id[pid] and sorted({r.label for r in train}) == [0, 1]
    query, gallery = load_eval_records(out, "test")
    assert (len(query), len(gallery)) == (3, 9)
    # The all-vs-all split of bounding_box_test without junk/distractors: id 1 has 2 images -> 1 test, 1 val (left
    # out); id 3 has 5 images -> round(3.0) = 3 test, 2 val.
    all_test, _ = load_eval_records(out, "all_vs_all_test")
    all_val, all_val_gallery = load_eval_records(out, "all_vs_all_val")
    assert Counter(r.pid for r in all_test) == {1: 1, 3: 3}
    assert Counter(r.pid for r in all_val) == {3: 2} and all_val == all_val_gallery
    assert load_manifest(out, "all_vs_all_val")["left_out_ids"] == [1]


def test_prepare_links_and_never_touches_the_users_images(market_tree: Path, tmp_path: Path):
    before = snapshot(market_tree)
    out = tmp_path / "prepared"
    prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1"])
    linked = out / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    assert linked.is_symlink() and Path(os.readlink(linked)) == (market_tree / linked.relative_to(out)).resolve()
    assert snapshot(market_tree) == before


def test_prepare_twice_gives_the_same_result(market_tree: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    args = ["--data", str(market_tree), "--out", str(out), "--val-ids", "1", "--seed", "4"]
    prepare.main(args)
    first = {p: b for p, b in snapshot(out).items() if p.endswith(".json")}
    prepare.main(args)
    assert {p: b for p, b in snapshot(out).items() if p.endswith(".json")} == first


def test_copy_mode_copies_the_bytes(market_tree: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1", "--copy"])
    copied = out / "query" / "0003_c2s1_005100_01.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (market_tree / "query" / copied.name).read_bytes()


def test_copy_mode_over_a_linked_root_replaces_the_links_and_leaves_the_images(market_tree: Path, tmp_path: Path):
    out, before = tmp_path / "prepared", snapshot(market_tree)
    prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1"])
    prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1", "--copy"])
    placed = [p for p in out.rglob("*.jpg")]
    assert placed and not any(p.is_symlink() for p in placed) and not list(out.rglob(".*.partial"))
    copied = out / "query" / "0003_c2s1_005100_01.jpg"
    assert copied.read_bytes() == (market_tree / "query" / copied.name).read_bytes()
    assert snapshot(market_tree) == before


def test_a_different_existing_file_in_out_is_not_overwritten(market_tree: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    (out / "query").mkdir(parents=True)
    (out / "query" / "0001_c3s1_005000_01.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match=r"0001_c3s1_005000_01.jpg: already exists and is not"):
        prepare.main(["--data", str(market_tree), "--out", str(out), "--val-ids", "1"])
    assert (out / "query" / "0001_c3s1_005000_01.jpg").read_bytes() == b"mine"


def test_out_inside_the_raw_folder_is_refused(market_tree: Path):
    with pytest.raises(UserError, match="must not be the raw dataset folder"):
        prepare.main(["--data", str(market_tree), "--out", str(market_tree / "query" / "prepared"), "--val-ids", "1"])


def test_too_many_validation_ids_is_a_clear_error(market_tree: Path, tmp_path: Path):
    with pytest.raises(UserError, match="--val-ids 2: the training set has 3 identities"):
        prepare.main(["--data", str(market_tree), "--out", str(tmp_path / "p"), "--val-ids", "2"])


def test_validation_without_a_gallery_is_a_clear_error(tmp_path: Path):
    one_a_camera = ["--train-ids", "4", "--test-ids", "2", "--cameras", "2", "--images-per-camera", "1", "--height",
                    "16", "--width", "8", "--distractors", "0", "--junk", "0", "--quiet"]
    with pytest.raises(UserError, match="--val-ids 1: .* one image a camera, .* validation gallery is empty"):
        prepare.main(["--synthetic", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--val-ids", "1",
                      *one_a_camera])


@pytest.mark.parametrize(("flag", "value", "expected"), [("--val-ids", "-1", "expected 0 or more"),
                                                         ("--cameras", "0", "expected a positive number"),
                                                         ("--junk", "-2", "expected 0 or more")])
def test_bad_numbers_are_named(flag: str, value: str, expected: str, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        prepare.parse_args(["--synthetic", str(tmp_path / "s"), flag, value])
    assert f"{flag} {value}: {expected}" in capsys.readouterr().err


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path):
    result = run_prepare("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "p"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: dataset folder not found"


def test_underscore_flag_spelling_is_accepted(market_tree: Path, tmp_path: Path):
    prepare.main(["--data", str(market_tree), "--out", str(tmp_path / "p"), "--val_ids", "1", "--test_share=0.5"])
    assert json.loads((tmp_path / "p" / "prepare.json").read_text())["test_share"] == 0.5


def test_synthetic_folder_is_reused_or_refused(tmp_path: Path):
    small = ["--train-ids", "3", "--test-ids", "2", "--cameras", "2", "--images-per-camera", "1", "--height", "16",
             "--width", "8", "--distractors", "1", "--junk", "1", "--quiet"]
    prepare.main(["--synthetic", str(tmp_path / "s"), *small])
    before = snapshot(tmp_path / "s")
    prepare.main(["--synthetic", str(tmp_path / "s"), *small])
    assert snapshot(tmp_path / "s") == before
    with pytest.raises(UserError, match="holds a synthetic set with other settings"):
        prepare.main(["--synthetic", str(tmp_path / "s"), *small, "--seed", "1"])
    make_market_tree(tmp_path / "users")
    with pytest.raises(UserError, match="users: not empty"):
        prepare.main(["--synthetic", str(tmp_path / "users"), *small])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--synthetic .*a-file: a file, not a folder"):
        prepare.main(["--synthetic", str(tmp_path / "a-file"), *small])


def test_an_interrupted_generation_leaves_its_marked_folder_and_a_rerun_completes(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    small = ["--train-ids", "3", "--test-ids", "2", "--cameras", "2", "--images-per-camera", "1", "--height", "16",
             "--width", "8", "--distractors", "1", "--junk", "1", "--quiet"]
    real = prepare.write_synthetic

    def interrupted(folder: Path, config, progress: bool, workers: int):
        real(folder, config, progress=progress, workers=workers)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_synthetic", interrupted)
    (tmp_path / "target").mkdir()
    (tmp_path / "s").symlink_to(tmp_path / "target")  # an empty folder reached through a link works too
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--synthetic", str(tmp_path / "s"), *small])
    assert [p.name for p in (tmp_path / "s").iterdir()] == [".partial"]  # the half set, in its marked folder
    monkeypatch.setattr(prepare, "write_synthetic", real)
    prepare.main(["--synthetic", str(tmp_path / "s"), *small])
    names = sorted(p.name for p in (tmp_path / "target").iterdir())
    assert "synthetic.json" in names and ".partial" not in names and "bounding_box_train" in names
    (tmp_path / "mine" / ".partial").mkdir(parents=True)  # a .partial of the user's own, unmarked, is content
    with pytest.raises(UserError, match="mine: not empty"):
        prepare.main(["--synthetic", str(tmp_path / "mine"), *small])


def test_the_preset_is_recorded_and_another_preset_refused(tmp_path: Path):
    small = ["--train-ids", "3", "--test-ids", "2", "--cameras", "2", "--height", "16", "--width", "8",
             "--distractors", "1", "--junk", "1", "--quiet"]
    prepare.main(["--synthetic", str(tmp_path / "s"), "--preset", "domain-b", *small])
    record = json.loads((tmp_path / "s" / "synthetic.json").read_text())
    assert (record["preset"], record["train_ids"], record["images_per_camera"]) == ("domain-b", 3, 4)
    before = snapshot(tmp_path / "s")
    result = run_prepare("--synthetic", str(tmp_path / "s"), "--preset", "hard", *small)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path / 's'}: holds the synthetic preset 'domain-b' "
                                     f"({tmp_path / 's' / 'synthetic.json'}), not 'hard'; choose another folder "
                                     "for --preset hard")
    assert snapshot(tmp_path / "s") == before


def test_images_per_camera_is_refused_where_the_preset_fixes_totals(tmp_path: Path):
    with pytest.raises(UserError, match="--images-per-camera: the market preset fixes its image totals"):
        prepare.main(["--synthetic", str(tmp_path / "s"), "--preset", "market", "--images-per-camera", "2"])
    assert not (tmp_path / "s").exists()


def test_a_record_from_before_presets_reads_as_the_default(tmp_path: Path):
    small = ["--train-ids", "3", "--test-ids", "2", "--cameras", "2", "--images-per-camera", "1", "--height", "16",
             "--width", "8", "--distractors", "1", "--junk", "1", "--quiet"]
    prepare.main(["--synthetic", str(tmp_path / "s"), *small])
    record = tmp_path / "s" / "synthetic.json"
    old = {k: v for k, v in json.loads(record.read_text()).items()
           if k not in ("preset", "train_images", "query_images", "gallery_images")}
    record.write_text(json.dumps(old))
    prepare.main(["--synthetic", str(tmp_path / "s"), *small])  # the same set: accepted, left as it is
    with pytest.raises(UserError, match="holds the synthetic preset 'default'"):
        prepare.main(["--synthetic", str(tmp_path / "s"), *small, "--preset", "domain-b"])


def test_synthetic_prepared_fixture_has_every_split(synthetic_prepared: Path):
    train, num_classes = load_train_records(synthetic_prepared)
    assert num_classes == 8 and sorted({r.label for r in train}) == list(range(8))
    for split in ("val", "test", "all_vs_all_test", "all_vs_all_val"):
        query, gallery = load_eval_records(synthetic_prepared, split)
        assert query and gallery and all(Path(r.path).exists() for r in query + gallery)


def test_a_root_prepared_under_the_earlier_split_names_reads_under_both(synthetic_prepared: Path, tmp_path: Path):
    (tmp_path / "splits").mkdir()
    for old, new in (("seed_test", "all_vs_all_test"), ("seed_val", "all_vs_all_val")):
        shutil.copy(synthetic_prepared / "splits" / f"{new}.json", tmp_path / "splits" / f"{old}.json")
        want = [(Path(r.path).relative_to(synthetic_prepared), r.pid, r.camid)
                for r in load_eval_records(synthetic_prepared, new)[0]]
        for name in (old, new):
            found = [(Path(r.path).relative_to(tmp_path), r.pid, r.camid) for r in load_eval_records(tmp_path, name)[0]]
            assert found == want and found


def test_unreadable_images_are_listed_left_out_and_never_met_in_training(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    import train
    from conftest import TINY_SYNTHETIC
    from datasets import load_image

    raw, out = tmp_path / "raw", tmp_path / "prepared"
    prepare.main(["--synthetic", str(raw), *TINY_SYNTHETIC])
    good = sorted((raw / "bounding_box_train").glob("*.jpg"))[0]
    pid = good.name.split("_")[0]  # an identity that trains, so the bad files would be drawn into its batches
    truncated, text = f"{pid}_c1s1_999998_01.jpg", f"{pid}_c2s1_999999_01.jpg"
    (raw / "bounding_box_train" / truncated).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (raw / "bounding_box_train" / text).write_text("a text file named .jpg\n")
    with caplog.at_level(logging.INFO, logger="reid"):
        prepare.main(["--data", str(raw), "--out", str(out), "--val-ids", "2", "--quiet"])
    listed = {item["file"]: item["reason"] for item in json.loads((out / "prepare.json").read_text())["unreadable"]}
    assert sorted(listed) == [f"bounding_box_train/{truncated}", f"bounding_box_train/{text}"]
    assert "image file is truncated" in listed[f"bounding_box_train/{truncated}"]
    assert "cannot identify image file" in listed[f"bounding_box_train/{text}"]
    assert "2 unreadable images left out of the manifests" in caplog.text
    assert f"{text}: UnidentifiedImageError" in caplog.text
    assert not (out / "bounding_box_train" / truncated).exists() and not (out / "bounding_box_train" / text).exists()
    records, _ = load_train_records(out)
    query, gallery = load_eval_records(out, "val")
    assert all(load_image(r.path).size == (32, 64) for r in records + query + gallery)
    summary = train.main([*SHORT_SCHEDULE, "--data", str(out), "--result-dir", str(tmp_path / "run"), "--epochs", "1",
                          "--backbone-name", "resnet18", "--ae-name", "none", "--img-size", "64", "32",
                          "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--quiet"])
    assert summary["best_epoch"] == 1 and (tmp_path / "run" / "backbone.pt").is_file()


@pytest.mark.parametrize(("settings", "name"), [({"seed": 0}, "synthetic"), ({"seed": 2}, "synthetic-seed2"),
                                                ({"preset": "domain-b", "seed": 0}, "synthetic-domain-b"),
                                                ({"preset": "default", "seed": 1}, "synthetic-seed1")])
def test_synthetic_sets_are_named_by_preset_and_seed(market_tree: Path, settings: dict, name: str):
    from layouts import find_dataset

    found = find_dataset(market_tree)
    assert prepare.dataset_name(found) == "market1501"
    (market_tree / prepare.SYNTHETIC_RECORD).write_text(json.dumps(settings))
    assert prepare.dataset_name(found) == name
