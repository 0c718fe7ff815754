"""topk.py on a model trained for one epoch: grid geometry, frame colours against ranks.csv, query choice, HTML."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import topk
from metrics import evaluate_rank, pairwise_distance
from model import build_trained
from utils import UserError

# The tiny run's images are 64×32; a tile is the image in a 3-pixel frame over a 26-pixel caption band, and
# tiles stand 4 pixels apart.
TILE_W, TILE_H, STEP = 32 + 2 * 3, 64 + 2 * 3 + 26, 32 + 2 * 3 + 4
BLUE, GREEN, RED, GREY = (40, 90, 230), (0, 170, 0), (215, 0, 0), (150, 150, 150)


def read_ranks(out: Path) -> list[dict]:
    with (out / "ranks.csv").open() as handle:
        return list(csv.DictReader(handle))


def frame_colour(grid: Image.Image, position: int) -> tuple[int, int, int]:
    """The top-left frame pixel of the tile at `position` (0 is the query)."""
    return grid.getpixel((position * STEP + 1, 1))


@pytest.mark.parametrize("k", [1, 4])
def test_grid_size_follows_k_and_the_image_size(tiny_run: Path, tmp_path: Path, k: int):
    report = topk.main(["--result-dir", str(tiny_run), "--k", str(k), "--queries", "random:3", "--out", str(tmp_path),
                        "--workers", "0"])
    assert len(report["queries"]) == 3
    for entry in report["queries"]:
        with Image.open(tmp_path / entry["grid"]) as grid:
            assert grid.size == ((k + 1) * TILE_W + k * 4, TILE_H)


def test_frame_colours_follow_the_truth_in_ranks_csv(tiny_run: Path, tmp_path: Path):
    report = topk.main(["--result-dir", str(tiny_run), "--k", "6", "--queries", "random:5", "--out", str(tmp_path),
                        "--workers", "0"])
    rows = read_ranks(tmp_path)
    assert {row["removed"] for row in rows} == {""}  # the protocol's removals are left out by default
    assert len(rows) == 5 * 6
    for entry in report["queries"]:
        mine = [row for row in rows if row["query"] == entry["query"]]
        assert [int(row["rank"]) for row in mine] == list(range(1, 7))
        distances = [float(row["distance"]) for row in mine]
        assert distances == sorted(distances)
        with Image.open(tmp_path / entry["grid"]) as grid:
            grid = grid.convert("RGB")
            assert frame_colour(grid, 0) == BLUE
            for position, row in enumerate(mine, start=1):
                truth = row["pid"] == str(entry["pid"])
                assert row["match"] == str(int(truth))
                assert frame_colour(grid, position) == (GREEN if truth else RED)


def test_worst_picks_the_lowest_ap_queries_by_eval_numbers(tiny_run: Path, tmp_path: Path):
    report = topk.main(["--result-dir", str(tiny_run), "--queries", "worst:4", "--out", str(tmp_path),
                        "--workers", "0"])
    with np.load(tiny_run / "eval" / "features_test.npz") as cached:
        qf, gf = (torch.nn.functional.normalize(torch.from_numpy(cached[k]), dim=1) for k in ("qf", "gf"))
        result = evaluate_rank(pairwise_distance(qf, gf).numpy(), cached["q_pids"],
                                          cached["g_pids"], cached["q_camids"], cached["g_camids"])
        q_files = cached["q_files"]
    ap = {str(f): a for f, a in zip(q_files, result["ap"], strict=True) if not np.isnan(a)}
    expected = sorted(ap, key=lambda f: ap[f])[:4]
    assert [entry["query"] for entry in report["queries"]] == expected
    assert [entry["ap"] for entry in report["queries"]] == pytest.approx([ap[f] for f in expected])


def test_index_html_references_every_grid(tiny_run: Path, tmp_path: Path):
    topk.main(["--result-dir", str(tiny_run), "--queries", "random:6", "--k", "2", "--out", str(tmp_path),
               "--workers", "0"])
    page = (tmp_path / "index.html").read_text()
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    grids = {f"grids/{p.name}" for p in (tmp_path / "grids").glob("*.png")}
    assert sources == grids and len(grids) == 6
    captions = re.findall(r"<figcaption>[^<]* · (?:AP \d+\.\d%|skipped: no true match left)</figcaption>", page)
    assert len(captions) == page.count("<figcaption>") == page.count("<img ") == len(grids)


def test_removed_images_are_shown_greyed_and_unranked(tiny_run: Path, tmp_path: Path):
    report = topk.main(["--result-dir", str(tiny_run), "--queries", "random:6", "--k", "12", "--show-removed",
                        "--out", str(tmp_path), "--workers", "0"])
    rows = read_ranks(tmp_path)
    removed = [row for row in rows if row["removed"]]
    assert removed, "with 3 cameras and 3 images a camera, same-camera matches must appear in the top 12"
    for entry in report["queries"]:
        mine = [row for row in rows if row["query"] == entry["query"]]
        assert [int(row["rank"]) for row in mine if not row["removed"]] == list(range(1, len(mine) - sum(
            bool(row["removed"]) for row in mine) + 1))
        with Image.open(tmp_path / entry["grid"]) as grid:
            grid = grid.convert("RGB")
            for position, row in enumerate(mine, start=1):
                if row["removed"]:
                    assert row["rank"] == "" and frame_colour(grid, position) == GREY
                    assert row["removed"] == "junk" or (row["pid"] == str(entry["pid"]) and
                                                        re.search(r"_c(\d)", row["gallery"]).group(1) ==
                                                        str(entry["camid"]))


def test_a_missing_image_is_named(tiny_run: Path, synthetic_prepared: Path, tmp_path: Path):
    prepared = tmp_path / "prepared"
    shutil.copytree(synthetic_prepared, prepared)  # a copy: the shared set stays whole
    query = json.loads((prepared / "splits" / "test.json").read_text())["query"][0][0]
    flags = ["--result-dir", str(tiny_run), "--dataset-dir", str(prepared), "--queries", query, "--k", "1",
             "--workers", "0", "--out", str(tmp_path / "topk")]
    topk.main(flags)  # the features are cached now, so the next run reads no image before drawing
    (prepared / query).unlink()
    with pytest.raises(UserError, match=rf"{re.escape(str(prepared / query))}: cannot read image"):
        topk.main(flags)


def test_verifier_ranks_by_the_siamese_probability_and_never_shows_the_query(tiny_run: Path, tmp_path: Path):
    report = topk.main(["--result-dir", str(tiny_run), "--split", "all_vs_all_test", "--score", "verifier", "--k", "8",
                        "--queries", "random:5", "--show-removed", "--out", str(tmp_path), "--workers", "0"])
    rows = read_ranks(tmp_path)
    model = build_trained(report["model"])
    with np.load(tiny_run / "eval_all_vs_all_test" / "features_all_vs_all_test.npz") as cached:
        feats = dict(zip(cached["g_files"], cached["gf"], strict=True))
    for entry in report["queries"]:
        mine = [row for row in rows if row["query"] == entry["query"]]
        assert len(mine) == 8 and entry["query"] not in {row["gallery"] for row in mine}
        probs = [float(row["probability"]) for row in mine]
        assert probs == sorted(probs, reverse=True)
        with torch.no_grad():
            z_q = torch.from_numpy(np.stack([feats[entry["query"]]] * len(mine)))
            z_g = torch.from_numpy(np.stack([feats[row["gallery"]] for row in mine]))
            expected = torch.sigmoid(model.verify(z_q, z_g)).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_an_unknown_query_is_named_with_the_nearest_ones(tiny_run: Path, tmp_path: Path):
    with np.load(tiny_run / "eval" / "features_test.npz") as cached:
        first = Path(str(cached["q_files"][0])).name
    near_miss = first.replace(".jpg", "9.jpg")
    with pytest.raises(UserError, match=rf"--queries {re.escape(near_miss)}: not in the query set; nearest: "
                                        rf"{re.escape(first)}"):
        topk.main(["--result-dir", str(tiny_run), "--queries", near_miss, "--out", str(tmp_path), "--workers", "0"])
    report = topk.main(["--result-dir", str(tiny_run), "--queries", first, "--out", str(tmp_path), "--workers", "0"])
    assert [Path(entry["query"]).name for entry in report["queries"]] == [first]
    assert json.loads((tmp_path / "topk.json").read_text())["flags"]["queries"] == [first]


def test_cross_domain_grids_go_beside_the_cross_domain_evaluation(tiny_run: Path, other_domain: Path):
    report = topk.main(["--result-dir", str(tiny_run), "--dataset-dir", str(other_domain), "--queries", "random:2",
                        "--workers", "0"])
    out = tiny_run / "topk_synthetic-seed1"
    assert json.loads((out / "topk.json").read_text())["data"] == report["data"]
    assert report["data"]["cross_domain"] and report["data"]["evaluated_on"]["name"] == "synthetic-seed1"
    assert report["data"]["trained_on"]["name"] == "synthetic"
    with np.load(tiny_run / "eval_synthetic-seed1" / "features_test.npz") as cached:  # eval.py's cache, reused
        assert {row["gallery"] for row in read_ranks(out)} <= {str(f) for f in cached["g_files"]}
