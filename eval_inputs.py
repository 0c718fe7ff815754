"""What eval.py and topk.py share: the model and data flags, the model from a result directory, the evaluated
split's features with their cache beside the results, and the query × gallery distances they rank by."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from corruptions import CORRUPTIONS, SEVERITIES, CorruptedImages, CorruptionSettings, corruption_draws
from datasets import (
    SPLITS,
    ImageRecord,
    dataset_identity,
    load_eval_records,
    manifest_path,
    split_name,
)
from embedding import embed_images, model_fingerprint
from metrics import embedding_distance
from model import ReIDModel, build_trained, trained_settings
from rerank import average_query_expansion, re_ranking_features
from resultdir import PART_FILES, ResultDir, part_file
from utils import (
    LOG,
    UserError,
    normalise_flag_spelling,
    read_npz_cache,
    resolve_device,
    sha256_file,
    write_npz_cache,
)


@dataclass(frozen=True)
class ModelSource:
    """Where the evaluated model comes from: a result directory or part files, and what completes or overrides
    their config.json."""

    result_dir: Path | None = None
    backbone_dir: Path | None = None
    ae_dir: Path | None = None
    classifier_dir: Path | None = None
    backbone_type: str | None = None
    ae_type: str | None = None
    img_size: tuple[int, int] | None = None
    latent_dim: int = 512


@dataclass(frozen=True)
class SplitSource:
    """The evaluated data: a prepared root (None: the training run's) and its split."""

    dataset_dir: Path | None = None
    split: str = "test"


@dataclass(frozen=True)
class RankingOptions:
    """How the query × gallery distances are computed: metric, query expansion, re-ranking."""

    metric: str = "euclidean"
    aqe: bool = False
    aqe_k: int = 5
    aqe_alpha: float = 3.0
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass(frozen=True)
class EmbeddingOptions:
    """How the split is embedded: test-time flipping, batching, device and the feature cache."""

    flip: bool = False
    batch_size: int = 128
    workers: int = 2
    device: str = "auto"
    cache: bool = True


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything eval.py and topk.py's shared steps read: model, data, ranking, embedding, corruption, output."""

    model: ModelSource
    data: SplitSource
    ranking: RankingOptions
    embedding: EmbeddingOptions
    corruption: CorruptionSettings | None = None
    out: Path | None = None


def evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    """The typed options of parsed eval.py or topk.py flags (parse_model_args's)."""
    def picked(cls: type) -> dict:
        return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}

    model = ModelSource(**{**picked(ModelSource), "img_size": tuple(args.img_size) if args.img_size else None})
    embedding = EmbeddingOptions(**picked(EmbeddingOptions), cache=not args.no_cache)
    return EvaluationOptions(model, SplitSource(**picked(SplitSource)), RankingOptions(**picked(RankingOptions)),
                             embedding, args.corruption, args.out)


def trained_result(source: ModelSource) -> ResultDir | None:
    """The result directory whose config.json describes the model: the first of --result-dir, --backbone_dir, --ae_dir
    and --classifier_dir that holds one; None for bare part files. Its config.json is read once, when first used."""
    if source.result_dir is not None and not Path(source.result_dir).is_dir():
        raise UserError(f"--result-dir {source.result_dir}: no such folder (expected a result directory of train.py)")
    folders = [source.result_dir, source.backbone_dir, source.ae_dir, source.classifier_dir]
    results = [ResultDir(folder) for folder in folders if folder is not None and Path(folder).is_dir()]
    return next((result for result in results if result.has_config()), None)


def model_settings(source: ModelSource, result: ResultDir | None) -> dict:
    """Backbone, autoencoder, sizes and part files of the model to evaluate, from the flags and `result`'s
    config.json (trained_result's)."""
    sources = {"backbone": source.backbone_dir or source.result_dir, "ae": source.ae_dir or source.result_dir,
               "classifier": source.classifier_dir or source.result_dir}
    flags = {} if result is None else {**result.flags, "num_classes": result.config.get("num_classes")}
    backbone = source.backbone_type or flags.get("backbone_name")
    ae = source.ae_type or flags.get("ae_name")
    if (backbone is None or ae is None) and source.result_dir is not None:
        raise UserError(f"--result-dir {source.result_dir}: no config.json there (expected a result directory of "
                        "train.py, or give --backbone_type and --ae_type)")
    if backbone is None or ae is None:
        raise UserError("--backbone_type and --ae_type are needed when no config.json is found beside the parts "
                        "(or give --result-dir RESULT_DIR)")
    for name, given, trained in (("--backbone_type", source.backbone_type, flags.get("backbone_name")),
                                 ("--ae_type", source.ae_type, flags.get("ae_name"))):
        if given and trained and given != trained:
            raise UserError(f"{name} {given}: the parts were trained as {trained}")
    if sources["backbone"] is None or sources["ae"] is None:
        raise UserError("give --result-dir RESULT_DIR, or --backbone_dir and --ae_dir")
    files = {part: part_file(path, part, f"--{part}_dir") for part, path in sources.items()
             if path is not None and (part != "classifier" or source.classifier_dir or
                                      (Path(path) / PART_FILES["classifier"]).is_file())}
    return trained_settings(flags, files, flags.get("num_classes"), backbone, ae, source.img_size, source.latent_dim)


def feature_cache_key(settings: dict, manifest: Path, flip: bool, corruption: CorruptionSettings | None = None) -> str:
    """What a split's cached features depend on: the model, the split manifest, and the corruption settings (with
    the corruptions' code, so a change to it invalidates the cache)."""
    digest = hashlib.sha256((model_fingerprint(settings, flip) + sha256_file(manifest)).encode())
    if corruption is not None:
        digest.update(corruption.key().encode())
        digest.update(sha256_file(Path(__file__).with_name("corruptions.py")).encode())
    return digest.hexdigest()


def split_images(prepared: Path, split: str,
                 corruption: CorruptionSettings | None = None) -> tuple[list[ImageRecord], int, Sequence]:
    """A split's query then gallery records, the number of queries, and their images: the files, or with
    `corruption` the images corrupted by the Market-1501-C protocol."""
    query, gallery = load_eval_records(prepared, split)
    if not query or not gallery:
        raise UserError(f"split '{split}' of {prepared}: {len(query)} query and {len(gallery)} gallery images; "
                        "both must be non-empty")
    records = query + gallery
    paths = [r.path for r in records]
    if corruption is None:
        return records, len(query), paths
    return records, len(query), CorruptedImages(paths, corruption_draws(corruption, len(query), len(gallery)))


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
    records, n, images = split_images(prepared, split, corruption)
    features = embed_images(model, images, batch_size, flip, workers, progress=True).numpy()
    files = np.array([str(Path(r.path).relative_to(prepared)) for r in records])
    found = {"qf": features[:n], "gf": features[n:], **split_labels(records, n), "q_files": files[:n],
             "g_files": files[n:]}
    write_npz_cache(cache, key, found)
    return found


def split_labels(records: Sequence[ImageRecord], num_query: int) -> dict[str, np.ndarray]:
    """The query and gallery identities and cameras of a split's records (queries first): q_pids, g_pids,
    q_camids, g_camids."""
    pids, camids = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    return {"q_pids": pids[:num_query], "g_pids": pids[num_query:], "q_camids": camids[:num_query],
            "g_camids": camids[num_query:]}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The seed's model and data flags, shared by eval.py and topk.py."""
    add = parser.add_argument
    add("--result-dir", "--all-dir", dest="result_dir", type=Path,
        help="a result directory of train.py: parts, config.json (enough on its own)")
    add("--backbone-dir", type=Path, help="backbone weights: a file or a folder holding backbone.pt")
    add("--backbone-type", help="backbone name (read from config.json when there is one)")
    add("--ae-dir", type=Path, help="autoencoder weights: a file or a folder holding ae.pt")
    add("--ae-type", help="autoencoder name (read from config.json when there is one)")
    add("--classifier-dir", type=Path, help="classifier and Siamese head: a file or a folder holding classifier.pt")
    add("--dataset-dir", type=Path, help="prepared root (default: the one the model was trained on)")
    add("--split", default=SplitSource.split, type=split_name, choices=[s for s in SPLITS if s != "train"],
        help="the split to evaluate (seed_test and seed_val: all_vs_all_test and all_vs_all_val's earlier names)")
    add("--flip", action="store_true", help="average each embedding with its mirror image's")
    add("--metric", choices=("euclidean", "cosine"), default=RankingOptions.metric)
    add("--rerank", action="store_true", help="k-reciprocal re-ranking, from the embeddings, on --device")
    add("--k1", type=int, default=RankingOptions.k1, help="re-ranking: size of the k-reciprocal neighbour sets")
    add("--k2", type=int, default=RankingOptions.k2,
        help="re-ranking: neighbours averaged in its local query expansion")
    add("--lambda-value", type=float, default=RankingOptions.lambda_value,
        help="re-ranking: weight of the original distance")
    add("--aqe", action="store_true", help="average query expansion (α-weighted, as fast-reid) before ranking")
    add("--aqe-k", type=int, default=RankingOptions.aqe_k,
        help="AQE: neighbours averaged into each embedding, itself included")
    add("--aqe-alpha", type=float, default=RankingOptions.aqe_alpha, help="AQE: exponent α of the similarity weights")
    add("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the training size)")
    add("--latent-dim", type=int, default=ModelSource.latent_dim, help="latent size when no config.json says it")
    add("--batch-size", type=int, default=EmbeddingOptions.batch_size)
    add("--workers", type=int, default=EmbeddingOptions.workers)
    add("--device", default=EmbeddingOptions.device)
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
    """Parse eval.py's or topk.py's flags (both spellings), requiring a model: --result-dir or the part folders."""
    args = parser.parse_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.result_dir is None and args.backbone_dir is None:
        parser.error("give --result-dir RESULT_DIR, or --backbone_dir and --ae_dir")
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


FOLDER_UNSAFE = re.compile(r"[^\w.-]+")


def training_root(result: ResultDir | None) -> Path | None:
    """The prepared root the model was trained on, as its config.json names it."""
    return None if result is None else Path(result.flags["data"])


def dataset_root(data: SplitSource, result: ResultDir | None) -> Path:
    """The prepared root to evaluate on, checked to hold the split's manifest: --dataset-dir, else the training
    run's --data."""
    if data.dataset_dir is not None:
        root, source = Path(data.dataset_dir), "--dataset-dir"
        hint = "expected a root written by prepare.py --out, not a raw Market-1501 folder"
    else:
        root = training_root(result)
        if root is None:
            raise UserError("--dataset-dir: needed when the model folder has no config.json naming its data")
        source = f"the training data named in {result.config_path}:"
        hint = "a relative path there is read from the current folder; give --dataset-dir PREPARED_ROOT"
    manifest = manifest_path(root, data.split)
    if not manifest.is_file():
        raise UserError(f"{source} {root}: no split manifest {manifest} ({hint})")
    return root


def is_cross_domain(result: ResultDir | None, prepared: Path) -> bool:
    """Whether the evaluated root is another than the one the model was trained on."""
    trained = training_root(result)
    return trained is not None and trained.resolve() != prepared.resolve()


def data_provenance(data: SplitSource, result: ResultDir | None, prepared: Path) -> dict:
    """Both data sets a result depends on: the training root (name, format, manifest hashes from config.json) and
    the evaluated root (name, format, split, manifest hash)."""
    trained = None
    if result is not None:
        trained = {**(result.config.get("dataset") or dataset_identity(result.flags["data"])),
                   "manifests": result.config.get("manifests")}
    manifest = manifest_path(prepared, data.split)
    evaluated = {**dataset_identity(prepared), "split": data.split, "manifest": str(manifest),
                 "sha256": sha256_file(manifest)}
    return {"trained_on": trained, "evaluated_on": evaluated, "cross_domain": is_cross_domain(result, prepared)}


def result_folder(options: EvaluationOptions, result: ResultDir | None, name: str) -> Path:
    """RESULT_DIR/<name> beside the model: <name>_<data set name> on another root than the training one, then
    _<split> for splits other than test."""
    source, data = options.model, options.data
    parts = Path(source.backbone_dir) if source.backbone_dir is not None else None
    base = source.result_dir or (parts if parts.is_dir() else parts.parent)
    if data.dataset_dir is not None and is_cross_domain(result, Path(data.dataset_dir)):
        name = f"{name}_{FOLDER_UNSAFE.sub('-', dataset_identity(data.dataset_dir)['name'])}"
    return Path(base) / (name if data.split == "test" else f"{name}_{data.split}")


def output_dir(options: EvaluationOptions, result: ResultDir | None) -> Path:
    """Where eval.py's results and feature cache go: --out, else RESULT_DIR/eval (eval_<data set> cross-domain)."""
    return options.out if options.out is not None else result_folder(options, result, "eval")


def ranking_distances(found: dict[str, np.ndarray], ranking: RankingOptions,
                      device: torch.device | None = None) -> np.ndarray:
    """Query × gallery distances by the metric, after query expansion when asked, re-ranked when asked; the
    expansion and re-ranking run on `device`."""
    qf, gf = found["qf"], found["gf"]
    if ranking.aqe:
        qf, gf = average_query_expansion(qf, gf, k=ranking.aqe_k, alpha=ranking.aqe_alpha, device=device)
    if ranking.rerank:
        return re_ranking_features(qf, gf, k1=ranking.k1, k2=ranking.k2, lambda_value=ranking.lambda_value,
                                   metric=ranking.metric, device=device, progress=True)
    return embedding_distance(torch.from_numpy(qf), torch.from_numpy(gf), ranking.metric).numpy()


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


def cached_features(options: EvaluationOptions, model: ReIDModel, settings: dict, prepared: Path, cache_dir: Path,
                    flip: bool, corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features, cached as features_<split>[_flip][_c-...].npz in `cache_dir` unless the cache is off."""
    split, embedding = options.data.split, options.embedding
    name = f"features_{split}{'_flip' if flip else ''}{corruption_file_tag(corruption)}.npz"
    cache = cache_dir / name if embedding.cache else None
    return split_features(model, settings, prepared, split, flip, cache, embedding.batch_size, embedding.workers,
                          corruption)


def prepare_evaluation(options: EvaluationOptions, result: ResultDir | None, cache_dir: Path,
                       corruption: CorruptionSettings | None = None) -> EvaluationInputs:
    """Load the model (described by trained_result's `result`), embed the split (or read the cache in `cache_dir`)
    and compute the ranking distances; with `corruption`, of the corrupted split."""
    settings = model_settings(options.model, result)
    prepared, device = dataset_root(options.data, result), resolve_device(options.embedding.device)
    model = build_trained(settings, device)
    found = cached_features(options, model, settings, prepared, cache_dir, options.embedding.flip, corruption)
    return EvaluationInputs(settings, prepared, model, device, found,
                            ranking_distances(found, options.ranking, device))


def corrupted_evaluation(inputs: EvaluationInputs, options: EvaluationOptions, cache_dir: Path,
                         corruption: CorruptionSettings) -> EvaluationInputs:
    """The same model and split with the images corrupted by `corruption`: its features (cached) and distances."""
    found = cached_features(options, inputs.model, inputs.settings, inputs.prepared, cache_dir,
                            options.embedding.flip, corruption)
    return EvaluationInputs(inputs.settings, inputs.prepared, inputs.model, inputs.device, found,
                            ranking_distances(found, options.ranking, inputs.device))


def unaugmented_features(inputs: EvaluationInputs, options: EvaluationOptions, cache_dir: Path,
                         corruption: CorruptionSettings | None = None) -> dict[str, np.ndarray]:
    """The split's features (of the images corrupted by `corruption`, as `inputs` were) without test-time flipping,
    as the Siamese head is scored and ranks."""
    if not options.embedding.flip:
        return inputs.found
    return cached_features(options, inputs.model, inputs.settings, inputs.prepared, cache_dir, False, corruption)
