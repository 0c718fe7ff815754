"""Lay out Market-1501, DukeMTMC-reID, MSMT17, CUHK03-NP (or a synthetic Market-format set) as a prepared root of
links and split manifests.

The user's images are never moved, deleted or overwritten: the prepared root holds links (or copies with
--copy) and splits/*.json. Every image is decoded once; unreadable ones are listed in prepare.json and left out of
the manifests. Running it twice gives the same result.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from datasets import all_vs_all_split, manifest_path, records_to_rows, split_validation_ids
from layouts import (
    CUHK03_SUBSETS,
    FORMATS,
    MARKET_FOLDERS,
    PUBLISHED,
    FoundSet,
    ImageRecord,
    count_differences,
    find_dataset,
    find_unreadable,
    load_dataset,
    looks_complete,
    split_counts,
    without_labels,
)
from synthetic import PRESETS, SyntheticConfig, preset_config, write_synthetic
from utils import LOG, UserError, normalise_flag_spelling, read_json, run_script, setup_logging, write_json

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
SYNTHETIC_RECORD = "synthetic.json"
# Where a synthetic set is generated inside its folder, and the file that marks that folder as prepare.py's own.
PARTIAL_FOLDER, PARTIAL_MARK = ".partial", "GENERATING"
SHOWN_UNREADABLE = 20
SIZE_FLAGS = ("train_ids", "test_ids", "cameras", "images_per_camera", "height", "width", "distractors", "junk")


def build_parser() -> argparse.ArgumentParser:
    """Flags of prepare.py, the synthetic set's sizes in a group of their own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, help="raw data set folder (or its parent)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="the data set's published layout (auto: detected from the folder)")
    parser.add_argument("--subset", choices=CUHK03_SUBSETS, default="detected",
                        help="CUHK03-NP's boxes: detected or hand-labelled")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="threads decoding the images; processes drawing a synthetic set")
    parser.add_argument("--out", type=Path, help="prepared root to write (links and splits/*.json)")
    parser.add_argument("--synthetic", type=Path, help="write the synthetic Market-format set to this folder")
    parser.add_argument("--copy", action="store_true", help="copy images instead of linking them")
    parser.add_argument("--val-ids", type=int, default=0,
                        help="training identities held out for validation (default 0, the standard protocol: every "
                        "identity of bounding_box_train trains and train.py keeps the last epoch; with N, train.py "
                        "validates on them and keeps the best epoch)")
    parser.add_argument("--test-share", type=float, default=0.6, help="the all-vs-all split's share of images for test")
    parser.add_argument("--seed", type=int, default=0)
    synth = parser.add_argument_group("synthetic set (sizes default to the preset's)")
    synth.add_argument("--preset", choices=tuple(PRESETS), default="default",
                       help="default: the demo's set; hard: near-identical families, strong camera shifts, "
                       "occlusion, misaligned boxes; market: hard at Market-1501's counts; domain-b: the default "
                       "set seen by other cameras in other clothes")
    for name in SIZE_FLAGS:
        synth.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of prepare.py; `-` and `_` spellings are both accepted."""
    parser = build_parser()
    args = parser.parse_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.data is None and args.synthetic is None:
        parser.error("give --data RAW --out PREPARED, or --synthetic DIR (optionally with --out PREPARED)")
    if args.data is not None and args.out is None:
        parser.error("--data needs --out PREPARED")
    if not 0 < args.test_share < 1:
        parser.error(f"--test-share {args.test_share}: expected a number between 0 and 1")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected 1 or more")
    if args.val_ids < 0:
        parser.error(f"--val-ids {args.val_ids}: expected 0 or more")
    for name in SIZE_FLAGS:
        least = 0 if name in ("distractors", "junk") else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            expected = "0 or more" if least == 0 else "a positive number"
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected {expected}")
    return args


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    """The synthetic set's preset, with the size flags given overriding the preset's sizes."""
    sizes = {name: getattr(args, name) for name in SIZE_FLAGS if getattr(args, name) is not None}
    config = preset_config(args.preset, **sizes, seed=args.seed)
    if config.train_images and args.images_per_camera is not None:
        raise UserError(f"--images-per-camera: the {args.preset} preset fixes its image totals; leave the flag out")
    return config


def ensure_synthetic(folder: Path, config: SyntheticConfig, progress: bool, workers: int = 1) -> None:
    """Generate the synthetic set into an empty folder (in `workers` processes); a folder holding the same set
    already is left as it is."""
    record = folder / SYNTHETIC_RECORD
    wanted = dataclasses.asdict(config)
    if record.is_file():
        found = {**dataclasses.asdict(SyntheticConfig()), **read_json(record)}  # records before presets: default
        if found == wanted:
            LOG.info("%s: synthetic set already there, same settings", folder)
            return
        if found["preset"] != config.preset:
            raise UserError(f"{folder}: holds the synthetic preset '{found['preset']}' ({record}), not "
                            f"'{config.preset}'; choose another folder for --preset {config.preset}")
        raise UserError(f"{folder}: holds a synthetic set with other settings ({record}); choose another folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--synthetic {folder}: a file, not a folder; name a new or empty folder")
    # Generated into a marked folder inside it, then moved up, the record last: an interrupted run leaves only that
    # marked folder, which the next run clears (a folder the user made, unmarked, counts as content).
    partial = folder / PARTIAL_FOLDER
    ours = (partial / PARTIAL_MARK).is_file()
    if folder.exists() and any(entry != partial or not ours for entry in folder.iterdir()):
        raise UserError(f"{folder}: not empty; the synthetic set is written only into a new or empty folder")
    if ours:
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARK).write_text("prepare.py --synthetic is generating this set\n")
    counts = write_synthetic(partial, config, progress=progress, workers=workers)
    (partial / PARTIAL_MARK).unlink()
    for entry in partial.iterdir():
        os.replace(entry, folder / entry.name)
    partial.rmdir()
    write_json(record, wanted)
    LOG.info("%s: wrote %s (preset %s)", folder, ", ".join(f"{n} {part}" for part, n in counts.items()),
             config.preset)


def place_image(source: Path, target: Path, copy: bool) -> None:
    """Link (or copy) one image into the prepared root; an existing different file there is an error, and a link
    of ours where --copy asks for a copy is replaced by one (the image it points to is left as it is)."""
    if target.is_symlink() or target.exists():
        same = (target.is_symlink() and Path(os.readlink(target)) == source) or (
            not target.is_symlink() and filecmp.cmp(source, target, shallow=False))
        if not same:
            raise UserError(f"{target}: already exists and is not {source}; use an empty --out folder")
        if copy and target.is_symlink():
            partial = target.with_name(f".{target.name}.partial")
            shutil.copy2(source, partial)
            os.replace(partial, target)  # the link goes, atomically; its target is never opened for writing
        return
    if copy:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source)


def place_records(records: Sequence[ImageRecord], folder: Path, copy: bool) -> list[ImageRecord]:
    """Put each record's image into `folder` and return records pointing at the placed files."""
    folder.mkdir(parents=True, exist_ok=True)
    placed = []
    for r in records:
        target = folder / Path(r.path).name
        place_image(Path(r.path).resolve(), target, copy)
        placed.append(dataclasses.replace(r, path=str(target)))
    return placed


def check_out_folder(out: Path, found: FoundSet, raw: Path) -> None:
    """Refuse a prepared root that is, or lies inside, the user's image folders."""
    resolved = out.resolve()
    protected = [raw.resolve(), found.root.resolve()] + [folder.resolve() for folder in found.folders.values()]
    if any(resolved == p for p in protected) or any(p in resolved.parents for p in protected[1:]):
        raise UserError(f"--out {out}: must not be the raw dataset folder or lie inside it; choose a new folder")


def describe(records: Sequence[ImageRecord]) -> str:
    """Identities, cameras and images of a record list, for the summary."""
    ids, images, cameras = split_counts(records)
    return f"{ids:5d} ids {cameras:2d} cams {images:6d} images"


def dataset_name(found: FoundSet) -> str:
    """The set's name in prepare.json and eval.py's folders: its layout's, or for ours synthetic[-PRESET][-seedN]
    (the preset when synthetic.json names one other than the default)."""
    record = found.root / SYNTHETIC_RECORD
    if not record.is_file():
        return found.name
    settings = read_json(record)
    preset, seed = settings.get("preset", "default"), settings.get("seed", 0)
    return "synthetic" + (f"-{preset}" if preset != "default" else "") + (f"-seed{seed}" if seed else "")


def published_comparison(name: str, counts: dict[str, tuple[int, int, int]]) -> dict | None:
    """A published set's counts, whether the found set looks like the whole download, and if so how it differs."""
    published = PUBLISHED.get(name)
    if published is None:
        return None
    complete = looks_complete(counts, published)
    return {"published": {part: published[part] for part in counts}, "looks_complete": complete,
            "differences": count_differences(counts, published) if complete else []}


def drop_unreadable(parts: dict[str, list[ImageRecord]], base: Path, workers: int,
                    progress: bool) -> tuple[dict[str, list[ImageRecord]], list[dict[str, str]]]:
    """Decode every image once; the parts without the unreadable ones, and those listed with the reason."""
    unreadable = find_unreadable(sorted({r.path for records in parts.values() for r in records}), workers, progress)
    kept = {part: [r for r in records if r.path not in unreadable] for part, records in parts.items()}
    listed = [{"file": os.path.relpath(path, base), "reason": reason} for path, reason in sorted(unreadable.items())]
    return kept, listed


def split_manifests(placed: dict[str, list[ImageRecord]], out: Path, val_ids: int, test_share: float,
                    seed: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Every split's manifest from the placed parts, and the summary's line for each."""
    train, val_query, val_gallery = split_validation_ids(placed["train"], val_ids, seed)
    all_test, all_val, left_out = all_vs_all_split(placed["gallery"], test_share, seed)
    manifests = {
        "train": {"images": records_to_rows(train, out), "num_classes": len({r.pid for r in train})},
        "val": {"query": records_to_rows(val_query, out), "gallery": records_to_rows(val_gallery, out),
                "protocol": "query-gallery"},
        "test": {"query": records_to_rows(without_labels(placed["query"]), out),
                 "gallery": records_to_rows(without_labels(placed["gallery"]), out), "protocol": "query-gallery"},
        "all_vs_all_test": {"query": records_to_rows(all_test, out), "gallery": records_to_rows(all_test, out),
                            "protocol": "all-vs-all"},
        "all_vs_all_val": {"query": records_to_rows(all_val, out), "gallery": records_to_rows(all_val, out),
                           "protocol": "all-vs-all", "left_out_ids": left_out},
    }
    lines = {"train": describe(train), "val query": describe(val_query), "val gallery": describe(val_gallery),
             "test query": describe(placed["query"]), "test gallery": describe(placed["gallery"]),
             "all_vs_all_test": describe(all_test), "all_vs_all_val": describe(all_val),
             "all_vs_all_val left out ids": len(left_out)}
    return manifests, lines


def prepare(raw: Path, out: Path, copy: bool, val_ids: int, test_share: float, seed: int, fmt: str = "auto",
            subset: str = "detected", workers: int = DEFAULT_WORKERS, progress: bool = True) -> dict:
    """Write the prepared root and every split manifest; return the summary that prepare.json holds."""
    found = find_dataset(raw, fmt, subset)
    check_out_folder(out, found, raw)
    parts = load_dataset(found)
    counts = {part: split_counts(parts[part]) for part in ("train", "query", "gallery")}
    parts, unreadable = drop_unreadable(parts, found.root, workers, progress)
    placed = {part: place_records(records, out / MARKET_FOLDERS[part], copy) for part, records in parts.items()}
    manifests, lines = split_manifests(placed, out, val_ids, test_share, seed)
    name = dataset_name(found)
    source = {"raw": str(found.root.resolve()), "seed": seed, "val_ids": val_ids, "test_share": test_share,
              "name": name, "format": found.format}
    for split, manifest in manifests.items():
        write_json(manifest_path(out, split), {"split": split, **source, **manifest})
    summary = {**source, **lines, "found": counts, "unreadable": unreadable,
               "published": published_comparison(name, counts)}
    write_json(out / "prepare.json", summary)
    return summary


def log_summary(summary: dict, out: Path) -> None:
    """Print what prepare.py wrote: the data set, each split's counts, published counts, unreadable images."""
    LOG.info("prepared %s from %s (%s, seed %d, %d validation ids)", out, summary["raw"], summary["name"],
             summary["seed"], summary["val_ids"])
    for key in ("train", "val query", "val gallery", "test query", "test gallery", "all_vs_all_test", "all_vs_all_val"):
        LOG.info("  %-15s %s", key, summary[key])
    published = summary["published"]
    if published is not None and published["looks_complete"]:
        LOG.info("  found beside the published counts (identities, images, cameras):")
        for part, have in summary["found"].items():
            LOG.info("    %-8s %s, published %s", part, tuple(have), tuple(published["published"][part]))
        for line in published["differences"]:
            LOG.warning("  warning: %s: a partial or altered download?", line)
    elif published is not None:
        LOG.info("  %s training images of the published %s: a sample (or a small part of a download), not compared",
                 f"{summary['found']['train'][1]:,}", f"{published['published']['train'][1]:,}")
    unreadable = summary["unreadable"]
    if unreadable:
        LOG.warning("warning: %d unreadable images left out of the manifests (all listed in %s):", len(unreadable),
                    out / "prepare.json")
        for item in unreadable[:SHOWN_UNREADABLE]:
            LOG.warning("  %s: %s", item["file"], item["reason"])
        if len(unreadable) > SHOWN_UNREADABLE:
            LOG.warning("  ... and %d more", len(unreadable) - SHOWN_UNREADABLE)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    raw = args.data
    if args.synthetic is not None:
        ensure_synthetic(args.synthetic, synthetic_config(args), progress=not args.quiet, workers=args.workers)
        raw = raw or args.synthetic
    if args.out is None:
        return
    summary = prepare(raw, args.out, args.copy, args.val_ids, args.test_share, args.seed, args.format, args.subset,
                      args.workers, progress=not args.quiet)
    log_summary(summary, args.out)


if __name__ == "__main__":
    run_script(main)
