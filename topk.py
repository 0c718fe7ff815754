"""Ranked gallery images for queries: one grid a query, ranks.csv and an index.html to look at them.

python topk.py --result-dir runs/demo                           # 8 random queries, in runs/demo/topk/
python topk.py --result-dir runs/demo --queries worst:10 --show-removed
python topk.py --result-dir runs/demo --score verifier --queries 0003_c1s1_000002_00.jpg
python topk.py --result-dir runs/demo --corrupt all     # ranked as the model saw them, Market-1501-C corrupted

It ranks exactly as eval.py does (same features, cache, metric, re-ranking and protocol), so a grid shows what
eval.py counted: gallery images of the query's person seen by the query's camera, and junk, are left out.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import html
import io
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

import eval_inputs
import folder_search
from corruptions import GALLERY_SIDE, QUERY_SIDE, CorruptionSettings, corrupted_image, corruption_draw
from datasets import load_image
from metrics import protocol_masks, rank_split
from model import ReIDModel, build_trained
from utils import (
    LOG,
    UserError,
    atomic_write_bytes,
    config_record,
    resolve_device,
    run_script,
    save_image,
    setup_logging,
    write_json,
)

BORDER = 3  # frame width around each image, pixels
GAP = 4  # space between tiles
CAPTION = 26  # caption band under each tile: two lines of the default font
COLOURS = {"query": (40, 90, 230), "match": (0, 170, 0), "mismatch": (215, 0, 0), "removed": (150, 150, 150),
           "unknown": (60, 60, 60)}  # unknown: a folder image without a Market name, so no truth
SELF, SAME_CAMERA, JUNK = "the query itself", "same camera", "junk"


# ---------------------------------------------------------------------------------------------------------
# Ranking: scores, the protocol's removals, the shown items
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def verifier_probabilities(model: ReIDModel, qf: np.ndarray, gf: np.ndarray, device: torch.device,
                           pairs_per_chunk: int = 1 << 18) -> np.ndarray:
    """Same-person probability by the Siamese head for every query × gallery pair."""
    gallery = torch.from_numpy(gf).to(device)
    rows = max(1, pairs_per_chunk // len(gf))
    probs = np.empty((len(qf), len(gf)), dtype=np.float32)
    for start in tqdm(range(0, len(qf), rows), desc="verifier", unit="chunk", leave=False):
        query = torch.from_numpy(qf[start:start + rows]).to(device)
        z_i = query.repeat_interleave(len(gf), dim=0)
        z_j = gallery.repeat(len(query), 1)
        probs[start:start + rows] = torch.sigmoid(model.verify(z_i, z_j).float()).view(len(query), -1).cpu().numpy()
    return probs


def removal_reasons(q_pid: int, q_cam: int, q_file: str, g_pids: np.ndarray, g_camids: np.ndarray,
                    g_files: np.ndarray) -> np.ndarray:
    """Why the protocol drops each gallery item for one query ('' when kept)."""
    _, same_camera, junk = protocol_masks(np.array([q_pid]), np.array([q_cam]), g_pids, g_camids)
    reasons = np.full(len(g_pids), "", dtype=object)
    reasons[same_camera[0]] = SAME_CAMERA
    reasons[junk] = JUNK
    reasons[g_files == q_file] = SELF
    return reasons


def shown_items(distances: np.ndarray, reasons: np.ndarray, k: int, show_removed: bool) -> np.ndarray:
    """Gallery indices of a query's row, closest first: the top k kept ones, or with `show_removed` the first k
    of the whole order, removed ones included. The query itself is never shown."""
    order = np.argsort(distances, kind="stable")
    keep = reasons[order] != SELF if show_removed else reasons[order] == ""
    return order[keep][:k]


def choose_queries(spec: Sequence[str], q_files: np.ndarray, ap: np.ndarray, seed: int) -> list[int]:
    """Query indices from `--queries`: file names, `random:N` or `worst:N` (the N lowest-AP valid queries)."""
    if len(spec) == 1 and (found := re.fullmatch(r"(random|worst):(\d+)", spec[0])):
        count = int(found.group(2))
        if found.group(1) == "random":
            rng = np.random.default_rng(seed)
            return sorted(int(i) for i in rng.choice(len(q_files), size=min(count, len(q_files)), replace=False))
        valid = np.flatnonzero(~np.isnan(ap))
        return [int(i) for i in valid[np.argsort(ap[valid], kind="stable")][:count]]
    names = {**{Path(f).name: i for i, f in enumerate(q_files)}, **{str(f): i for i, f in enumerate(q_files)}}
    chosen = []
    for name in spec:
        if name not in names:
            nearest = difflib.get_close_matches(Path(name).name, [Path(f).name for f in q_files], n=3, cutoff=0.0)
            raise UserError(f"--queries {name}: not in the query set; nearest: {', '.join(nearest)} "
                            "(or give random:N or worst:N)")
        chosen.append(names[name])
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Pictures: tiles, grids, the index page
# ---------------------------------------------------------------------------------------------------------


def tile(image: Image.Image, colour: tuple[int, int, int], lines: Sequence[str], img_size: tuple[int, int],
         greyed: bool = False) -> Image.Image:
    """One image resized to img_size (H, W), framed in `colour`, with a caption band underneath."""
    height, width = img_size
    picture = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    if greyed:
        picture = Image.blend(ImageOps.grayscale(picture).convert("RGB"), Image.new("RGB", picture.size, "white"), 0.5)
    canvas = Image.new("RGB", (width + 2 * BORDER, height + 2 * BORDER + CAPTION), "white")
    canvas.paste(colour, (0, 0, width + 2 * BORDER, height + 2 * BORDER))
    canvas.paste(picture, (BORDER, BORDER))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for line_number, line in enumerate(lines[:2]):
        draw.text((1, height + 2 * BORDER + 1 + 12 * line_number), line, fill=(0, 0, 0), font=font)
    return canvas


def grid(tiles: Sequence[Image.Image]) -> Image.Image:
    """Tiles side by side, GAP pixels apart."""
    width, height = tiles[0].size
    canvas = Image.new("RGB", (len(tiles) * width + (len(tiles) - 1) * GAP, height), "white")
    for position, picture in enumerate(tiles):
        canvas.paste(picture, (position * (width + GAP), 0))
    return canvas


def index_page(title: str, summary: str, entries: Sequence[dict]) -> str:
    """A self-contained HTML page showing every grid under its caption; relative links, so it opens from disk."""
    blocks = [f'<figure><figcaption>{html.escape(entry["caption"])}</figcaption><img src="'
              f'{html.escape(urllib.parse.quote(entry["grid"]))}" alt="{html.escape(entry["query"])}"></figure>'
              for entry in entries]
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>'
            "body{font-family:sans-serif;margin:1em}figure{margin:0 0 1.2em 0}"
            "figcaption{margin-bottom:.3em}img{image-rendering:pixelated;max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>\n" + "\n".join(blocks) + "\n</body></html>\n")


def write_tables(out: Path, rows: Sequence[dict], fieldnames: Sequence[str], title: str, summary: str,
                 entries: Sequence[dict]) -> None:
    """ranks.csv (one row a shown gallery image, rank 1 first) and index.html, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "ranks.csv", text.getvalue().encode())
    atomic_write_bytes(out / "index.html", index_page(title, summary, entries).encode())


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """topk.py's flags: eval.py's model and data flags plus what to show."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_inputs.add_model_flags(parser)
    parser.add_argument("--k", type=int, default=10, help="gallery images a query")
    parser.add_argument("--queries", nargs="+",
                        help="query file names, random:N, or worst:N (the N lowest-AP queries; default random:8); "
                        "with --gallery, image files or folders of them")
    parser.add_argument("--gallery", type=Path,
                        help="search a plain folder of images (recursively, any extension PIL reads), not a split")
    parser.add_argument("--index", choices=folder_search.INDEXES, default="exact",
                        help="with --gallery: exact torch search in chunks, a faiss exact index, or faiss IVF "
                        "(approximate)")
    parser.add_argument("--faiss-nlist", type=int, default=1024, help="faiss-ivf: inverted lists (cells)")
    parser.add_argument("--faiss-nprobe", type=int, default=16, help="faiss-ivf: cells searched a query")
    parser.add_argument("--score", choices=("distance", "verifier"), default="distance",
                        help="rank by embedding distance (as eval.py) or by the Siamese head's same-person probability")
    parser.add_argument("--show-removed", action="store_true",
                        help="also show, greyed, the gallery images the protocol leaves out (same camera, junk)")
    parser.add_argument("--seed", type=int, default=0, help="for random:N")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """topk.py's flags: eval.py's model and data flags plus what to show; `--flag_name` works too."""
    parser = build_parser()
    args = eval_inputs.parse_model_args(parser, argv)
    if args.corrupt_grid:
        parser.error("--corrupt-grid: eval.py's (topk.py shows one setting: give --corrupt and --severity)")
    if args.k < 1:
        parser.error(f"--k {args.k}: expected a positive number of gallery images")
    if args.gallery is not None and not args.queries:
        parser.error("--gallery: give --queries IMAGE_OR_FOLDER [...] to search it with")
    if args.gallery is None and args.index != "exact":
        parser.error(f"--index {args.index}: only with --gallery (benchmark splits are ranked exactly)")
    if min(args.faiss_nlist, args.faiss_nprobe) < 1:
        parser.error("--faiss-nlist and --faiss-nprobe: expected positive numbers")
    args.queries = args.queries or ["random:8"]
    return args


def ranking(inputs: eval_inputs.EvaluationInputs, args: argparse.Namespace, options: eval_inputs.EvaluationOptions,
            cache_dir: Path) -> np.ndarray:
    """Query × gallery distances to rank by: eval.py's, or 1 − the Siamese head's probability."""
    if args.score == "distance":
        return inputs.distances
    if "classifier" not in inputs.settings["files"]:
        raise UserError("--score verifier: needs the Siamese head (classifier.pt in --result-dir, or --classifier_dir)")
    plain = eval_inputs.unaugmented_features(inputs, options, cache_dir, args.corruption)
    return 1.0 - verifier_probabilities(inputs.model, plain["qf"], plain["gf"], inputs.device)


def shown_image(path: Path, corruption: CorruptionSettings | None, side: int, index: int) -> Image.Image:
    """An image as the model saw it: with its drawn corruption when --corrupt is given."""
    draw = None if corruption is None else corruption_draw(corruption, side, index)
    return corrupted_image(load_image(str(path)), draw)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    return folder_topk(args) if args.gallery is not None else split_topk(args)


def split_topk(args: argparse.Namespace) -> dict:
    """Grids, ranks.csv and index.html for queries of a prepared split, ranked as eval.py ranks."""
    options = eval_inputs.evaluation_options(args)
    result_dir = eval_inputs.trained_result(options.model)
    out = args.out if args.out is not None else eval_inputs.result_folder(options, result_dir, "topk")
    # eval.py's cache: its features are reused when they match
    cache_dir = eval_inputs.result_folder(options, result_dir, "eval")
    inputs = eval_inputs.prepare_evaluation(options, result_dir, cache_dir, args.corruption)
    distances = ranking(inputs, args, options, cache_dir)
    result = rank_split(distances, inputs.found, args.split, inputs.prepared)
    chosen = choose_queries(args.queries, inputs.found["q_files"], result["ap"], args.seed)
    rows, entries = [], []
    for q in tqdm(chosen, desc="grids", unit="query"):
        query_rows, entry = split_grid(q, distances, result["ap"], inputs, args, out)
        rows.extend(query_rows)
        entries.append(entry)
    settings = inputs.settings
    title = f"{settings['backbone']} + {settings['ae']}: top-{args.k} by {args.score} on {args.split}" + (
        "" if args.corruption is None else f", corrupted ({args.corruption.key()})")
    summary = (f"mAP {100 * result['mAP']:.1f}% and Rank-1 {100 * result['cmc'][0]:.1f}% over "
               f"{result['num_valid_queries']} queries by this ranking. Frames: blue the query, green the same "
               "person, red another" + (", grey left out by the protocol (same camera or junk)."
                                         if args.show_removed else "."))
    write_tables(out, rows, ["query", "rank", "gallery", "pid", "camid", score_label(args.score), "match",
                             "removed"], title, summary, entries)
    report = config_record(args, model=settings,
                           data=eval_inputs.data_provenance(options.data, result_dir, inputs.prepared),
                           mAP=result["mAP"], rank1=float(result["cmc"][0]), queries=entries)
    write_json(out / "topk.json", report)
    LOG.info("%d grids, ranks.csv and index.html in %s", len(entries), out)
    return report


def score_label(score: str) -> str:
    """The column name of the shown score: a distance, or the verifier's probability."""
    return "distance" if score == "distance" else "probability"


def split_grid(q: int, distances: np.ndarray, ap: np.ndarray, inputs: eval_inputs.EvaluationInputs,
                     args: argparse.Namespace, out: Path) -> tuple[list[dict], dict]:
    """Query q's grid saved under out/grids, with its ranks.csv rows and its index.html entry."""
    found, prepared, img_size = inputs.found, inputs.prepared, tuple(inputs.settings["img_size"])
    score_name = score_label(args.score)
    reasons = removal_reasons(found["q_pids"][q], found["q_camids"][q], found["q_files"][q], found["g_pids"],
                              found["g_camids"], found["g_files"])
    query_ap = None if np.isnan(ap[q]) else float(ap[q])
    tiles = [tile(shown_image(prepared / found["q_files"][q], args.corruption, QUERY_SIDE, q), COLOURS["query"],
                  [f"Q {found['q_pids'][q]} c{found['q_camids'][q]}", "skipped" if query_ap is None else
                   f"AP {100 * query_ap:.1f}%"], img_size)]
    rows, rank = [], 0
    for g in shown_items(distances[q], reasons, args.k, args.show_removed):
        removed = reasons[g]
        rank += not removed
        match = bool(found["g_pids"][g] == found["q_pids"][q]) and found["g_pids"][g] > 0
        score = float(distances[q, g]) if args.score == "distance" else 1.0 - float(distances[q, g])
        colour = COLOURS["removed"] if removed else COLOURS["match" if match else "mismatch"]
        head = f"{'-' if removed else f'#{rank}'} {found['g_pids'][g]} c{found['g_camids'][g]}"
        tiles.append(tile(shown_image(prepared / found["g_files"][g], args.corruption, GALLERY_SIDE, g), colour,
                          [head, f"{score_name[0]} {score:.3f}"], img_size, greyed=bool(removed)))
        rows.append({"query": found["q_files"][q], "rank": "" if removed else rank, "gallery": found["g_files"][g],
                     "pid": int(found["g_pids"][g]), "camid": int(found["g_camids"][g]),
                     score_name: f"{score:.6f}", "match": int(match), "removed": removed})
    grid_name = f"grids/{Path(found['q_files'][q]).with_suffix('').as_posix().replace('/', '_')}.png"
    save_image(grid(tiles), out / grid_name)
    caption = (f"{found['q_files'][q]} · identity {found['q_pids'][q]}, camera {found['q_camids'][q]} · "
               + ("skipped: no true match left" if query_ap is None else f"AP {100 * query_ap:.1f}%"))
    return rows, {"query": str(found["q_files"][q]), "pid": int(found["q_pids"][q]),
                  "camid": int(found["q_camids"][q]), "ap": query_ap, "grid": grid_name, "caption": caption}


def folder_side(model: ReIDModel, settings: dict, files: list[Path], args: argparse.Namespace,
                cache: Path | None) -> dict:
    """Embeddings, display names, resolved paths and Market labels of the readable files of one side."""
    found = folder_search.gallery_features(model, settings, files, cache, args.batch_size, args.workers, args.flip)
    kept = [Path(f) for f in found["files"]]
    pids, cams = folder_search.market_labels(kept)
    return {"features": found["features"], "names": [str(f) for f in kept], "pids": pids, "cams": cams,
            "files": np.array([str(f.resolve()) for f in kept]), "unreadable": found["unreadable"].tolist()}


def folder_ranking(query: dict, side: dict, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery indices and distances of every query by --index."""
    if args.index == "exact":
        return folder_search.exact_topk(query, side, args.k, args.metric)
    index = folder_search.faiss_index(side["features"], args.metric, args.index, args.faiss_nlist, args.faiss_nprobe)
    return folder_search.faiss_topk(index, query, side, args.k, args.metric)


def folder_grid(query: dict, side: dict, q: int, top_i: np.ndarray, top_d: np.ndarray, img_size: tuple[int, int],
                out: Path) -> tuple[list[dict], dict]:
    """One query's grid (saved) with its ranks.csv rows and index entry; truth frames only where both are labelled."""
    q_pid, q_cam, q_labelled = query["pids"][q], query["cams"][q], query["pids"][q] != folder_search.UNLABELLED
    label = f"Q {q_pid} c{q_cam}" if q_labelled else "Q"
    tiles = [tile(load_image(query["files"][q]), COLOURS["query"], [label, Path(query["names"][q]).stem], img_size)]
    rows = []
    for rank, (g, dist) in enumerate(zip(top_i, top_d, strict=True), start=1):
        if g < 0:
            break
        pid, cam = int(side["pids"][g]), int(side["cams"][g])
        known = q_labelled and pid != folder_search.UNLABELLED
        match = known and pid == q_pid and pid > 0
        colour = COLOURS["match" if match else "mismatch"] if known else COLOURS["unknown"]
        head = f"#{rank} {pid} c{cam}" if pid != folder_search.UNLABELLED else f"#{rank}"
        tiles.append(tile(load_image(side["files"][g]), colour, [head, f"d {dist:.3f}"], img_size))
        rows.append({"query": query["names"][q], "rank": rank, "gallery": side["names"][g],
                     "pid": "" if pid == folder_search.UNLABELLED else pid,
                     "camid": "" if cam == folder_search.UNLABELLED else cam,
                     "distance": f"{dist:.6f}", "match": int(match) if known else ""})
    grid_name = f"grids/{q:04d}_{Path(query['names'][q]).stem}.png"
    save_image(grid(tiles), out / grid_name)
    caption = f"{query['names'][q]}" + (f" · identity {q_pid}, camera {q_cam}" if q_labelled else "")
    return rows, {"query": query["names"][q], "grid": grid_name, "caption": caption}


def folder_topk(args: argparse.Namespace) -> dict:
    """Search --gallery with --queries: grids, ranks.csv, index.html and topk.json; the gallery is cached."""
    options = eval_inputs.evaluation_options(args)
    result_dir = eval_inputs.trained_result(options.model)
    settings = eval_inputs.model_settings(options.model, result_dir)
    model = build_trained(settings, resolve_device(args.device))
    out = args.out if args.out is not None else eval_inputs.result_folder(options, result_dir, "search")
    gallery_files = folder_search.list_images([args.gallery], "--gallery")
    folder_name = hashlib.sha256(str(args.gallery.resolve()).encode()).hexdigest()[:12]
    side = folder_side(model, settings, gallery_files, args,
                       None if args.no_cache else out / f"gallery_{folder_name}.npz")
    query = folder_side(model, settings, folder_search.list_images(args.queries, "--queries"), args, None)
    if not len(side["files"]) or not len(query["files"]):
        raise UserError(f"--gallery {args.gallery} / --queries: no readable images to rank")
    top_i, top_d = folder_ranking(query, side, args)
    rows, entries = [], []
    for q in tqdm(range(len(query["files"])), desc="grids", unit="query"):
        mine, entry = folder_grid(query, side, q, top_i[q], top_d[q], tuple(settings["img_size"]), out)
        rows += mine
        entries.append(entry)
    unreadable = side["unreadable"] + query["unreadable"]
    for name in unreadable:
        LOG.warning("skipped, unreadable: %s", name)
    title = f"{settings['backbone']} + {settings['ae']}: top-{args.k} of {args.gallery} by {args.metric} distance"
    summary = (f"{len(query['files'])} queries against {len(side['files'])} gallery images ({args.index} search); "
               f"{len(unreadable)} unreadable images skipped. Frames: blue the query, green the same person and red "
               "another where both names are Market-style, dark grey otherwise (no truth).")
    write_tables(out, rows, ["query", "rank", "gallery", "pid", "camid", "distance", "match"], title, summary,
                 entries)
    report = config_record(args, model=settings, gallery_images=len(side["files"]), queries=entries,
                           unreadable=unreadable)
    write_json(out / "topk.json", report)
    LOG.info("%d grids, ranks.csv and index.html in %s", len(entries), out)
    return report


if __name__ == "__main__":
    run_script(main)
