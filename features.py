"""From a result directory to embeddings: the model from its saved parts and config.json, batched extraction
with a cache beside the results, and the query × gallery distances that eval.py and topk.py rank by."""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corruptions import CORRUPTIONS, SEVERITIES
from datasets import (
    SPLITS,
    CorruptionSettings,
    build_transforms,
    corruption_draws,
    eval_loader,
    load_eval_records,
    manifest_path,
)
from metrics import embedding_distance, evaluate_rank
from model import ReIDModel, load_part_state, read_state_dict
from rerank import re_ranking
from utils import (
    LOG,
    PART_FILES,
    UserError,
    atomic_write_bytes,
    normalise_flag_spelling,
    part_file,
    read_json,
    resolve_device,
    sha256_file,
)


@torch.no_grad()
def extract_features(model, loader, device: torch.device, flip: bool = False,
                     progress: bool = True) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embeddings of every image a loader yields (summed with the mirror image's when `flip`), with the person
    ids and cameras. They are kept raw, as the Siamese head takes them; retrieval normalises them."""
    model.eval()
    features, pids, camids = [], [], []
    for images, batch_pids, batch_camids, _ in tqdm(loader, desc="embedding", unit="batch", disable=not progress,
                                                    leave=False):
        images = images.to(device, non_blocking=True)
        embedding = model.embed(images).float()
        if flip:
            embedding = embedding + model.embed(torch.flip(images, dims=[3])).float()
        features.append(embedding.cpu())
        pids.append(batch_pids.numpy())
        camids.append(batch_camids.numpy())
    return torch.cat(features), np.concatenate(pids), np.concatenate(camids)


def model_settings(args: argparse.Namespace) -> dict:
    """Backbone, autoencoder, sizes and part files of the model to evaluate, from the flags and config.json."""
    if args.all_dir is not None and not Path(args.all_dir).is_dir():
        raise UserError(f"--all-dir {args.all_dir}: no such folder (expected a result directory of train.py)")
    sources = {"backbone": args.backbone_dir or args.all_dir, "ae": args.ae_dir or args.all_dir,
               "classifier": args.classifier_dir or args.all_dir}
    flags: dict = {}
    for folder in [args.all_dir, args.backbone_dir, args.ae_dir, args.classifier_dir]:
        if folder is not None and Path(folder).is_dir() and (Path(folder) / "config.json").is_file():
            config = read_json(Path(folder) / "config.json")
            flags = {**config["flags"], "num_classes": config.get("num_classes")}
            break
    backbone = args.backbone_type or flags.get("backbone_name")
    ae = args.ae_type or flags.get("ae_name")
    if (backbone is None or ae is None) and args.all_dir is not None:
        raise UserError(f"--all-dir {args.all_dir}: no config.json there (expected a result directory of train.py, "
                        "or give --backbone_type and --ae_type)")
    if backbone is None or ae is None:
        raise UserError("--backbone_type and --ae_type are needed when no config.json is found beside the parts "
                        "(or give --all-dir RESULT_DIR)")
    for name, given, trained in (("--backbone_type", args.backbone_type, flags.get("backbone_name")),
                                 ("--ae_type", args.ae_type, flags.get("ae_name"))):
        if given and trained and given != trained:
            raise UserError(f"{name} {given}: the parts were trained as {trained}")
    if sources["backbone"] is None or sources["ae"] is None:
        raise UserError("give --all-dir RESULT_DIR, or --backbone_dir and --ae_dir")
    files = {part: part_file(path, part, f"--{part}_dir") for part, path in sources.items()
             if path is not None and (part != "classifier" or args.classifier_dir or
                                      (Path(path) / PART_FILES["classifier"]).is_file())}
    return {"backbone": backbone, "ae": ae, "files": {k: str(v) for k, v in files.items()},
            "latent_dim": int(flags.get("latent_dim") or args.latent_dim),
            "img_size": tuple(args.img_size or flags.get("img_size") or (256, 128)),
            "last_stride": int(flags.get("last_stride") or 1), "num_classes": flags.get("num_classes"),
            "recon_target": flags.get("recon_target") or "feature"}


def load_model(settings: dict, device: torch.device) -> ReIDModel:
    """Build the model named by `settings` and load its saved parts, naming a part that does not fit."""
    states = {part: read_state_dict(path) for part, path in settings["files"].items()}
    num_classes = settings["num_classes"] or classifier_classes(states.get("classifier")) or 1
    try:
        model = ReIDModel(settings["backbone"], settings["ae"], num_classes, latent_dim=settings["latent_dim"],
                          last_stride=settings["last_stride"], img_size=settings["img_size"],
                          recon_target=settings["recon_target"])
    except ValueError as err:
        raise UserError(str(err)) from err
    parts = model.parts()
    for part, state in states.items():
        try:
            load_part_state(parts[part], state, part)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{settings['files'][part]}: does not fit {settings['backbone']} + {settings['ae']}: "
                            f"{err}") from err
    return model.to(device).eval()


def feature_cache_key(settings: dict, manifest: Path, flip: bool, corruption: CorruptionSettings | None = None) -> str:
    """What the cached features depend on: the part files' bytes, the split manifest, the image size, flipping,
    and the corruption settings (with the corruptions' code, so a change to it invalidates the cache)."""
    digest = hashlib.sha256()
    for part in sorted(settings["files"]):
        if part != "classifier":
            digest.update(sha256_file(settings["files"][part]).encode())
    digest.update(sha256_file(manifest).encode())
    digest.update(f"{settings['img_size']}{flip}raw".encode())
    if corruption is not None:
        digest.update(corruption.key().encode())
        digest.update(sha256_file(Path(__file__).with_name("corruptions.py")).encode())
    return digest.hexdigest()


def split_features(model: ReIDModel, settings: dict, prepared: Path, split: str, flip: bool, device: torch.device,
                   cache: Path | None, batch_size: int = 128, workers: int = 2,
                   corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """Query and gallery embeddings with ids and cameras, from the .npz cache when it matches, else extracted;
    with `corruption`, of the images corrupted by the Market-1501-C protocol."""
    key = feature_cache_key(settings, manifest_path(prepared, split), flip, corruption)  # dataset_root checked it
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key:
                LOG.info("features from %s", cache)
                return {name: stored[name] for name in stored.files if name != "key"}
    query, gallery = load_eval_records(prepared, split)
    if not query or not gallery:
        raise UserError(f"split '{split}' of {prepared}: {len(query)} query and {len(gallery)} gallery images; "
                        "both must be non-empty")
    draws = None if corruption is None else corruption_draws(corruption, len(query), len(gallery))
    loader = eval_loader(query + gallery, build_transforms(settings["img_size"], False), batch_size, workers, draws)
    features, pids, camids = extract_features(model, loader, device, flip)
    n = len(query)
    found = {"qf": features[:n].numpy(), "gf": features[n:].numpy(), "q_pids": pids[:n], "g_pids": pids[n:],
             "q_camids": camids[:n], "g_camids": camids[n:],
             "q_files": np.array([str(Path(r.path).relative_to(prepared)) for r in query]),
             "g_files": np.array([str(Path(r.path).relative_to(prepared)) for r in gallery])}
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), **found)
        atomic_write_bytes(cache, buffer.getvalue())
    return found


def classifier_classes(state: dict | None) -> int | None:
    """The number of training identities, read off a saved classifier's output layer."""
    if state is None:
        return None
    weight = state.get("identity.fc.weight")
    return int(weight.shape[0]) if weight is not None else None



def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The seed's model and data flags, shared by eval.py and topk.py."""
    add = parser.add_argument
    add("--all-dir", type=Path, help="a result directory of train.py: parts, config.json (enough on its own)")
    add("--backbone-dir", type=Path, help="backbone weights: a file or a folder holding backbone.pt")
    add("--backbone-type", help="backbone name (read from config.json when there is one)")
    add("--ae-dir", type=Path, help="autoencoder weights: a file or a folder holding ae.pt")
    add("--ae-type", help="autoencoder name (read from config.json when there is one)")
    add("--classifier-dir", type=Path, help="classifier and Siamese head: a file or a folder holding classifier.pt")
    add("--dataset-dir", type=Path, help="prepared root (default: the one the model was trained on)")
    add("--split", default="test", choices=[s for s in SPLITS if s != "train"])
    add("--flip", action="store_true", help="average each embedding with its mirror image's")
    add("--metric", choices=("euclidean", "cosine"), default="euclidean")
    add("--rerank", action="store_true", help="k-reciprocal re-ranking")
    add("--k1", type=int, default=20)
    add("--k2", type=int, default=6)
    add("--lambda-value", type=float, default=0.3)
    add("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the training size)")
    add("--latent-dim", type=int, default=512, help="latent size when no config.json says it")
    add("--batch-size", type=int, default=128)
    add("--workers", type=int, default=2)
    add("--device", default="auto")
    add("--no-cache", action="store_true", help="always extract features, never read or write the .npz cache")
    add("--corrupt", metavar="all|NAME[,NAME...]",
        help="also evaluate with Market-1501-C corruptions: each query and gallery image gets one of these, drawn "
        f"per image with --corrupt-seed ({', '.join(CORRUPTIONS)})")
    add("--severity", default="all", metavar="1..5|all", help="severities drawn from (a list like 1,3 works too)")
    add("--corrupt-seed", type=int, default=0, help="seed of the per-image corruption draws")
    add("--corrupt-grid", action="store_true",
        help="every corruption (of --corrupt, default all) × severity: robustness.json, .png and .md")
    add("--out", type=Path, help="output folder (default RESULT_DIR/eval for eval.py, RESULT_DIR/topk for topk.py; "
        "<name>_<split> for splits other than test)")


def parse_model_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse eval.py's or topk.py's flags (both spellings), requiring a model: --all-dir or the part folders."""
    args = parser.parse_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.all_dir is None and args.backbone_dir is None:
        parser.error("give --all-dir RESULT_DIR, or --backbone_dir and --ae_dir")
    for flag, value in (("--k1", args.k1), ("--k2", args.k2)):
        if value < 1:
            parser.error(f"{flag} {value}: expected a positive number of neighbours")
    if not 0 <= args.lambda_value <= 1:
        parser.error(f"--lambda-value {args.lambda_value}: expected a weight between 0 and 1")
    try:
        args.corruption = corruption_settings(args.corrupt, args.severity, args.corrupt_seed)
    except ValueError as err:
        parser.error(str(err))
    return args


def corruption_settings(corrupt: str | None, severity: str, seed: int) -> CorruptionSettings | None:
    """--corrupt, --severity and --corrupt-seed as settings (None without --corrupt); a ValueError names a bad one."""
    if corrupt is None:
        return None
    names = CORRUPTIONS if corrupt == "all" else tuple(dict.fromkeys(n.strip() for n in corrupt.split(",")))
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f"--corrupt {corrupt}: unknown {', '.join(unknown) or 'empty list'}; expected all or names "
                         f"from {', '.join(CORRUPTIONS)}")
    if severity == "all":
        return CorruptionSettings(names, SEVERITIES, seed)
    try:
        severities = tuple(sorted({int(s) for s in severity.split(",")}))
    except ValueError:
        severities = ()
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"--severity {severity}: expected all, or severities from 1 to 5 (e.g. 3 or 1,3)")
    return CorruptionSettings(names, severities, seed)


def rank_split(distances: np.ndarray, found: dict[str, np.ndarray], split: str, prepared: Path,
               **options) -> dict:
    """evaluate_rank on a split's features; a split the protocol leaves nothing to rank in is named."""
    try:
        return evaluate_rank(distances, found["q_pids"], found["g_pids"], found["q_camids"], found["g_camids"],
                             **options)
    except ValueError as err:
        raise UserError(f"split '{split}' of {prepared}: {err}") from err


def dataset_root(args: argparse.Namespace) -> Path:
    """The prepared root to evaluate on, checked to hold the split's manifest: --dataset-dir, else the training
    run's --data."""
    if args.dataset_dir is not None:
        root, source = Path(args.dataset_dir), "--dataset-dir"
        hint = "expected a root written by prepare.py --out, not a raw Market-1501 folder"
    else:
        configs = [Path(folder) / "config.json" for folder in (args.all_dir, args.backbone_dir) if folder is not None]
        config = next((path for path in configs if path.is_file()), None)
        if config is None:
            raise UserError("--dataset-dir: needed when the model folder has no config.json naming its data")
        root, source = Path(read_json(config)["flags"]["data"]), f"the training data named in {config}:"
        hint = "a relative path there is read from the current folder; give --dataset-dir PREPARED_ROOT"
    manifest = manifest_path(root, args.split)
    if not manifest.is_file():
        raise UserError(f"{source} {root}: no split manifest {manifest} ({hint})")
    return root


def result_folder(args: argparse.Namespace, name: str) -> Path:
    """RESULT_DIR/<name> beside the model (<name>_<split> for splits other than test)."""
    base = args.all_dir or (args.backbone_dir if Path(args.backbone_dir).is_dir() else Path(args.backbone_dir).parent)
    return Path(base) / (name if args.split == "test" else f"{name}_{args.split}")


def output_dir(args: argparse.Namespace) -> Path:
    """Where eval.py's results and feature cache go: --out, else RESULT_DIR/eval."""
    return args.out if args.out is not None else result_folder(args, "eval")


def ranking_distances(found: dict[str, np.ndarray], args: argparse.Namespace) -> np.ndarray:
    """Query × gallery distances by --metric, re-ranked when --rerank."""
    qf, gf = torch.from_numpy(found["qf"]), torch.from_numpy(found["gf"])
    q_g = embedding_distance(qf, gf, args.metric).numpy()
    if not args.rerank:
        return q_g
    q_q = embedding_distance(qf, qf, args.metric).numpy()
    g_g = embedding_distance(gf, gf, args.metric).numpy()
    return re_ranking(q_g, q_q, g_g, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)


@dataclass
class EvaluationInputs:
    """What eval.py and topk.py share: the model and its settings, the data root, the split's features (flipped
    when --flip) and the query × gallery distances they rank by."""

    settings: dict
    prepared: Path
    model: ReIDModel
    device: torch.device
    found: dict[str, np.ndarray]
    distances: np.ndarray


def corruption_file_tag(corruption: CorruptionSettings | None) -> str:
    """The corruption settings in a feature cache's file name: '' when clean, else e.g. '_c-all_s-all_seed-0'
    (a digest stands for a long list of names)."""
    if corruption is None:
        return ""
    names, severities, seed = corruption.key().split("|")
    if len(names) > 40:
        names = hashlib.sha256(names.encode()).hexdigest()[:12]
    return f"_c-{names.replace(',', '+')}_s-{severities[2:].replace(',', '+')}_seed-{seed[5:]}"


def cached_features(args: argparse.Namespace, model: ReIDModel, settings: dict, prepared: Path,
                    device: torch.device, cache_dir: Path, flip: bool,
                    corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features, cached as features_<split>[_flip][_c-...].npz in `cache_dir` unless --no-cache."""
    name = f"features_{args.split}{'_flip' if flip else ''}{corruption_file_tag(corruption)}.npz"
    cache = None if args.no_cache else cache_dir / name
    return split_features(model, settings, prepared, args.split, flip, device, cache, args.batch_size,
                          args.workers, corruption)


def prepare_evaluation(args: argparse.Namespace, cache_dir: Path,
                       corruption: CorruptionSettings | None = None) -> EvaluationInputs:
    """Load the model, embed the split (or read the cache in `cache_dir`) and compute the ranking distances;
    with `corruption`, of the corrupted split."""
    settings = model_settings(args)
    prepared, device = dataset_root(args), resolve_device(args.device)
    model = load_model(settings, device)
    found = cached_features(args, model, settings, prepared, device, cache_dir, args.flip, corruption)
    return EvaluationInputs(settings, prepared, model, device, found, ranking_distances(found, args))


def corrupted_evaluation(inputs: EvaluationInputs, args: argparse.Namespace, cache_dir: Path,
                         corruption: CorruptionSettings) -> EvaluationInputs:
    """The same model and split with the images corrupted by `corruption`: its features (cached) and distances."""
    found = cached_features(args, inputs.model, inputs.settings, inputs.prepared, inputs.device, cache_dir,
                            args.flip, corruption)
    return EvaluationInputs(inputs.settings, inputs.prepared, inputs.model, inputs.device, found,
                            ranking_distances(found, args))


def unaugmented_features(inputs: EvaluationInputs, args: argparse.Namespace, cache_dir: Path,
                         corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features (of the images corrupted by `corruption`, as `inputs` were) without test-time flipping,
    as the Siamese head is scored and ranks."""
    if not args.flip:
        return inputs.found
    return cached_features(args, inputs.model, inputs.settings, inputs.prepared, inputs.device, cache_dir, False,
                           corruption)
