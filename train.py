"""Train a Siamese + autoencoder re-ID model on a prepared root with a weighted sum of losses.

Single process: python train.py --data data/prepared --backbone-name resnet50 --ae-name vae --result-dir runs/r50
Several GPUs:   torchrun --nproc_per_node=N train.py ...   (DistributedDataParallel; rank 0 writes)
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from tqdm import tqdm

import embedding
import metrics
from dashboard import Dashboard
from datasets import (
    PKSampler,
    build_transforms,
    dataset_identity,
    load_eval_records,
    load_image,
    load_train_records,
    manifest_path,
)
from degradations import to_pixels
from globalbatch import batch_record, has_sync_batch_norm, sync_batch_norm
from layouts import ImageRecord
from losses import BALANCE_MODES, SPARSITY_MODES, LossBalancer, LossWeights
from model import (
    AE_NAMES,
    AUTOENCODER_TERMS,
    EMBEDDINGS,
    PLACEMENTS,
    RECON_TARGETS,
    ReIDModel,
    check_model_choices,
    is_resnet,
    load_part_state,
    model_from_settings,
    produced_terms,
    read_state_dict,
    term_autoencoders,
    trained_settings,
)
from precision import LossScaler, autocast_dtype, has_native_bf16
from recipes import given_flags, with_recipe
from resultdir import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, part_file, save_parts
from tensor_loader import LOADERS, DecodedTrainLoader, evaluation_loader, training_loader
from trainstep import (
    LossRead,
    StepOptions,
    TrainStep,
    any_rank,
    apply_gradients,
    batch_losses,
    guard_updates,
    rewind_schedule,
)
from utils import (
    LOG,
    AverageMeter,
    UserError,
    config_record,
    hold_run_lock,
    load_torch,
    normalise_flag_spelling,
    plot_curves,
    read_json,
    resolve_device,
    run_script,
    save_image,
    save_torch,
    seed_everything,
    setup_logging,
    sha256_file,
    write_json,
    write_jsonl,
)

LOSS_TERMS = ("triplet", "id", "kl", "reconstruction", "sparsity", "bce", "consistency", "js")
# Flags that fix the model's shape, the data or the objective; a resumed run must keep them.
RESUME_LOCKED = ("data", "backbone_name", "ae_name", "latent_dim", "img_size", "last_stride", "recon_target",
                 "batch_p", "batch_k", "seed", "epochs", "balance", "degraded_views", "degrade_prob", "augmix",
                 "ae_placement", "kl_warmup",
                 "beta", "embedding", *LOSS_TERMS, "margin", "label_smoothing", "sparsity_target", "sparsity_mode",
                 "gradnorm_alpha", "lr", "lr_classifier", "lr_balance", "weight_decay", "scheduler", "milestones",
                 "warmup_epochs", "warmup_factor", "erasing", "lighting")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# checkpoint.pt's format: 2 records it, every rank's generators ("rng"), the loss balancer and every locked flag.
CHECKPOINT_FORMAT = 2
# What a locked flag that an older checkpoint lacks was trained with, where that is not today's default.
ABSENT_FLAGS = {"degraded_views": "False", "warmup_factor": "0.1", "augmix": "False", "ae_placement": "series",
                "embedding": "mu", "consistency": "0.0", "js": "0.0"}
# CIL's weight of the Jensen–Shannon term (Chen et al., 2021), the default with --augmix.
CIL_JS_WEIGHT = 12.0


def build_parser() -> argparse.ArgumentParser:
    """The flags of train.py: the original project's names, and the rest, in groups."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, help="a recipe file: YAML whose keys are these flags' names (configs/ holds the "
        "project's; a result's config.json is one too); flags given on the command line win")
    add("--data", type=Path, default=Path("data/prepared"), help="prepared root written by prepare.py")
    add("--result-dir", type=Path, default=None, help="where results go (default runs/<backbone>_<ae>)")
    for add_group in (add_model_flags, add_view_flags, add_weight_flags, add_optimisation_flags, add_loss_flags,
                      add_running_flags):
        add_group(parser)
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model's flags: backbone, autoencoder, where it sits and what is the embedding."""
    add = parser.add_argument_group("model").add_argument
    add("--backbone-name", default="resnet50", help="resnet18..152, densenet121..201, vgg11..19[_bn], swin_t/s/b, "
        "timm:<name>")
    add("--ae-name", default="sae", help=f"autoencoder: {', '.join(AE_NAMES)} (default sae as a branch, with degraded "
        "views and the mu-l2 embedding: the study's best autoencoder row, docs/results.md)")
    add("--latent-dim", type=int, default=512, help="the autoencoder's code size (ignored by --ae-name none)")
    add("--ae-placement", choices=PLACEMENTS, default="branch",
        help="where the autoencoder sits: series, its code is the embedding; branch, the embedding is the backbone "
        "feature (BoT's) and the autoencoder beside it reads that feature, only its reconstruction reaching the "
        "backbone; residual, a feature denoiser: the embedding is f + D(E(f)), drawn towards the clean view's "
        "feature by the reconstruction term; residual-apart, that denoiser trained apart, on the detached feature and "
        "by its reconstruction alone, while the triplet, identity and Siamese terms read f (ignored by --ae-name none)")
    add("--embedding", choices=EMBEDDINGS, default="mu-l2",
        help="the retrieval embedding: mu, the placement's code (series: μ of the autoencoder, the feature for none; "
        "branch: the feature; residual, residual-apart: the denoised feature); mu-bn, that code through the identity "
        "classifier's BatchNorm neck; mu-l2, the L2-normalised code, which the triplet and Siamese terms then read; "
        "mu+latent (branch), the L2-normalised code beside the autoencoder's L2-normalised μ, read by them too")
    add("--last-stride", type=int, default=1, choices=(1, 2), help="ResNet's last stride (1 keeps more detail)")
    add("--recon-target", choices=RECON_TARGETS, default="feature",
        help="what the decoder rebuilds: the backbone feature, or the input image at a quarter of its size")


def add_view_flags(parser: argparse.ArgumentParser) -> None:
    """The training views' flags: degraded or AugMix views and the consistency terms."""
    add = parser.add_argument_group("views and consistency").add_argument
    add("--degraded-views", action=argparse.BooleanOptionalAction, default=True,
        help="train on degraded views (degradations.py: blocks, lighting, box blur, noise; default on, "
        "--no-degraded-views for clean batches): every loss sees the degraded view, except that an autoencoder's "
        "reconstruction target is the clean view's feature, detached; for --ae-name none, plain augmentation")
    add("--degrade-prob", type=float, default=0.5, help="share of a batch's images degraded (--degraded-views)")
    add("--augmix", action="store_true",
        help="CIL's views in place of the degraded ones: the clean batch and two AugMix views of it (torchvision's "
        "AugMix without its brightness, colour, contrast and sharpness operations) through the model; triplet, "
        "identity and Siamese terms see the clean view, --js ties the three views' identity predictions, and an "
        "autoencoder's target is the clean view's feature")
    add("--consistency", type=float, default=0.0,
        help="weight of the feature consistency term: the mean squared distance of the degraded (or AugMix) view's "
        "backbone feature to the clean view's, held fixed (needs --degraded-views or --augmix)")
    add("--js", type=float, default=None,
        help=f"weight of the Jensen–Shannon consistency of the views' identity predictions (default {CIL_JS_WEIGHT:g}, "
        "CIL's, with --augmix; needs --augmix)")


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    """The flags naming the weights a run starts from."""
    add = parser.add_argument_group("weights to start from").add_argument
    add("--pretrained", default="imagenet",
        help="imagenet: the library's ImageNet weights (torchvision's DEFAULT, or timm's), downloaded once into its "
        "cache; a torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, ...); a state-dict file; or none")
    add("--pre-backbone", type=Path, help="backbone weights: a file or a result directory")
    add("--pre-ae", type=Path, help="autoencoder weights: a file or a result directory")
    add("--pre-classifier", type=Path, help="classifier and Siamese head weights: a file or a result directory")


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """The optimiser's, schedule's and batches' flags."""
    add = parser.add_argument_group("optimisation").add_argument
    add("--lr", type=float, default=3.5e-4, help="learning rate of backbone and autoencoder")
    add("--lr-classifier", type=float, default=3.5e-4, help="learning rate of classifier and Siamese head")
    add("--weight-decay", type=float, default=5e-4)
    add("--scheduler", choices=("cosine", "step"), default="step",
        help="step: ×0.1 at each of --milestones; cosine: down to 1%% of the learning rate at the last epoch")
    add("--milestones", type=float, nargs="*", default=[40.0, 70.0], help="epochs of the step scheduler's ×0.1 decays")
    add("--warmup-epochs", type=float, default=10.0, help="epochs of linear warm-up to the learning rate")
    add("--warmup-factor", type=float, default=0.01, help="the warm-up's first learning rate, as a share of --lr")
    add("--epochs", type=int, default=120)
    add("--max-steps", type=int, default=None, help="stop after this many steps in all (a checkpoint is kept)")
    add("--batch-p", type=int, default=16, help="identities a batch")
    add("--batch-k", type=int, default=4, help="images an identity in a batch")
    add("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    add("--erasing", type=float, default=0.5, help="random-erasing probability")
    add("--lighting", action="store_true", help="add brightness/contrast/colour jitter")


def add_loss_flags(parser: argparse.ArgumentParser) -> None:
    """The loss terms' weights and settings, and how the weights are balanced."""
    add = parser.add_argument_group("loss terms").add_argument
    add("--triplet", type=float, default=1.0, help="weight of the batch-hard triplet loss")
    add("--id", type=float, default=1.0, help="weight of the identity cross-entropy")
    add("--kl", type=float, default=1e-3, help="weight of the KL divergence (vae only)")
    add("--reconstruction", type=float, default=1.0, help="weight of the reconstruction loss")
    add("--sparsity", type=float, default=None, help="weight of the sparsity loss (default 1e-3 for sae, else 0)")
    add("--bce", type=float, default=1.0, help="weight of the Siamese binary cross-entropy")
    add("--balance", choices=BALANCE_MODES, default="fixed",
        help="fixed: the weight flags as given; uncertainty: learned log-variance s per term, weight w·exp(-s) "
        "(Kendall et al.; the flag w scales the term's whole objective); gradnorm: weights adapted so the terms' "
        "gradient norms on a shared layer train at similar rates (Chen et al.), starting from the flags rescaled "
        "to sum to the number of terms. In every mode a weight of 0 keeps its term off")
    add("--lr-balance", type=float, default=1e-2, help="learning rate of the uncertainty or GradNorm weights")
    add("--gradnorm-alpha", type=float, default=1.5, help="GradNorm's α: how hard slow terms are pushed")
    add("--margin", type=float, default=0.3, help="triplet margin (0: soft margin)")
    add("--label-smoothing", type=float, default=0.1)
    add("--sparsity-target", type=float, default=0.05, help="target mean activation ρ of the sparse code")
    add("--sparsity-mode", choices=SPARSITY_MODES, default="kl",
        help="sparsity penalty of sae's code: kl, KL(ρ‖ρ̂) summed over units; l1, the code's L1 norm")
    add("--kl-warmup", type=float, default=0.0, help="epochs over which the KL's β ramps linearly from 0 (vae)")
    add("--beta", type=float, default=1.0, help="β: the KL term's weight is --kl × β after the warm-up (vae)")


def add_running_flags(parser: argparse.ArgumentParser) -> None:
    """How the run executes: device, precision, loaders, validation, checkpoints, logging."""
    add = parser.add_argument_group("running").add_argument
    add("--amp", action="store_true", help="autocast and channels_last on CUDA: bfloat16 where the GPU has it "
        "natively, else float16 with a dynamic loss scale")
    add("--device", default="auto")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="data-loading processes (default: the cores, at most 8; a GPU step needs several)")
    add("--loader", choices=LOADERS, default="tensor",
        help="tensor: images decoded once into one uint8 tensor (on the device when it fits, else in shared "
        "memory; a set that fits neither falls back to pil with a message) and augmented a batch at a time; "
        "pil: decoded and augmented image by image in --workers processes")
    add("--compile", action="store_true", help="torch.compile the training step (forward and losses)")
    add("--compile-mode", choices=COMPILE_MODES, default="default",
        help="torch.compile's mode with --compile: reduce-overhead replays the step as CUDA graphs (one launch for "
        "its kernels, on a GPU), max-autotune-no-cudagraphs searches kernel configurations")
    add("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    add("--eval-batch", type=int, default=128)
    add("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps inside an epoch")
    add("--resume", action="store_true", help="continue the run in --result-dir from checkpoint.pt")
    add("--seed", type=int, default=0)
    add("--deterministic", action="store_true", help="deterministic kernels (slower)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
        help="under torchrun, SyncBatchNorm: BatchNorm's statistics are the global batch's (default on under torchrun "
        "on CUDA; SyncBatchNorm does not run on the CPU)")
    add("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="write TensorBoard event files under <result-dir>/tensorboard (default on)")



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; `--flag_name` and `--flag-name` are the same flag."""
    parser = build_parser()
    tokens = with_recipe(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)), parser)
    args = parser.parse_args(tokens)
    check_batch_and_schedule(parser, args)
    given = given_flags(tokens, parser)
    check_loss_inputs(parser, args, given)
    if "last_stride" in given and not is_resnet(args.backbone_name):
        parser.error(f"--last-stride: applies to ResNets (torchvision's and timm's); {args.backbone_name} is not one")
    if args.sparsity is None:
        args.sparsity = 1e-3 if "sparsity" in AUTOENCODER_TERMS.get(args.ae_name, ()) else 0.0
    check_views(parser, args, given)
    try:
        check_model_choices(args.ae_name, args.recon_target, args.embedding, args.ae_placement)
    except ValueError as err:
        parser.error(f"--embedding {args.embedding}, --ae-placement {args.ae_placement}: {err}")
    if args.result_dir is None:
        args.result_dir = Path("runs") / f"{args.backbone_name.replace(':', '_')}_{args.ae_name}"
    args.data = args.data.absolute()  # config.json names the data wherever eval.py is run from
    for name in ("lr", "lr_classifier", "lr_balance", "epochs", "batch_p", "batch_k", "latent_dim", "eval_every",
                 "eval_batch", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    if min(args.img_size) <= 0:
        parser.error(f"--img-size {' '.join(map(str, args.img_size))}: expected two positive numbers")
    for name in ("workers", "checkpoint_every", "warmup_epochs", "margin", "weight_decay", "kl_warmup", "beta"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected 0 or more")
    for name, high in (("erasing", 1.0), ("label_smoothing", 1.0), ("sparsity_target", 1.0), ("degrade_prob", 1.0)):
        if not 0 <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value from 0 to {high:g}")
    for name in LOSS_TERMS:
        if getattr(args, name) < 0:
            parser.error(f"--{name} {getattr(args, name)}: a loss weight cannot be negative")
    if not any(getattr(args, name) > 0 for name in LOSS_TERMS):
        parser.error("every loss weight is 0: nothing to train")
    if args.gradnorm_alpha < 0:
        parser.error(f"--gradnorm-alpha {args.gradnorm_alpha}: expected 0 or more")
    if args.ae_name not in AE_NAMES:
        parser.error(f"--ae-name {args.ae_name}: expected one of {', '.join(AE_NAMES)}")
    return args


def check_batch_and_schedule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A P×K batch with positives and negatives for every identity, and a schedule that fits the epochs."""
    if args.batch_k < 2:
        parser.error(f"--batch-k {args.batch_k}: expected 2 or more images an identity (the triplet and Siamese "
                     "terms need a positive pair in each batch)")
    if args.batch_p < 2:
        parser.error(f"--batch-p {args.batch_p}: expected 2 or more identities a batch (the triplet and Siamese "
                     "terms need negatives)")
    if not 0 < args.warmup_factor <= 1:
        parser.error(f"--warmup-factor {args.warmup_factor:g}: expected a share of the learning rate, above 0, "
                     "at most 1")
    late = [m for m in args.milestones if not 0 < m <= args.epochs]
    if args.scheduler == "step" and late:
        parser.error(f"--milestones {' '.join(f'{m:g}' for m in late)}: expected epochs from 1 to --epochs "
                     f"{args.epochs}; scale them with the epochs (configs/ say how), or use --scheduler cosine")


def check_loss_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """A loss weight given explicitly for a term the chosen autoencoder does not produce is an error."""
    for name in LOSS_TERMS:
        autoencoders = term_autoencoders(name)
        if name in given and getattr(args, name) > 0 and args.ae_name not in autoencoders:
            parser.error(f"--{name} {getattr(args, name):g}: --ae-name {args.ae_name} has no {name} term (it comes "
                         f"with {', '.join(autoencoders)}); leave the flag out or set it to 0")


def check_views(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """--augmix replaces the degraded views (both given is an error) and brings --js; the consistency terms need
    views to compare."""
    if args.augmix and args.degraded_views and "degraded_views" in given:
        parser.error("--augmix --degraded-views: choose one kind of views (--augmix brings CIL's in place of the "
                     "degraded ones)")
    if args.augmix:
        args.degraded_views = False
    if args.js is None:
        args.js = CIL_JS_WEIGHT if args.augmix else 0.0
    if args.js > 0 and not args.augmix:
        parser.error(f"--js {args.js:g}: the Jensen–Shannon term compares AugMix views; add --augmix or leave it out")
    if args.consistency > 0 and not (args.augmix or args.degraded_views):
        parser.error(f"--consistency {args.consistency:g}: compares a view with its clean one; it needs "
                     "--degraded-views or --augmix")
    if args.ae_name == "none" and "ae_placement" in given and args.ae_placement != "series":
        parser.error(f"--ae-placement {args.ae_placement}: places an autoencoder; --ae-name none has none")


def step_options(args: argparse.Namespace, steps_per_epoch: int = 1) -> StepOptions:
    """The training step's options from the flags, --kl-warmup's epochs as steps."""
    return StepOptions(margin=args.margin, label_smoothing=args.label_smoothing, sparsity_target=args.sparsity_target,
                       sparsity_mode=args.sparsity_mode, batch_k=args.batch_k, degraded_views=args.degraded_views,
                       degrade_prob=args.degrade_prob, augmix=args.augmix, seed=args.seed,
                       kl_warmup_steps=round(args.kl_warmup * steps_per_epoch), beta=args.beta)


def loss_weights(args: argparse.Namespace) -> LossWeights:
    """The weight flags as a LossWeights."""
    return LossWeights(**{name: getattr(args, name) for name in LOSS_TERMS})


def active_terms(weights: LossWeights, ae_name: str, recon_target: str, views: bool = False,
                 augmix: bool = False) -> dict[str, float]:
    """The terms total_loss computes for this model, with their weight flags: weighted above 0 and produced by it."""
    produced = produced_terms(ae_name, recon_target, views, augmix)
    return {name: getattr(weights, name) for name in LOSS_TERMS if getattr(weights, name) > 0 and name in produced}


def build_balancer(args: argparse.Namespace, weights: LossWeights) -> LossBalancer:
    """The --balance mode over the active terms; an error naming the flag when none is active."""
    prior = active_terms(weights, args.ae_name, args.recon_target, args.degraded_views, args.augmix)
    if not prior:
        raise UserError(f"--balance {args.balance}: no loss term is active for --ae-name {args.ae_name} "
                        "(every weight of a term it computes is 0)")
    return LossBalancer(args.balance, prior, args.gradnorm_alpha)


def shared_layer(model: ReIDModel) -> torch.Tensor:
    """GradNorm's shared weights: the autoencoder encoder's first layer (every term passes through it), or,
    without an autoencoder, the backbone's last weight matrix or kernel."""
    encoder = getattr(model.ae, "encoder", None)
    if encoder is not None:
        return encoder[0].weight
    return [p for p in model.backbone.parameters() if p.dim() >= 2][-1]


def precision_name(dtype: torch.dtype) -> str:
    """A dtype as config.json and the log name it: float32, bfloat16 or float16 (with its loss scale)."""
    return str(dtype).removeprefix("torch.")


def weight_record(balancer: LossBalancer) -> dict[str, float]:
    """The weight each active term gets now, as weight_<term>, for metrics.jsonl (float32's 7 digits)."""
    return {f"weight_{name}": float(f"{w:.7g}") for name, w in zip(balancer.names, balancer.current(), strict=True)}


# ---------------------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------------------------


def load_pretrained_parts(model: ReIDModel, args: argparse.Namespace) -> None:
    """Load --pre-backbone, --pre-ae and --pre-classifier (a file or a result directory) into their parts."""
    parts = model.parts()
    for part, flag in (("backbone", "--pre-backbone"), ("ae", "--pre-ae"), ("classifier", "--pre-classifier")):
        source = getattr(args, flag[2:].replace("-", "_"))
        if source is not None:
            path = part_file(source, part, flag)
            try:
                load_part_state(parts[part], read_state_dict(path), part)
            except (RuntimeError, ValueError) as err:
                raise UserError(f"{flag} {path}: {err}") from err
            LOG.info("loaded %s from %s", part, path)


def build_optimizer(model: ReIDModel, args: argparse.Namespace, balancer: LossBalancer,
                    scaler: LossScaler | None = None) -> torch.optim.Optimizer:
    """Adam with two groups: backbone and autoencoder at --lr, classifier and Siamese head at --lr-classifier;
    and a third, without weight decay, for learned loss weights at --lr-balance (unscaling by float16's `scaler`)."""
    parts = model.parts()
    encoder = [p for name in ("backbone", "ae") for p in parts[name].parameters() if p.requires_grad]
    heads = [p for p in parts["classifier"].parameters() if p.requires_grad]
    groups = [{"params": encoder, "lr": args.lr, "name": "lr"},
              {"params": heads, "lr": args.lr_classifier, "name": "lr_classifier"}]
    if list(balancer.parameters()):
        groups.append({"params": list(balancer.parameters()), "lr": args.lr_balance, "name": "lr_balance",
                       "weight_decay": 0.0})
    # The fused kernel updates every parameter in one launch (on the CPU too) and can skip a non-finite update.
    return guard_updates(torch.optim.Adam(groups, weight_decay=args.weight_decay, fused=True), scaler)


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str, milestone_steps: Sequence[int],
              warmup_factor: float) -> float:
    """Learning-rate multiplier at a step: linear warm-up from `warmup_factor`, then cosine to 0.01 or ×0.1 at
    each milestone step."""
    if step < warmup_steps:
        return warmup_factor + (1 - warmup_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 0.1 ** sum(step >= m for m in milestone_steps)


# ---------------------------------------------------------------------------------------------------------
# Validation, checkpoints, records
# ---------------------------------------------------------------------------------------------------------


def validate(model: ReIDModel, loader: Iterable, num_query: int, prepared: Path) -> dict[str, float]:
    """mAP, mINP and Rank-1/5 on the validation split, by metrics.py's protocol code."""
    embeddings, pids, camids = embedding.extract_features(model, loader, progress=False)
    distances = metrics.embedding_distance(embeddings[:num_query], embeddings[num_query:]).numpy()
    labels = {"q_pids": pids[:num_query], "g_pids": pids[num_query:], "q_camids": camids[:num_query],
              "g_camids": camids[num_query:]}
    result = metrics.rank_split(distances, labels, "val", prepared)
    return {"val_mAP": float(result["mAP"]), "val_mINP": float(result["mINP"]),
            "val_rank1": float(result["cmc"][0]), "val_rank5": float(result["cmc"][min(4, len(result["cmc"]) - 1)])}


def checkpoint_state(run: Run, epoch: int, batch: int, rng: list[dict]) -> dict:
    """Everything needed to continue training exactly where it stands: the epoch's running means inside an epoch,
    and each rank's random generators (`rng`, in rank order)."""
    return {"model": run.model.state_dict(), "balancer": run.balancer.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            **({"scaler": run.scaler.state_dict()} if run.scaler is not None else {}),
            "epoch": epoch, "batch": batch, "step": run.step, "history": run.history, "best": run.best,
            "meters": {name: [m.total, m.count] for name, m in (run.meters if batch else {}).items()},
            "flags": {k: str(getattr(run.args, k)) for k in (*RESUME_LOCKED, "loader")}, "rng": rng,
            "format": CHECKPOINT_FORMAT}


def rng_state(device: torch.device) -> dict:
    """This process's random generators: the CPU's, and its CUDA device's when it trains on one."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def gathered_rng_states(device: torch.device, world: int) -> list[dict]:
    """Every rank's rng_state in rank order (in a distributed run, every rank calls this together)."""
    if world == 1:
        return [rng_state(device)]
    states: list = [None] * world
    dist.all_gather_object(states, rng_state(device))
    return states


def restore_rng(saved: list[dict], rank: int, world: int, device: torch.device) -> None:
    """This rank's generators as the checkpoint saved them (a checkpoint of another world size: the last rank's)."""
    if len(saved) != world:
        LOG.warning("--resume: the run was saved by %d processes and continues in %d on the same global batch (the "
                    "sampler, augmentation, degraded views and Siamese pairs draw it whatever their number); the "
                    "model's own random draws (a VAE's sample, a DAE's noise) differ from an uninterrupted run's",
                    len(saved), world)
    own = saved[min(rank, len(saved) - 1)]
    torch.set_rng_state(own["cpu"])
    if own["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], device)


def upgrade_checkpoint(state: dict, config_path: Path, world: int, device: torch.device,
                       balancer_state: dict) -> dict:
    """Any checkpoint train.py has written, in CHECKPOINT_FORMAT: a locked flag it does not record as the run's
    config.json does, else at the value runs had before the flag existed (today's default, or ABSENT_FLAGS'); a
    format-1 checkpoint's generators (rank 0's) for every rank, and its --data (saved as typed) made absolute; a
    balancer from before the balancing, untrained."""
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise UserError(f"--resume {config_path.parent / CHECKPOINT_FILE}: written in checkpoint format "
                        f"{state['format']}, newer than this train.py's {CHECKPOINT_FORMAT}; update the code")
    recorded = read_json(config_path).get("flags", {}) if config_path.is_file() else {}
    defaults = {k: str(v) for k, v in vars(build_parser().parse_args([])).items()} | ABSENT_FLAGS
    flags = {k: str(recorded[k]) if k in recorded else defaults[k] for k in RESUME_LOCKED} | state["flags"]
    flags["data"] = str(Path(flags["data"]).absolute())
    rng = state.get("rng")
    if rng is None:
        devices = state["rng_cuda"]
        cuda = devices[device.index or 0] if device.type == "cuda" and len(devices) > (device.index or 0) else None
        rng = [{"cpu": state["rng_cpu"], "cuda": cuda}] * world
    return {**state, "flags": flags, "rng": rng, "balancer": state.get("balancer", balancer_state),
            "format": CHECKPOINT_FORMAT}


def restore_checkpoint(path: Path, run: Run, rank: int) -> dict:
    """Load a checkpoint into the run's model, loss weights, optimiser, scheduler and this rank's generators; refuse
    one made with other model, data or training flags (upgrade_checkpoint fills those an older one lacks)."""
    args, model, balancer, optimizer, scheduler = run.args, run.model, run.balancer, run.optimizer, run.scheduler
    state = upgrade_checkpoint(load_torch(path), path.parent / CONFIG_FILE, run.world, run.device,
                               balancer.state_dict())
    saved = state["flags"]
    if state["flags"].get("loader", args.loader) != args.loader:
        LOG.warning("--resume: the run trained with --loader %s and continues with %s; its batches are augmented "
                    "by another stream from here", state["flags"]["loader"], args.loader)
    changed = [k for k in RESUME_LOCKED if saved[k] != str(getattr(args, k))]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} was {saved[k]}" for k in changed)
        raise UserError(f"--resume {path}: the run was started with other flags ({detail})")
    try:
        model.load_state_dict(state["model"])
        balancer.load_state_dict(state["balancer"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines())[:300]
        raise UserError(f"--resume {path}: the checkpoint does not fit this run ({detail})") from err
    scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], rank, run.world, run.device)
    return state


@torch.no_grad()
def write_recon_grid(model: ReIDModel, records: Sequence[ImageRecord], img_size: tuple[int, int], device: torch.device,
                     path: Path) -> torch.Tensor:
    """recon.png: a row of inputs (at the reconstruction's size) above a row of their reconstructions; returns the
    grid drawn, (3, H, W) from 0 to 1."""
    model.eval()
    transform = build_transforms(img_size, False)
    images = torch.stack([transform(load_image(r.path)) for r in records]).to(device)
    out = model(images)
    pixels = to_pixels(torch.cat([out["recon_target"], out["recon"]]).float())
    grid = torchvision.utils.make_grid(pixels, nrow=len(records), padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    save_image(Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")), path)
    model.train()
    return grid


def parameter_checksum(model: nn.Module) -> float:
    """A float summary of every parameter, to check that replicas agree."""
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


def manifest_hashes(prepared: Path) -> dict[str, str]:
    """SHA-256 of the manifests a run trains and validates on."""
    return {split: sha256_file(manifest_path(prepared, split)) for split in ("train", "val")}


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request to checkpoint after the current step and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Run:
    """A training run's state between its parts: what setup builds, and what each epoch and its bookkeeping change."""

    args: argparse.Namespace
    device: torch.device
    world: int
    writer: bool
    result_dir: Path
    records: list
    model: ReIDModel
    precision: torch.dtype
    sampler: PKSampler
    loader: Iterable
    val_loader: Iterable | None
    val_records: list
    num_query: int
    balancer: LossBalancer
    optimizer: torch.optim.Optimizer
    scaler: LossScaler | None
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_step: TrainStep
    step_module: nn.Module
    steps_per_epoch: int
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_mAP": -1.0})
    start_epoch: int = 1
    start_batch: int = 0
    step: int = 0
    resumed_meters: dict = field(default_factory=dict)
    meters: dict[str, AverageMeter] = field(default_factory=dict)
    started: float = 0.0
    epoch_started: float = 0.0
    images_seen: int = 0
    stop_asked: bool = False
    lock: IO | None = None  # result_dir's lock, held by rank 0 for the run
    dashboard: Dashboard | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.result_dir / CHECKPOINT_FILE

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        """checkpoint.pt at (epoch, batch), written by rank 0; every rank calls it together (their generators'
        states are gathered into it)."""
        rng = gathered_rng_states(self.device, self.world)
        if self.writer:
            save_torch(checkpoint_state(self, epoch, batch, rng), self.checkpoint_path)


def start_process(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device): the process group under torchrun, the device, the seeds."""
    rank, world, local_rank = distributed_context()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    seed_everything(args.seed, args.deterministic)
    return rank, world, device


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> tuple[ReIDModel, torch.dtype]:
    """The model with its --pre-* parts on the device, and the dtype its step computes in (autocast_dtype)."""
    try:
        model = model_from_settings(trained_settings(vars(args), {}, num_classes), num_classes, args.pretrained)
    except ValueError as err:
        raise UserError(f"--backbone-name {args.backbone_name}: {err}") from err
    load_pretrained_parts(model, args)
    precision = autocast_dtype(args.amp, device.type, has_native_bf16(device))
    if args.amp and precision == torch.float32:
        LOG.info("--amp needs CUDA; training in float32 on %s", device)
    elif precision == torch.float16:
        LOG.info("--amp: %s has no native bfloat16; float16 autocast with a dynamic loss scale", device)
    model.to(device, memory_format=torch.preserve_format if precision == torch.float32 else torch.channels_last)
    return model, precision


def build_step_module(train_step: TrainStep, args: argparse.Namespace, world: int, device: torch.device) -> nn.Module:
    """The TrainStep, wrapped in DistributedDataParallel under torchrun, compiled with --compile."""
    step_module: nn.Module = train_step
    weights = train_step.weights
    if world > 1:
        unused = (any(getattr(weights, name) == 0 for name in LOSS_TERMS) or args.ae_name == "none"
                  or args.recon_target == "image" or args.balance == "gradnorm")  # GradNorm's w get no backward
        if sync_batch_norm(args.sync_bn, world, device):
            nn.SyncBatchNorm.convert_sync_batchnorm(train_step)  # in place: the same parameters and buffers
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    return torch.compile(step_module, mode=args.compile_mode) if args.compile else step_module


def setup_run(args: argparse.Namespace) -> Run:
    """Everything a run needs before its first epoch: data, model, optimiser, schedule, and a resumed state."""
    rank, world, device = start_process(args)
    result_dir, writer = Path(args.result_dir), rank == 0
    lock = hold_run_lock(result_dir) if writer else None
    checkpoint_path = result_dir / CHECKPOINT_FILE
    if checkpoint_path.exists() and not args.resume:
        raise UserError(f"--result-dir {result_dir}: holds a run already; pass --resume to continue it "
                        "or choose another --result-dir")
    if args.resume and not checkpoint_path.exists():
        raise UserError(f"--resume: no {CHECKPOINT_FILE} in {result_dir} to continue from")
    records, num_classes = load_train_records(args.data)
    val_query, val_gallery = load_eval_records(args.data, "val")
    img_size = tuple(args.img_size)
    model, precision = build_model(args, num_classes, device)
    sampler = PKSampler([r.label for r in records], args.batch_p, args.batch_k, seed=args.seed, rank=rank,
                        world_size=world)
    progress = writer and not args.quiet
    loader = training_loader(args.loader, records, sampler, img_size, args.erasing, args.lighting, args.workers,
                             device, progress)
    val_records = val_query + val_gallery
    val_loader = evaluation_loader(args.loader, val_records, img_size, args.eval_batch, args.workers, device,
                                   progress) if writer and val_query else None
    args.loader = "tensor" if isinstance(loader, DecodedTrainLoader) else "pil"  # as used, after any fallback
    weights = loss_weights(args)
    balancer = build_balancer(args, weights).to(device)
    scaler = LossScaler(device) if precision == torch.float16 else None
    optimizer = build_optimizer(model, args, balancer, scaler)
    steps_per_epoch, total_steps = len(sampler), len(sampler) * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    milestone_steps = [round(m * steps_per_epoch) for m in args.milestones]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps, warmup, args.scheduler, milestone_steps, args.warmup_factor))
    train_step = TrainStep(model, weights, balancer, step_options(args, steps_per_epoch))
    run = Run(args, device, world, writer, result_dir, records, model, precision, sampler, loader, val_loader,
              val_records, len(val_query), balancer, optimizer, scaler, scheduler,
              train_step, build_step_module(train_step, args, world, device), steps_per_epoch, lock=lock)
    if args.resume:
        state = restore_checkpoint(checkpoint_path, run, rank)
        run.start_epoch, run.start_batch, run.step, run.history, run.best = (
            state["epoch"], state["batch"], state["step"], state["history"], state["best"])
        run.resumed_meters = state["meters"]
        LOG.info("resumed %s at epoch %d, batch %d (step %d)", result_dir, run.start_epoch, run.start_batch, run.step)
    if writer:
        write_run_config(run, num_classes, weights)
    return run


def write_run_config(run: Run, num_classes: int, weights: LossWeights) -> None:
    """config.json, the run's opening line in the log, and on a fresh run the untrained model's validation."""
    args, model = run.args, run.model
    run.result_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.result_dir / CONFIG_FILE, config_record(
        args, num_classes=num_classes, train_images=len(run.records), world_size=run.world, device=str(run.device),
        manifests=manifest_hashes(Path(args.data)), dataset=dataset_identity(args.data), loss_weights=vars(weights),
        global_batch=batch_record(args.batch_p, args.batch_k, run.world, has_sync_batch_norm(model)),
        parameters={name: sum(p.numel() for p in m.parameters()) for name, m in model.parts().items()},
        feat_dim=model.feat_dim, embed_dim=model.embed_dim, precision=precision_name(run.precision)))
    LOG.info("%s + %s, %d identities, %d images, %d steps an epoch on %s in %s (world %d); config in %s",
             args.backbone_name, args.ae_name, num_classes, len(run.records), run.steps_per_epoch, run.device,
             precision_name(run.precision), run.world, run.result_dir / CONFIG_FILE)
    if not args.resume and run.val_loader is not None:
        model.eval()
        untrained = validate(model, run.val_loader, run.num_query, args.data)
        run.history.append({"epoch": 0, "step": 0, **untrained, **weight_record(run.balancer)})
        LOG.info("untrained: val mAP %.4f Rank-1 %.4f", run.history[0]["val_mAP"], run.history[0]["val_rank1"])


def train_epoch(run: Run, epoch: int, stop: StopRequest, shared: torch.Tensor) -> bool:
    """One epoch of steps (from the resumed batch in the first); True when a stop request or --max-steps ended it
    inside the epoch. A stop request reaches every rank with a step's flags, so all stop at the same step."""
    args = run.args
    run.epoch_started = time.time()
    run.sampler.set_epoch(epoch, run.start_batch if epoch == run.start_epoch else 0)
    run.model.train()
    run.meters = {name: AverageMeter() for name in ("loss", *LOSS_TERMS)}
    if args.resume and epoch == run.start_epoch:
        for name, (total_value, count) in run.resumed_meters.items():
            run.meters[name].total, run.meters[name].count = total_value, count
    batch_index = run.steps_per_epoch - len(run.sampler)
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=args.quiet or not run.writer,
               initial=batch_index, total=run.steps_per_epoch, leave=False)
    previous: LossRead | None = None
    for images, labels, _, _ in bar:
        run.train_step.step = run.step
        total, terms = batch_losses(run.step_module, images, labels, run.device, run.precision)
        read = apply_gradients(total, terms, run.balancer, run.optimizer, run.scheduler, shared, stop.requested,
                               run.scaler)
        read.step, read.batch, read.images = run.step, batch_index, images.shape[0]
        run.step, batch_index, run.images_seen = run.step + 1, batch_index + 1, run.images_seen + images.shape[0]
        asked = settle(run, previous, epoch)  # the step before: finished on the device while this one was queued
        previous = read
        if run.meters["loss"].count:  # the first step of an epoch is read with the second
            bar.set_postfix(loss=f"{run.meters['loss'].mean:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        stopping = asked or (args.max_steps is not None and run.step >= args.max_steps)
        if stopping or (args.checkpoint_every and run.step % args.checkpoint_every == 0
                        and batch_index < run.steps_per_epoch):
            stopping = settle(run, previous, epoch) or stopping
            previous = None
            run.save_checkpoint(epoch, batch_index)
        if stopping:
            LOG.info("stopped at step %d (epoch %d, batch %d); --resume continues", run.step, epoch, batch_index)
            return True
    run.stop_asked = settle(run, previous, epoch)
    bar.close()
    return False


def non_finite_what(values: dict[str, float], epoch: int, read: LossRead) -> str:
    """What was not finite at a skipped step: the first non-finite term (or the total), else the gradient."""
    where = f"at epoch {epoch}, step {read.step} (batch {read.batch})"
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return f"gradient {where} with finite losses"
    name = next((n for n in bad if n != "loss"), "loss")
    return f"loss {where}: term '{name}' = {values[name]}"


def non_finite_buffers(run: Run) -> list[str]:
    """The floating-point buffers (batch norm's running statistics, GradNorm's L₀) not finite on some rank."""
    named = [(prefix + name, buffer) for prefix, part in (("", run.model), ("balancer.", run.balancer))
             for name, buffer in part.named_buffers() if buffer.is_floating_point()]
    flags = any_rank(torch.stack([(~torch.isfinite(buffer).all()).float() for _, buffer in named]))
    return [name for (name, _), bad in zip(named, flags.tolist(), strict=True) if bad]


def settle(run: Run, read: LossRead | None, epoch: int) -> bool:
    """A queued step's loss values into the epoch's meters, and whether any rank was asked to stop by then. If its
    update was skipped (a non-finite loss or gradient), checkpoint the last good state, which the skip kept (unless
    a forward pass left a buffer non-finite: then the last checkpoint stays), and stop naming the step and term."""
    if read is None:
        return False
    values, skipped, asked = read.result()
    if skipped:
        run.step = read.step
        rewind_schedule(run.scheduler, read.step)
        what = non_finite_what(values, epoch, read)
        bad = non_finite_buffers(run)
        if bad:
            others = f" and {len(bad) - 1} other buffers" if len(bad) > 1 else ""
            last = (f"--resume continues from the last one, {run.checkpoint_path}" if run.checkpoint_path.exists()
                    else "none was saved before it, so the run has to start again")
            raise UserError(f"non-finite {what}; the update was skipped, but {bad[0]}{others} went non-finite too, "
                            f"so no checkpoint was written ({last})")
        run.save_checkpoint(epoch, read.batch)
        raise UserError(f"non-finite {what}; the update was skipped and the last good state is in "
                        f"{run.checkpoint_path}")
    for name, value in values.items():
        run.meters[name].update(value, read.images)
    if run.dashboard is not None:
        run.dashboard.losses(values, read.step + 1)
    return asked


def end_epoch(run: Run, epoch: int) -> None:
    """The epoch's row (means, learning rates, speed, validation), the best parts, metrics, plots, checkpoint."""
    args, model = run.args, run.model
    row = {"epoch": epoch, "step": run.step, **{n: m.mean for n, m in run.meters.items() if m.count},
           **{group["name"]: group["lr"] for group in run.optimizer.param_groups},
           "images_per_s": run.images_seen / max(time.time() - run.started, 1e-9),
           "epoch_seconds": time.time() - run.epoch_started, **weight_record(run.balancer),
           **({"loss_scale": run.scaler.state_dict()["scale"]} if run.scaler is not None else {})}
    if run.val_loader is not None and (epoch % args.eval_every == 0 or epoch == args.epochs):
        model.eval()
        row.update(validate(model, run.val_loader, run.num_query, args.data))
    run.history.append(row)
    if run.writer:
        if run.val_loader is None or row.get("val_mAP", -1.0) > run.best["val_mAP"]:  # without validation, the last
            run.best = {"epoch": epoch, "val_mAP": row.get("val_mAP", -1.0), "val_rank1": row.get("val_rank1")}
            save_parts(model.parts(), run.result_dir)
        write_jsonl(run.result_dir / METRICS_FILE, run.history)
        if run.dashboard is not None:
            run.dashboard.epoch(row, run.images_seen)
        if args.recon_target == "image":
            grid = write_recon_grid(model, (run.val_records or run.records)[:8], tuple(args.img_size), run.device,
                                    run.result_dir / "recon.png")
            if run.dashboard is not None:
                run.dashboard.image("reconstruction", grid, run.step)
        plot_curves(run.history, ["loss", *LOSS_TERMS, "val_mAP", "val_rank1", "lr"], run.result_dir / "losses.png",
                    f"{args.backbone_name} + {args.ae_name}")
        plot_curves(run.history, [f"weight_{name}" for name in run.balancer.names], run.result_dir / "weights.png",
                    f"loss weights ({args.balance})")
        LOG.info("epoch %d: loss %.4f%s", epoch, row["loss"], f", val mAP {row['val_mAP']:.4f} Rank-1 "
                 f"{row['val_rank1']:.4f}" if "val_mAP" in row else "")
    run.save_checkpoint(epoch + 1, 0)


def train(args: argparse.Namespace) -> dict:
    """Train as the flags say; return the run's summary (also written to summary.json)."""
    run = setup_run(args)
    run.started = time.time()
    shared = shared_layer(run.model)
    if args.max_steps is not None and run.step >= args.max_steps:
        LOG.info("already at step %d, --max-steps %d: nothing to train", run.step, args.max_steps)
        return {"stopped_at_step": run.step}
    stop = StopRequest()
    run.dashboard = open_dashboard(run)
    try:
        for epoch in range(run.start_epoch, args.epochs + 1):
            if train_epoch(run, epoch, stop, shared):
                return {"stopped_at_step": run.step}
            end_epoch(run, epoch)
            if run.stop_asked and epoch < args.epochs:  # asked in the epoch's last step: stop at its checkpoint
                LOG.info("stopped at step %d (end of epoch %d); --resume continues", run.step, epoch)
                return {"stopped_at_step": run.step}
    finally:
        stop.restore()
        if run.dashboard is not None:
            run.dashboard.close()
    return finish(run.model, run.history, run.best, run.result_dir, run.started, run.images_seen, run.world,
                  run.writer)


def open_dashboard(run: Run) -> Dashboard | None:
    """Rank 0's TensorBoard writer with --tensorboard, else None; a fresh run's untrained validation goes in first."""
    if not (run.writer and run.args.tensorboard):
        return None
    dashboard = Dashboard(run.result_dir, [group["name"] for group in run.optimizer.param_groups],
                          run.step if run.args.resume else None)
    if not run.args.resume:
        for row in run.history:
            dashboard.epoch(row, run.images_seen)
    return dashboard


def finish(model: nn.Module, history: list[dict], best: dict, result_dir: Path, started: float, images_seen: int,
           world: int, writer: bool) -> dict:
    """Write summary.json (in a distributed run, with every rank's parameter checksum) and return it."""
    summary = {"best_epoch": best["epoch"], "best_val_mAP": best["val_mAP"], "best_val_rank1": best.get("val_rank1"),
               "untrained_val_mAP": history[0].get("val_mAP") if history and history[0]["epoch"] == 0 else None,
               "seconds": time.time() - started, "images_per_s": images_seen / max(time.time() - started, 1e-9)}
    if world > 1:
        checksums = [None] * world
        dist.all_gather_object(checksums, parameter_checksum(model))
        summary["rank_checksums"] = checksums
    if writer:
        write_json(result_dir / SUMMARY_FILE, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    summary = train(args)
    if "best_val_mAP" in summary and summary["best_val_mAP"] >= 0:
        LOG.info("best validation mAP %.4f Rank-1 %.4f at epoch %d (untrained mAP %s); results in %s",
                 summary["best_val_mAP"], summary["best_val_rank1"], summary["best_epoch"],
                 f"{summary['untrained_val_mAP']:.4f}" if summary["untrained_val_mAP"] is not None else "n/a",
                 args.result_dir)
    return summary


if __name__ == "__main__":
    try:
        run_script(main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
