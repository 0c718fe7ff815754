"""From a result directory to embeddings: the model from its saved parts and config.json, batched extraction
with a cache beside the results, and the query × gallery distances that eval.py and topk.py rank by."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from corruptions import CORRUPTIONS, SEVERITIES
from datasets import (
    SPLITS,
    CorruptedImages,
    CorruptionSettings,
    build_transforms,
    corruption_draws,
    dataset_identity,
    detach_from_terminal_signals,
    load_eval_records,
    load_image,
    manifest_path,
)
from metrics import embedding_distance, evaluate_rank
from model import ReIDModel, build_trained, trained_settings
from rerank import average_query_expansion, re_ranking_features
from utils import (
    LOG,
    PART_FILES,
    UserError,
    normalise_flag_spelling,
    part_file,
    read_json,
    read_npz_cache,
    resolve_device,
    sha256_file,
    write_npz_cache,
)


def embed_batch(model: ReIDModel, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Embeddings of a transformed batch on the model's device, as float32 on the CPU (summed with the mirror
    image's when `flip`). They are kept raw, as the Siamese head takes them; retrieval normalises them."""
    images = images.to(next(model.parameters()).device, non_blocking=True)
    embedding = model.embed(images).float()
    if flip:
        embedding = embedding + model.embed(torch.flip(images, dims=[3])).float()
    return embedding.cpu()


@torch.no_grad()
def extract_features(model: ReIDModel, loader: Iterable, flip: bool = False,
                     progress: bool = True) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embeddings of every image a record loader yields, with the person ids and cameras (train.py's validation)."""
    model.eval()
    features, pids, camids = [], [], []
    for images, batch_pids, batch_camids, _ in tqdm(loader, desc="embedding", unit="batch", disable=not progress,
                                                    leave=False):
        features.append(embed_batch(model, images, flip))
        pids.append(batch_pids.numpy())
        camids.append(batch_camids.numpy())
    return torch.cat(features), np.concatenate(pids), np.concatenate(camids)


ImageInput = str | Path | Image.Image | torch.Tensor


class ImageList(Dataset):
    """Images given as paths, PIL images or C×H×W RGB tensors (uint8, or float in [0, 1]), each with the test
    transforms: (tensor, index, readable). An unreadable file gives a blank tensor and readable False when
    `skip_unreadable`, else a UserError naming it."""

    def __init__(self, images: Sequence[ImageInput], img_size: tuple[int, int], skip_unreadable: bool = False):
        self.images, self.img_size, self.skip_unreadable = images, tuple(img_size), skip_unreadable
        self.transform = build_transforms(self.img_size, False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        item = self.images[index]
        if isinstance(item, torch.Tensor):
            # Rounded, not truncated as to_pil_image does: a float image read from a file gives its bytes back.
            item = to_pil_image(item if item.dtype == torch.uint8 else (item.clamp(0, 1) * 255).round().byte())
        elif not isinstance(item, Image.Image):
            try:
                item = load_image(str(item))
            except UserError:
                if not self.skip_unreadable:
                    raise
                return torch.zeros(3, *self.img_size), index, False
        return self.transform(item.convert("RGB")), index, True


@torch.no_grad()
def embedding_batches(model: ReIDModel, images: Sequence[ImageInput], batch_size: int = 64, flip: bool = False,
                      workers: int = 0, skip_unreadable: bool = False,
                      progress: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, embeddings) batch by batch, in order; with `skip_unreadable`, unreadable files are left out."""
    model.eval()
    loader = DataLoader(ImageList(images, model.img_size, skip_unreadable), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=detach_from_terminal_signals)
    with tqdm(total=len(images), desc="embedding", unit="image", disable=not progress, leave=False) as bar:
        for batch, indices, readable in loader:
            bar.update(len(indices))
            if readable.any():
                yield indices[readable].numpy(), embed_batch(model, batch[readable], flip)


def embed_images(model: ReIDModel, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64,
                 flip: bool = False, workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Embeddings [N, embed_dim] of paths, PIL images or C×H×W tensors (a 4-D tensor is N of them), resized and
    normalised as the model was tested (its img_size); raw, as eval.py caches them."""
    if len(images) == 0:
        return torch.empty(0, model.embed_dim)
    return torch.cat([embedding for _, embedding in embedding_batches(model, images, batch_size, flip, workers,
                                                                      progress=progress)])


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
    return trained_settings(flags, files, flags.get("num_classes"), backbone, ae, args.img_size, args.latent_dim)


def model_fingerprint(settings: dict, flip: bool) -> str:
    """What a model's embeddings depend on: its embedding parts' bytes, the image size and flipping."""
    digest = hashlib.sha256()
    for part in sorted(settings["files"]):
        if part != "classifier":
            digest.update(sha256_file(settings["files"][part]).encode())
    digest.update(f"{tuple(settings['img_size'])}{flip}raw{settings.get('embedding', 'mu')}".encode())
    return digest.hexdigest()


def feature_cache_key(settings: dict, manifest: Path, flip: bool, corruption: CorruptionSettings | None = None) -> str:
    """What a split's cached features depend on: the model, the split manifest, and the corruption settings (with
    the corruptions' code, so a change to it invalidates the cache)."""
    digest = hashlib.sha256((model_fingerprint(settings, flip) + sha256_file(manifest)).encode())
    if corruption is not None:
        digest.update(corruption.key().encode())
        digest.update(sha256_file(Path(__file__).with_name("corruptions.py")).encode())
    return digest.hexdigest()


def split_features(model: ReIDModel, settings: dict, prepared: Path, split: str, flip: bool, cache: Path | None,
                   batch_size: int = 128, workers: int = 2,
                   corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """Query and gallery embeddings with ids and cameras, from the .npz cache when it matches, else extracted;
    with `corruption`, of the images corrupted by the Market-1501-C protocol."""
    key = feature_cache_key(settings, manifest_path(prepared, split), flip, corruption)  # dataset_root checked it
    cached = read_npz_cache(cache, key)
    if cached is not None:
        LOG.info("features from %s", cache)
        return cached
    query, gallery = load_eval_records(prepared, split)
    if not query or not gallery:
        raise UserError(f"split '{split}' of {prepared}: {len(query)} query and {len(gallery)} gallery images; "
                        "both must be non-empty")
    records = query + gallery
    paths = [r.path for r in records]
    draws = None if corruption is None else corruption_draws(corruption, len(query), len(gallery))
    images = paths if draws is None else CorruptedImages(paths, draws)
    features = embed_images(model, images, batch_size, flip, workers, progress=True).numpy()
    pids, camids = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    n = len(query)
    found = {"qf": features[:n], "gf": features[n:], "q_pids": pids[:n], "g_pids": pids[n:],
             "q_camids": camids[:n], "g_camids": camids[n:],
             "q_files": np.array([str(Path(r.path).relative_to(prepared)) for r in query]),
             "g_files": np.array([str(Path(r.path).relative_to(prepared)) for r in gallery])}
    write_npz_cache(cache, key, found)
    return found


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
    add("--rerank", action="store_true", help="k-reciprocal re-ranking, from the embeddings, on --device")
    add("--k1", type=int, default=20, help="re-ranking: size of the k-reciprocal neighbour sets")
    add("--k2", type=int, default=6, help="re-ranking: neighbours averaged in its local query expansion")
    add("--lambda-value", type=float, default=0.3, help="re-ranking: weight of the original distance")
    add("--aqe", action="store_true", help="average query expansion (α-weighted, as fast-reid) before ranking")
    add("--aqe-k", type=int, default=5, help="AQE: neighbours averaged into each embedding, itself included")
    add("--aqe-alpha", type=float, default=3.0, help="AQE: exponent α of the similarity weights")
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
    for flag, value in (("--k1", args.k1), ("--k2", args.k2), ("--aqe-k", args.aqe_k)):
        if value < 1:
            parser.error(f"{flag} {value}: expected a positive number of neighbours")
    if not 0 <= args.lambda_value <= 1:
        parser.error(f"--lambda-value {args.lambda_value}: expected a weight between 0 and 1")
    if not args.aqe_alpha >= 0:
        parser.error(f"--aqe-alpha {args.aqe_alpha}: expected a non-negative exponent")
    if args.batch_size < 1 or args.workers < 0:
        flag, value = ("--batch-size", args.batch_size) if args.batch_size < 1 else ("--workers", args.workers)
        parser.error(f"{flag} {value}: expected a positive batch size and a non-negative number of workers")
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


FOLDER_UNSAFE = re.compile(r"[^\w.-]+")


def model_config(args: argparse.Namespace) -> Path | None:
    """The config.json beside the model, in --all-dir or --backbone_dir, when there is one."""
    configs = [Path(folder) / "config.json" for folder in (args.all_dir, args.backbone_dir) if folder is not None]
    return next((path for path in configs if path.is_file()), None)


def training_root(args: argparse.Namespace) -> Path | None:
    """The prepared root the model was trained on, as its config.json names it."""
    config = model_config(args)
    return None if config is None else Path(read_json(config)["flags"]["data"])


def dataset_root(args: argparse.Namespace) -> Path:
    """The prepared root to evaluate on, checked to hold the split's manifest: --dataset-dir, else the training
    run's --data."""
    if args.dataset_dir is not None:
        root, source = Path(args.dataset_dir), "--dataset-dir"
        hint = "expected a root written by prepare.py --out, not a raw Market-1501 folder"
    else:
        root = training_root(args)
        if root is None:
            raise UserError("--dataset-dir: needed when the model folder has no config.json naming its data")
        source = f"the training data named in {model_config(args)}:"
        hint = "a relative path there is read from the current folder; give --dataset-dir PREPARED_ROOT"
    manifest = manifest_path(root, args.split)
    if not manifest.is_file():
        raise UserError(f"{source} {root}: no split manifest {manifest} ({hint})")
    return root


def is_cross_domain(args: argparse.Namespace, prepared: Path) -> bool:
    """Whether the evaluated root is another than the one the model was trained on."""
    trained = training_root(args)
    return trained is not None and trained.resolve() != prepared.resolve()


def data_provenance(args: argparse.Namespace, prepared: Path) -> dict:
    """Both data sets a result depends on: the training root (name, format, manifest hashes from config.json) and
    the evaluated root (name, format, split, manifest hash)."""
    config = model_config(args)
    trained = None
    if config is not None:
        record = read_json(config)
        trained = {**(record.get("dataset") or dataset_identity(record["flags"]["data"])),
                   "manifests": record.get("manifests")}
    manifest = manifest_path(prepared, args.split)
    evaluated = {**dataset_identity(prepared), "split": args.split, "manifest": str(manifest),
                 "sha256": sha256_file(manifest)}
    return {"trained_on": trained, "evaluated_on": evaluated, "cross_domain": is_cross_domain(args, prepared)}


def result_folder(args: argparse.Namespace, name: str) -> Path:
    """RESULT_DIR/<name> beside the model: <name>_<data set name> on another root than the training one, then
    _<split> for splits other than test."""
    base = args.all_dir or (args.backbone_dir if Path(args.backbone_dir).is_dir() else Path(args.backbone_dir).parent)
    if args.dataset_dir is not None and is_cross_domain(args, Path(args.dataset_dir)):
        name = f"{name}_{FOLDER_UNSAFE.sub('-', dataset_identity(args.dataset_dir)['name'])}"
    return Path(base) / (name if args.split == "test" else f"{name}_{args.split}")


def output_dir(args: argparse.Namespace) -> Path:
    """Where eval.py's results and feature cache go: --out, else RESULT_DIR/eval (eval_<data set> cross-domain)."""
    return args.out if args.out is not None else result_folder(args, "eval")


def ranking_distances(found: dict[str, np.ndarray], args: argparse.Namespace,
                      device: torch.device | None = None) -> np.ndarray:
    """Query × gallery distances by --metric, after --aqe's query expansion, re-ranked when --rerank; the
    expansion and re-ranking run on `device`."""
    qf, gf = found["qf"], found["gf"]
    if args.aqe:
        qf, gf = average_query_expansion(qf, gf, k=args.aqe_k, alpha=args.aqe_alpha, device=device)
    if args.rerank:
        return re_ranking_features(qf, gf, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value,
                                   metric=args.metric, device=device, progress=True)
    return embedding_distance(torch.from_numpy(qf), torch.from_numpy(gf), args.metric).numpy()


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


def cached_features(args: argparse.Namespace, model: ReIDModel, settings: dict, prepared: Path, cache_dir: Path,
                    flip: bool,
                    corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features, cached as features_<split>[_flip][_c-...].npz in `cache_dir` unless --no-cache."""
    name = f"features_{args.split}{'_flip' if flip else ''}{corruption_file_tag(corruption)}.npz"
    cache = None if args.no_cache else cache_dir / name
    return split_features(model, settings, prepared, args.split, flip, cache, args.batch_size,
                          args.workers, corruption)


def prepare_evaluation(args: argparse.Namespace, cache_dir: Path,
                       corruption: CorruptionSettings | None = None) -> EvaluationInputs:
    """Load the model, embed the split (or read the cache in `cache_dir`) and compute the ranking distances;
    with `corruption`, of the corrupted split."""
    settings = model_settings(args)
    prepared, device = dataset_root(args), resolve_device(args.device)
    model = build_trained(settings, device)
    found = cached_features(args, model, settings, prepared, cache_dir, args.flip, corruption)
    return EvaluationInputs(settings, prepared, model, device, found, ranking_distances(found, args, device))


def corrupted_evaluation(inputs: EvaluationInputs, args: argparse.Namespace, cache_dir: Path,
                         corruption: CorruptionSettings) -> EvaluationInputs:
    """The same model and split with the images corrupted by `corruption`: its features (cached) and distances."""
    found = cached_features(args, inputs.model, inputs.settings, inputs.prepared, cache_dir, args.flip, corruption)
    return EvaluationInputs(inputs.settings, inputs.prepared, inputs.model, inputs.device, found,
                            ranking_distances(found, args, inputs.device))


def unaugmented_features(inputs: EvaluationInputs, args: argparse.Namespace, cache_dir: Path,
                         corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features (of the images corrupted by `corruption`, as `inputs` were) without test-time flipping,
    as the Siamese head is scored and ranks."""
    if not args.flip:
        return inputs.found
    return cached_features(args, inputs.model, inputs.settings, inputs.prepared, cache_dir, False, corruption)
