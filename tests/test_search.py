"""Using a trained model on one's own images: load_trained + embed_images, and topk.py's folder search with its
cache, its exact chunked top-k and its faiss indexes."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_tensor

import eval as evaluation
import folder_search
import topk
from datasets import load_image
from embedding import embed_images
from model import load_trained
from utils import UserError


def read_ranks(out: Path) -> list[dict]:
    with (out / "ranks.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_load_trained_and_embed_images_equal_eval_features(tiny_run: Path, tmp_path: Path):
    evaluation.main(["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "0", "--out", str(tmp_path)])
    model = load_trained(tiny_run)
    assert not model.training and model.img_size == (64, 32)
    prepared = Path(json.loads((tiny_run / "config.json").read_text())["flags"]["data"])
    with np.load(tmp_path / "features_test.npz") as cached:
        paths = [prepared / name for name in [*cached["q_files"], *cached["g_files"]]]
        expected = np.concatenate([cached["qf"], cached["gf"]])
    found = embed_images(model, paths, batch_size=7)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-5, atol=1e-5)
    pictures = [load_image(str(p)) for p in paths[:5]]
    as_bytes = torch.stack([pil_to_tensor(p) for p in pictures])  # a 4-D uint8 tensor: five images
    as_floats = [to_tensor(p) for p in pictures]
    for given in (pictures, as_bytes, as_floats, [str(p) for p in paths[:5]]):
        np.testing.assert_allclose(embed_images(model, given).numpy(), expected[:5], rtol=1e-5, atol=1e-5)
    assert embed_images(model, []).shape == (0, model.embed_dim)


def test_an_unreadable_image_is_named_by_embed_images(tiny_run: Path, tmp_path: Path):
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    with pytest.raises(UserError, match="broken.jpg: cannot read image"):
        embed_images(load_trained(tiny_run), [tmp_path / "broken.jpg"])


def test_load_trained_names_a_folder_without_a_result(tmp_path: Path):
    with pytest.raises(UserError, match="config.json: file not found"):
        load_trained(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Folder search
# ---------------------------------------------------------------------------------------------------------

QUERY_MARKET = "0003_c2s1_009999_01.jpg"


@pytest.fixture
def own_folder(synthetic_prepared: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A user's gallery: renamed copies (spaces, upper-case extensions, png, nested folders) of the synthetic
    gallery, one exact copy of the query as a png, a same-camera Market-named copy, a broken file, a text file."""
    source = sorted((synthetic_prepared / "bounding_box_test").glob("*.jpg"))
    owner, queries = tmp_path / "my crops", tmp_path / "queries"
    (owner / "camera one" / "day 2").mkdir(parents=True)
    queries.mkdir()
    for i, path in enumerate(source[:18]):
        name = [f"person {i}.JPG", f"crop {i}.jpeg", f"Crop {i}.JPEG"][i % 3]
        folder = owner / "camera one" / ("day 2" if i % 2 else "")
        shutil.copyfile(path, folder / name)
    for path in source[18:24]:
        shutil.copyfile(path, owner / path.name)  # Market-named, so identity and camera are known
    query_picture = load_image(str(source[30]))
    query_picture.save(queries / "who is this.png")
    query_picture.save(owner / "camera one" / "Exact Copy.PNG")
    shutil.copyfile(queries / "who is this.png", queries / QUERY_MARKET)
    query_picture.save(owner / "0003_c2s1_000001_01.png")  # same person, same camera as QUERY_MARKET: left out
    (owner / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (owner / "notes.txt").write_text("not an image")
    return owner, queries, tmp_path / "out"


def folder_flags(run: Path, owner: Path, queries: Path, out: Path, *extra: str) -> list[str]:
    return ["--result-dir", str(run), "--gallery", str(owner), "--queries", str(queries), "--k", "5",
            "--out", str(out), "--workers", "0", *extra]


def test_an_exact_copy_ranks_first_and_unreadable_files_are_listed(tiny_run: Path, own_folder):
    owner, queries, out = own_folder
    report = topk.main(folder_flags(tiny_run, owner, queries, out))
    rows = read_ranks(out)
    assert report["gallery_images"] == 18 + 6 + 2 and report["unreadable"] == [str(owner / "broken.jpg")]
    copy, same_camera = str(owner / "camera one" / "Exact Copy.PNG"), str(owner / "0003_c2s1_000001_01.png")
    market_rows = [row for row in rows if row["query"] == str(queries / QUERY_MARKET)]
    unnamed_rows = [row for row in rows if row["query"] == str(queries / "who is this.png")]
    for mine in (market_rows, unnamed_rows):
        assert [int(row["rank"]) for row in mine] == [1, 2, 3, 4, 5]
        assert all("broken" not in row["gallery"] and "notes" not in row["gallery"] for row in mine)
    assert market_rows[0]["gallery"] == copy and float(market_rows[0]["distance"]) == pytest.approx(0, abs=1e-5)
    assert market_rows[0]["pid"] == "" and market_rows[0]["match"] == ""  # a name without identity: no truth
    assert same_camera not in {row["gallery"] for row in market_rows}  # the protocol's same-camera removal
    # No identity on the query, so nothing is removed: both exact copies come first, at distance 0.
    assert {row["gallery"] for row in unnamed_rows[:2]} == {copy, same_camera}
    assert [float(row["distance"]) for row in unnamed_rows[:2]] == pytest.approx([0, 0], abs=1e-5)
    for row in market_rows:
        if row["pid"]:
            assert row["match"] == str(int(row["pid"] == "3"))
    assert len(list((out / "grids").glob("*.png"))) == 2 and (out / "index.html").is_file()


def test_the_gallery_cache_is_reused_and_invalidated_when_a_file_changes(tiny_run: Path, own_folder,
                                                                         monkeypatch: pytest.MonkeyPatch):
    owner, queries, out = own_folder
    embedded: list[int] = []
    real = folder_search.embed_files

    def counting(model, files, *args):
        embedded.append(len(files))
        return real(model, files, *args)

    monkeypatch.setattr(folder_search, "embed_files", counting)
    topk.main(folder_flags(tiny_run, owner, queries, out))
    first = read_ranks(out)
    topk.main(folder_flags(tiny_run, owner, queries, out))
    assert embedded == [27, 2, 2]  # gallery, queries; then the queries only
    assert read_ranks(out) == first
    changed = owner / "camera one" / "Exact Copy.PNG"
    Image.new("RGB", (32, 64), (250, 250, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    topk.main(folder_flags(tiny_run, owner, queries, out))
    assert embedded == [27, 2, 2, 27, 2]
    assert str(changed) not in [row["gallery"] for row in read_ranks(out) if row["rank"] == "1"]


def test_faiss_indexes_return_the_exact_ranking_in_the_cli(tiny_run: Path, own_folder):
    owner, queries, out = own_folder
    topk.main(folder_flags(tiny_run, owner, queries, out))
    exact = read_ranks(out)
    for flags in (["--index", "faiss"], ["--index", "faiss-ivf", "--faiss-nlist", "4", "--faiss-nprobe", "4"]):
        topk.main(folder_flags(tiny_run, owner, queries, out, *flags))
        found = read_ranks(out)
        assert [(r["query"], r["gallery"]) for r in found] == [(r["query"], r["gallery"]) for r in exact]
        assert [float(r["distance"]) for r in found] == pytest.approx([float(r["distance"]) for r in exact], abs=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--queries", "nowhere"], "--queries nowhere: no such file or folder"),
    (["--gallery", "EMPTY"], "no image files there"),
])
def test_bad_folders_are_named(tiny_run: Path, own_folder, flags: list[str], message: str):
    owner, queries, out = own_folder
    (out.parent / "empty").mkdir()
    args = folder_flags(tiny_run, owner, queries, out)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        args[args.index(flag) + 1] = str(out.parent / "empty") if value == "EMPTY" else value
    with pytest.raises(UserError, match=message):
        topk.main(args)


# ---------------------------------------------------------------------------------------------------------
# Ranking functions against a plain reference
# ---------------------------------------------------------------------------------------------------------


def random_side(rng: np.random.Generator, n: int, dim: int, prefix: str) -> dict:
    pids = rng.choice([folder_search.UNLABELLED, -1, 0, 1, 2, 3], size=n)
    return {"features": rng.normal(size=(n, dim)).astype(np.float32), "pids": pids,
            "cams": np.where(pids == folder_search.UNLABELLED, folder_search.UNLABELLED, rng.integers(1, 3, size=n)),
            "files": np.array([f"{prefix}{i}" for i in range(n)])}


def reference_topk(query: dict, side: dict, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The full distance matrix in float64 by the definitions, left-out items dropped, then argsort."""
    qn = query["features"] / np.linalg.norm(query["features"], axis=1, keepdims=True)
    gn = side["features"] / np.linalg.norm(side["features"], axis=1, keepdims=True)
    cos = qn.astype(np.float64) @ gn.T.astype(np.float64)
    dist = 1 - cos if metric == "cosine" else ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
    out_i, out_d = [], []
    for q in range(len(qn)):
        keep = [g for g in np.argsort(dist[q], kind="stable") if not (
            side["files"][g] == query["files"][q] or side["pids"][g] == -1 or (
                query["pids"][q] != folder_search.UNLABELLED and side["pids"][g] == query["pids"][q]
                and side["cams"][g] == query["cams"][q]))][:k]
        out_i.append(keep)
        out_d.append(dist[q, keep])
    return np.array(out_i), np.array(out_d)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_and_faiss_topk_equal_the_plain_ranking(metric: str):
    rng = np.random.default_rng(3)
    side, query = random_side(rng, 300, 16, "g"), random_side(rng, 40, 16, "q")
    query["files"][:5] = side["files"][:5]  # five queries are gallery files themselves: never ranked
    want_i, want_d = reference_topk(query, side, 7, metric)
    flat = folder_search.faiss_index(side["features"], metric, "faiss", 8, 8)
    ivf = folder_search.faiss_index(side["features"], metric, "faiss-ivf", 8, 8)
    got = [folder_search.exact_topk(query, side, 7, metric, query_chunk=9, gallery_chunk=64),
           folder_search.faiss_topk(flat, query, side, 7, metric),
           folder_search.faiss_topk(ivf, query, side, 7, metric, query_chunk=16)]
    for got_i, got_d in got:
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, atol=1e-5)


def test_a_short_gallery_pads_with_minus_one():
    rng = np.random.default_rng(0)
    side, query = random_side(rng, 3, 4, "g"), random_side(rng, 2, 4, "q")
    side["pids"][:] = folder_search.UNLABELLED
    top_i, top_d = folder_search.exact_topk(query, side, 5, "euclidean")
    assert (top_i[:, 3:] == -1).all() and np.isinf(top_d[:, 3:]).all() and (top_i[:, :3] >= 0).all()


def test_market_labels_read_any_extension_and_mark_other_names_unlabelled():
    pids, cams = folder_search.market_labels([Path("a/0012_c3s1_000100_02.PNG"), Path("b/-1_c1s2_000001_00.jpeg"),
                                        Path("c/my crop.jpg")])
    assert pids.tolist() == [12, -1, folder_search.UNLABELLED] and cams.tolist() == [3, 1, folder_search.UNLABELLED]
