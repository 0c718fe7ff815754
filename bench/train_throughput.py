"""Training throughput: our training step against the bare backbone's, on the same device in the same run.

python bench/train_throughput.py                      # CPU: resnet50 + vae, 16×4 batches at 128×64
python bench/train_throughput.py --device cuda        # 256×128, bf16 autocast and channels_last as train.py --amp
python bench/train_throughput.py --device cuda -- --balance gradnorm --bce 0    # any other train.py flag

Rows, each as images/s and ms a step over --steps timed steps after --warmup untimed ones. The rows take turns for
--rounds rounds, each round starting one row later than the last, as the host's speed drifts (notably on shared
GPU machines); a row's figure is its median round, and ours/bare the median of the rounds' ratios (each round's
bare time over ours), with their spread beside it:
  bare backbone    the reference: the backbone (same name and last stride as ours) with a linear layer to the
                   identities, cross-entropy, backward and Adam (fused, as ours), on one preloaded random P×K batch
  ours, tensors    ReIDModel + train.py's TrainStep (every loss term the flags switch on) and train.py's step
                   (backward, the finite check, Adam, schedule, all queued; the losses read a step late, as
                   train.py reads them), on the same preloaded batch
  ours, pipeline   the same step fed by train.py's loader (--loader, default tensor: the set decoded once, each
                   batch augmented at once; pil: JPEG decoding and the transforms in --workers processes), from a
                   synthetic Market-format set at Market's own 128×64 (generated once into data/, then reused, unless
                   --data names a prepared root)
  loader alone     that loader's batches with no model: how fast data loading can go
  ours, compiled   with --compile-row: ours on the preloaded batch with train.py's --compile (its own model; the
                   compilation happens in its first warm-up step), so compiled and eager meet in one run
The ratios are ours over the bare backbone's images/s; the target is 0.95 for "ours, pipeline" on this project's
2-core CPU machine. The step trains on clean batches (train.py's default degraded views add a second backbone
pass, a modelling choice rather than overhead); train.py's flags go after `--`: `-- --loader pil`, `-- --compile`,
`-- --degraded-views`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare  # noqa: E402
import train  # noqa: E402
from datasets import PKSampler, load_train_records  # noqa: E402
from model import ReIDModel, build_backbone  # noqa: E402
from synthetic import SyntheticConfig  # noqa: E402
from tensor_loader import DecodedTrainLoader, training_loader  # noqa: E402
from trainstep import LossRead, TrainStep, apply_gradients, batch_losses  # noqa: E402
from utils import UserError, resolve_device, rotated, run_script, seed_everything  # noqa: E402

# Per device: image size, timed steps, warm-up steps, rounds and synthetic training identities. CPU's are short
# rounds, many of them (about seven minutes on 2 idle cores): one step's time varies by ±10 % on an idle machine,
# so 5 rounds left the ratios' median uncertain by ±0.03 and 12 bring that to ±0.01–0.03; CUDA's set has
# Market's 751 identities, so epochs are as long (about 190 batches) and the loader's refill at each epoch's start
# weighs as little as in real training.
DEVICE_DEFAULTS = {"cpu": ((128, 64), 3, 1, 12, 100), "cuda": ((256, 128), 50, 10, 3, 751)}
TARGET_RATIO = 0.95
BENCH_DATA = Path(__file__).resolve().parents[1] / "data"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The benchmark's flags, and train.py's flags built from them (unknown flags go to train.py's parser)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--backbone", default="resnet50", help="backbone name, as train.py's --backbone-name")
    add("--ae", default="vae", help="autoencoder, as train.py's --ae-name")
    add("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default 128 64 on CPU, 256 128 on CUDA)")
    add("--batch", type=int, nargs=2, default=(16, 4), metavar=("P", "K"), help="identities × images a batch")
    add("--steps", type=int, help="timed steps a row a round (default 3 on CPU, 50 on CUDA)")
    add("--warmup", type=int, help="untimed steps before each row a round (default 1 on CPU, 10 on CUDA)")
    add("--rounds", type=int, help="rounds of all rows, interleaved; each row's figure is its median round "
        "(default 12 on CPU, 3 on CUDA)")
    add("--workers", type=int, default=train.build_parser().get_default("workers"),
        help="data-loading processes (default: train.py's, the cores up to 8)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--no-amp", action="store_true", help="on CUDA, float32 instead of train.py --amp's bf16 and channels_last")
    add("--data", type=Path, help="a prepared root to load from (default: a synthetic set, generated once into "
        "data/bench-train<ids>-seed<seed>/ and reused)")
    add("--train-ids", type=int, help="identities of that synthetic set (default 100 on CPU, 751 on CUDA)")
    add("--compile-row", action="store_true",
        help="add a row 'ours, compiled': the step on the preloaded batch with --compile, beside the eager rows")
    add("--seed", type=int, default=0)
    add("--json", type=Path, help="also write the figures to this file")
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    device = resolve_device(args.device)
    size, steps, warmup, rounds, train_ids = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.device = device
    args.img_size = tuple(args.img_size or size)
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.train_ids = args.train_ids or train_ids
    args.rounds = args.rounds or rounds
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be positive, --warmup not negative")
    amp = ["--amp"] if device.type == "cuda" and not args.no_amp else []
    train_args = train.parse_args(
        ["--backbone-name", args.backbone, "--ae-name", args.ae, "--img-size", *map(str, args.img_size),
         "--batch-p", str(args.batch[0]), "--batch-k", str(args.batch[1]), "--workers", str(args.workers),
         "--device", str(device), "--seed", str(args.seed), "--pretrained", "none", "--no-degraded-views", *amp, *rest])
    return args, train_args


def synthetic_prepared(folder: Path, train_ids: int, seed: int) -> Path:
    """A synthetic Market-format set at Market's 128×64, prepared without validation identities; made once (the
    folder's name fixes the settings, and prepare writes prepare.json last), then reused without checking it again."""
    if not (folder / "prepared" / "prepare.json").is_file():
        config = SyntheticConfig(train_ids=train_ids, test_ids=2, distractors=0, junk=0, seed=seed)
        prepare.ensure_synthetic(folder / "raw", config, progress=False, workers=prepare.DEFAULT_WORKERS)
        prepare.prepare(folder / "raw", folder / "prepared", copy=False, val_ids=0, test_share=0.6, seed=seed)
    return folder / "prepared"


def endless(loader, sampler: PKSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches epoch after epoch, as train.py draws them."""
    epoch = 0
    while True:
        epoch += 1
        sampler.set_epoch(epoch)
        for images, labels, _, _ in loader:
            yield images, labels


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step` after `warmup` untimed ones, the device's queue drained at both ends."""
    for _ in range(warmup):
        step()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def bare_backbone_step(args, train_args, num_classes: int, images: torch.Tensor, labels: torch.Tensor,
                       use_amp: bool) -> Callable[[], None]:
    """The reference: backbone, a linear layer to the identities, cross-entropy, backward, Adam."""
    backbone, dim = build_backbone(train_args.backbone_name, last_stride=train_args.last_stride,
                                   img_size=args.img_size)
    net = nn.Sequential(backbone, nn.Linear(dim, num_classes)).to(
        args.device, memory_format=torch.channels_last if use_amp else torch.preserve_format)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=train_args.lr, weight_decay=train_args.weight_decay, fused=True)

    def step() -> None:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def our_step(args, train_args, num_classes: int, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
             use_amp: bool, active: set[str]) -> Callable[[], None]:
    """train.py's model, TrainStep, optimiser and schedule, and the body of its training loop; the names of the
    loss terms computed are added to `active`."""
    device = args.device
    model = ReIDModel(train_args.backbone_name, train_args.ae_name, num_classes, latent_dim=train_args.latent_dim,
                      last_stride=train_args.last_stride, img_size=args.img_size,
                      recon_target=train_args.recon_target)
    model.to(device, memory_format=torch.channels_last if use_amp else torch.preserve_format)
    model.train()
    weights = train.loss_weights(train_args)
    balancer = train.build_balancer(train_args, weights).to(device)
    optimizer = train.build_optimizer(model, train_args, balancer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: train.lr_factor(
        s, 10**6, 0, train_args.scheduler, [], 1.0))
    train_step = TrainStep(model, weights, balancer, train.step_options(train_args))
    step_module = train.build_step_module(train_step, train_args, 1, device)
    shared = train.shared_layer(model)
    queued: list[LossRead] = []

    def step() -> None:
        images, labels = batches()
        total, terms = batch_losses(step_module, images, labels, device,
                                    torch.bfloat16 if use_amp else torch.float32)
        read = apply_gradients(total, terms, balancer, optimizer, scheduler, shared)
        if queued:  # the step before, read as train.py reads it: one step late, with no wait
            values, skipped, _ = queued.pop().result()
            if skipped:
                raise UserError(f"non-finite loss or gradient in the benchmark: {values}")
        queued.append(read)
        active.update(terms)

    return step


def paired_ratio(reference: list[float], seconds: list[float]) -> dict:
    """A row's speed over a reference's, round by round (the reference's seconds over the row's): the median, the
    sample spread and each round's."""
    ratios = [ref / row for ref, row in zip(reference, seconds, strict=True)]
    return {"median": statistics.median(ratios), "std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "each_round": ratios}


def row_figures(rounds: dict[str, list[float]], batch: int, steps: int) -> dict[str, dict]:
    """Each row's median round as images/s and ms a step, and ours/bare as the median and spread of the rounds'
    ratios (the bare row's seconds over the row's, round by round)."""
    figures = {}
    for name, seconds in rounds.items():
        ratio = paired_ratio(rounds["bare backbone"], seconds)
        median = statistics.median(seconds)
        figures[name] = {"seconds": median, "ms_per_step": median / steps * 1e3,
                         "images_per_s": batch * steps / median, "ratio_to_bare": ratio["median"],
                         "ratio_std": ratio["std"], "ratio_each_round": ratio["each_round"],
                         "seconds_each_round": seconds}
    return figures


def measure(args, train_args) -> dict:
    """Every row's seconds a round (the rows interleaved, each round in a rotated order), on one device, in one run."""
    seed_everything(args.seed)
    use_amp = train_args.amp and args.device.type == "cuda"
    prepared = args.data or synthetic_prepared(BENCH_DATA / f"bench-train{args.train_ids}-seed{args.seed}",
                                               args.train_ids, args.seed)
    records, num_classes = load_train_records(prepared)
    print(f"  training set: {len(records)} images of {num_classes} identities", flush=True)
    p, k = args.batch
    images = torch.randn(p * k, 3, *args.img_size, device=args.device)
    if use_amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(p, device=args.device).repeat_interleave(k)
    sampler = PKSampler([r.label for r in records], p, k, seed=args.seed)
    active: set[str] = set()
    source: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {}
    ours = our_step(args, train_args, num_classes, lambda: source["batch"](), use_amp, active)
    steps = {"bare backbone": bare_backbone_step(args, train_args, num_classes, images, labels, use_amp),
             "ours, tensors": ours, "ours, pipeline": ours, "loader alone": lambda: source["batch"]()}
    if args.compile_row:
        compiled = argparse.Namespace(**{**vars(train_args), "compile": True})
        steps["ours, compiled"] = our_step(args, compiled, num_classes, lambda: (images, labels), use_amp, active)
    rows: dict[str, list[float]] = {name: [] for name in steps}

    def fresh_loader():
        return training_loader(train_args.loader, records, sampler, args.img_size, train_args.erasing,
                               train_args.lighting, args.workers, args.device, progress=False)

    # The decoded set is decoded once and its loader reused (it prefetches nothing); the PIL loader's worker
    # processes are made afresh for each row, so no batches are prefetched while other rows run.
    first = fresh_loader()
    decoded_loader = first if isinstance(first, DecodedTrainLoader) else None
    for round_ in range(args.rounds):
        for name in rotated(list(steps), round_):
            loader = (decoded_loader or fresh_loader()) if name in ("ours, pipeline", "loader alone") else None
            stream = endless(loader, sampler) if loader is not None else None
            source["batch"] = (lambda s=stream: next(s)) if stream else (lambda: (images, labels))
            rows[name].append(timed(steps[name], args.warmup, args.steps, args.device))
            if stream:
                stream.close()
            print(f"  round {round_ + 1}: {name:<15} {rows[name][-1] / args.steps * 1e3:9.1f} ms a step",
                  flush=True)
    return {
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "backbone": train_args.backbone_name, "ae": train_args.ae_name,
        "img_size": list(args.img_size), "batch": [p, k], "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "workers": args.workers, "loader": train_args.loader, "compile": train_args.compile,
        "amp_bf16_channels_last": use_amp, "train_images": len(records),
        "loss_terms": {n: w for n, w in vars(train.loss_weights(train_args)).items() if n in active},
        "last_stride": train_args.last_stride, "rows": row_figures(rows, p * k, args.steps),
        "compiled_over_eager": paired_ratio(rows["ours, tensors"], rows["ours, compiled"]) if args.compile_row
        else None,
    }


def main(argv: list[str] | None = None) -> None:
    args, train_args = parse_args(argv)
    print(f"{train_args.backbone_name} + {train_args.ae_name}, batch "
          f"{args.batch[0]}×{args.batch[1]} at {args.img_size[0]}×{args.img_size[1]}, {args.steps} timed steps "
          f"after {args.warmup}, median of {args.rounds} round(s), --loader {train_args.loader}, "
          f"{args.workers} workers, on {args.device}", flush=True)
    result = measure(args, train_args)
    terms = ", ".join(f"{n} {w:g}" for n, w in result["loss_terms"].items())
    print(f"\n{result['device']}, {result['torch_threads']} torch threads, "
          f"{'bf16 autocast + channels_last' if result['amp_bf16_channels_last'] else 'float32'}; loss terms {terms}")
    print(f"  {'':<15} {'images/s':>9} {'ms/step':>9} {'ours/bare (± round spread)':>27}")
    for name, row in result["rows"].items():
        ratio = f"{row['ratio_to_bare']:10.3f} ± {row['ratio_std']:.3f}" if name.startswith("ours") else ""
        print(f"  {name:<15} {row['images_per_s']:9.1f} {row['ms_per_step']:9.1f} {ratio:>27}")
    pipeline = result["rows"]["ours, pipeline"]
    print(f"  ours (pipeline) / bare backbone = {pipeline['ratio_to_bare']:.3f} ± {pipeline['ratio_std']:.3f}, "
          f"median of {result['rounds']} rounds (target ≥ {TARGET_RATIO})")
    if speedup := result["compiled_over_eager"]:
        print(f"  ours compiled / ours eager (tensors) = {speedup['median']:.3f} ± {speedup['std']:.3f} in speed, "
              "round by round")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"  figures in {args.json}")


if __name__ == "__main__":
    run_script(main)
