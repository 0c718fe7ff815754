"""Model step cost: our full training step against the bare backbone's forward and backward, in the same run.

python bench/model_step.py                                   # CPU: resnet50 densenet121 vgg16_bn swin_t, vae
python bench/model_step.py --device cuda --backbones resnet152 densenet121 vgg16 swin_b   # bf16, channels_last
python bench/model_step.py --ae vae sae                      # a row per autoencoder (kl needs vae, sparsity sae)
python bench/model_step.py --threads 1                       # on a CPU other jobs share (see --threads)
python bench/model_step.py -- --balance gradnorm             # any other train.py flag goes to its parser

Each backbone × autoencoder gets one preloaded random batch (--batch images, P identities × --k images) and
three steps that take turns, so a shared machine's drift falls on all of them alike; each reports the median
of --steps timed steps after --warmup untimed ones (synchronised on CUDA):
  bare    the backbone alone (the very module ReIDModel holds, so same weights, last stride and memory
          format) → mean square of its pooled feature → backward → Adam (train.py's settings, fused) over it
  ours    train.py's step through its own functions: batch_losses (TrainStep: ReIDModel and every loss term,
          triplet, id, kl, reconstruction, sparsity and bce, weighted as train.py's defaults, sparsity 1e-3; a
          term the autoencoder has nothing for is skipped, as in training) → apply_gradients (backward, the
          finite check on the losses and gradients, fused Adam, schedule) → the losses' read
  heads   what ours adds beyond the backbone: the same step with the backbone replaced by the identity and a
          preloaded feature as input (autoencoder, classifier, Siamese head, pair mining, losses, their Adam)
The ratio is ours over bare; the target is at most 1.10. Beside the times, each row counts the aten operators one
step of bare and of ours dispatches that run a kernel (views and allocations left out): on a GPU each is a
launch the host queues, so the count says how much host work ours adds, measured the same on any device. On
CUDA (unless --no-amp) every step runs as train.py --amp does: bf16 autocast, model and images in channels_last.
--profile prints where one step of ours spends its time, by operator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from model import ReIDModel  # noqa: E402
from trainstep import TrainStep, apply_gradients, batch_losses  # noqa: E402
from utils import resolve_device, rotated, run_script, seed_everything, write_json  # noqa: E402

# The member of each family a CPU can step through in minutes; the seed's members need a GPU.
CPU_BACKBONES = ("resnet50", "densenet121", "vgg16_bn", "swin_t")
SEED_BACKBONES = ("resnet152", "densenet121", "vgg16", "swin_b")
# Per device: timed steps and warm-up steps. CPU's keep the default run within about 5 minutes on 2 cores.
DEVICE_DEFAULTS = {"cpu": (3, 1), "cuda": (30, 10)}
NUM_CLASSES = 751  # Market-1501's training identities: the classifier's real width
TARGET_RATIO = 1.10


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's flags, and the rest, which go to train.py's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--backbones", nargs="+", default=list(CPU_BACKBONES), help="backbone names, as train.py's --backbone-name")
    add("--seed-list", action="store_true", help=f"the seed's backbones: {' '.join(SEED_BACKBONES)} (for a GPU)")
    add("--ae", nargs="+", default=["vae"], metavar="AE", help="autoencoders, as train.py's --ae-name; a row each")
    add("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    add("--batch", type=int, default=16, help="images a batch")
    add("--k", type=int, default=4, help="images an identity in the batch (P = batch / k)")
    add("--steps", type=int, help="timed steps a row (default 3 on CPU, 30 on CUDA)")
    add("--warmup", type=int, help="untimed steps first (default 1 on CPU, 10 on CUDA)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--no-amp", action="store_true", help="on CUDA, float32 instead of train.py --amp's bf16 and channels_last")
    add("--threads", type=int, help="CPU threads for torch (default torch's own: one a core); 1 keeps a shared "
        "machine's other jobs from stalling every small operator at its threads' barrier")
    add("--profile", action="store_true", help="also print the operators one step of ours spends its time in")
    add("--seed", type=int, default=0)
    add("--json", type=Path, help="also write the figures to this file")
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args.seed_list:
        args.backbones = list(SEED_BACKBONES)
    if args.batch % args.k or args.batch < 2 * args.k:
        parser.error(f"--batch {args.batch} --k {args.k}: the batch must hold at least two identities of k images")
    args.device = resolve_device(args.device)
    steps, warmup = DEVICE_DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be positive, --warmup not negative")
    args.amp = args.device.type == "cuda" and not args.no_amp
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: expected a positive number")
        torch.set_num_threads(args.threads)
    return args, rest


def train_args(args: argparse.Namespace, backbone: str, ae: str, rest: list[str]) -> argparse.Namespace:
    """train.py's flags for one row: random weights, every loss term the autoencoder has on, clean batches
    (`-- --degraded-views` adds the degraded views' second backbone pass), then `rest`."""
    flags = ["--backbone-name", backbone, "--ae-name", ae, "--pretrained", "none", "--no-degraded-views", "--batch-p",
             str(args.batch // args.k), "--batch-k", str(args.k), "--img-size", *map(str, args.img_size)]
    return train.parse_args(flags + (["--amp"] if args.amp else []) + rest)


# ---------------------------------------------------------------------------------------------------------
# The three steps
# ---------------------------------------------------------------------------------------------------------


def bare_step(backbone: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
              amp: bool) -> Callable[[], None]:
    """The reference: the backbone's forward, the mean square of its feature, backward, Adam."""

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = backbone(images).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def our_step(step_module: TrainStep, optimizer: torch.optim.Optimizer, shared: torch.Tensor,
             forward: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> Callable[[], None]:
    """train.py's loop body after `forward` (its batch_losses, or the like): apply_gradients (backward, the finite
    check, Adam, a constant schedule) and the read of the losses (at once here, as each step is timed to its end;
    train.py reads them a step later); checkpoints and progress bar aside."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def step() -> None:
        total, terms = forward()
        values, skipped, _ = apply_gradients(total, terms, step_module.balancer, optimizer, scheduler, shared).result()
        if skipped:
            raise RuntimeError(f"non-finite loss or gradient {values} (a random batch should not give any)")

    return step


@contextlib.contextmanager
def without_backbone(model: ReIDModel) -> Iterator[None]:
    """The model with its backbone replaced by the identity, so its input is the feature itself."""
    backbone, model.backbone = model.backbone, nn.Identity()
    try:
        yield
    finally:
        model.backbone = backbone


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(steps: dict[str, Callable[[], None]], warmup: int, timed: int,
                  device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed step, the steps taking turns in a rotated order after `warmup` untimed rounds:
    wall-clock as `<name>`, and the process's CPU time as `<name>_cpu` (on a shared CPU, what other jobs take
    inflates the wall-clock time, much less the CPU time)."""
    times: dict[str, list[float]] = {key: [] for name in steps for key in (name, f"{name}_cpu")}
    for round_index in range(warmup + timed):
        for name in rotated(list(steps), round_index):  # each round starts one step later: no step always first
            step = steps[name]
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
                times[f"{name}_cpu"].append(time.process_time() - start_cpu)
    return times


# aten operators that only make a view or an empty tensor, or mark the profiler: no kernel runs for them.
NO_KERNEL_OPS = frozenset({"alias", "as_strided", "detach", "empty", "empty_strided", "expand", "permute",
                           "promote_types", "reshape", "select", "slice", "split", "squeeze", "t", "transpose",
                           "unbind", "unsqueeze", "view", "_reshape_alias", "_unsafe_view",
                           "_record_function_enter_new", "_record_function_exit"})


def kernel_ops(step: Callable[[], None]) -> int:
    """The aten operators one call of `step` dispatches that run a kernel (views and allocations left out): on a
    GPU, the launches the host queues a step, whatever the device, so the CPU counts them too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ not in NO_KERNEL_OPS
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        step()
    return counter.count


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 20) -> str:
    """The operators one step spends its time in, by self time, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ---------------------------------------------------------------------------------------------------------
# One row: a backbone with an autoencoder
# ---------------------------------------------------------------------------------------------------------


def heads_only_step(model: ReIDModel, build: Callable[[ReIDModel], tuple[TrainStep, torch.optim.Optimizer]],
                    images: torch.Tensor, labels: torch.Tensor, amp: bool) -> Callable[[], None]:
    """One step of the heads alone on the backbone's feature of images, computed once beforehand."""
    device = images.device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        feature = model.backbone(images).float()
    with without_backbone(model):
        heads_module, heads_optimizer = build(model)

    def heads_forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # a feature has no channels_last
            return heads_module(feature, labels)

    heads_step = our_step(heads_module, heads_optimizer, train.shared_layer(model), heads_forward)

    def heads_only() -> None:
        with without_backbone(model):
            heads_step()

    return heads_only


def measure(args: argparse.Namespace, backbone_name: str, ae: str, rest: list[str]) -> dict:
    """Median ms a step of bare, ours and heads for one backbone × autoencoder, and the terms ours computed."""
    device, amp = args.device, args.amp
    targs = train_args(args, backbone_name, ae, rest)
    seed_everything(args.seed)
    model = ReIDModel(backbone_name, ae, NUM_CLASSES, latent_dim=targs.latent_dim, last_stride=targs.last_stride,
                      img_size=tuple(args.img_size), recon_target=targs.recon_target)
    memory_format = torch.channels_last if amp else torch.preserve_format
    model.to(device, memory_format=memory_format).train()
    images = torch.randn(args.batch, 3, *args.img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.arange(args.batch // args.k, device=device).repeat_interleave(args.k)
    weights = train.loss_weights(targs)

    def build(step_model: ReIDModel) -> tuple[TrainStep, torch.optim.Optimizer]:
        balancer = train.build_balancer(targs, weights).to(device)
        step = TrainStep(step_model, weights, balancer, train.step_options(targs))
        return step, train.build_optimizer(step_model, targs, balancer)

    ours_module, ours_optimizer = build(model)
    shared = train.shared_layer(model)
    backbone_optimizer = torch.optim.Adam(model.backbone.parameters(), lr=targs.lr, weight_decay=targs.weight_decay,
                                          fused=True)
    steps = {"bare": bare_step(model.backbone, backbone_optimizer, images, amp),
             "ours": our_step(ours_module, ours_optimizer, shared,
                              lambda: batch_losses(ours_module, images, labels, device,
                                                   torch.bfloat16 if amp else torch.float32))}
    if targs.recon_target == "feature":  # an image target needs the images, which the identity does not pass on
        steps["heads"] = heads_only_step(model, build, images, labels, amp)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), torch.no_grad():
        _, terms = ours_module(images, labels)
    times = time_in_turns(steps, args.warmup, args.steps, device)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ops = {name: kernel_ops(steps[name]) for name in ("bare", "ours")}
    row = {"backbone": backbone_name, "ae": ae, "terms": sorted(terms),
           "bare_ops": ops["bare"], "ours_ops": ops["ours"], "ops_ratio": ops["ours"] / ops["bare"],
           **{f"{name}_ms": 1000 * seconds for name, seconds in medians.items()},
           "ratio": medians["ours"] / medians["bare"], "cpu_ratio": medians["ours_cpu"] / medians["bare_cpu"],
           "samples_ms": {name: [round(1000 * t, 2) for t in values] for name, values in times.items()}}
    if args.profile:
        print(f"\n{backbone_name} + {ae}: one step of ours, by operator")
        print(profile_step(steps["ours"], device))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args, rest = parse_args(argv)
    started = time.perf_counter()
    precision = "bf16 autocast, channels_last" if args.amp else "float32"
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"CPU, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the start"
    print(f"model step at {args.img_size[0]}×{args.img_size[1]}, batch {args.batch} "
          f"({args.batch // args.k} ids × {args.k}), {precision}, on {where}; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    cpu = args.device.type == "cpu"
    columns = ["bare ms", "ours ms", "ratio", "heads ms"] + (["bare cpu", "ours cpu", "cpu ratio", "heads cpu"] if cpu
                                                            else []) + ["bare ops", "ours ops", "ops ratio"]
    print(f"{'backbone':<14} {'ae':<5} " + " ".join(f"{c:>9}" for c in columns) + "  terms")
    rows = []
    for backbone_name in args.backbones:
        for ae in args.ae:
            row = measure(args, backbone_name, ae, rest)
            rows.append(row)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            keys = ["bare_ms", "ours_ms", "ratio", "heads_ms"] + (["bare_cpu_ms", "ours_cpu_ms", "cpu_ratio",
                                                                   "heads_cpu_ms"] if cpu else []) + [
                "bare_ops", "ours_ops", "ops_ratio"]
            cells = [f"{row[k]:9.3f}" if "ratio" in k else f"{row[k]:9d}" if k.endswith("_ops") else
                     f"{row[k]:9.1f}" if k in row else f"{'n/a':>9}" for k in keys]
            print(f"{backbone_name:<14} {ae:<5} " + " ".join(cells) + f"  {' '.join(row['terms'])}", flush=True)
    worst = max(row["ratio"] for row in rows)
    if cpu:
        print("ms: wall-clock; cpu: this process's CPU time (all its threads), less sensitive to other jobs")
    print("ops: aten operators a step dispatches that run a kernel (the launches a GPU step queues, counted here)")
    elapsed = time.perf_counter() - started
    print(f"worst ratio {worst:.3f}: target ≤ {TARGET_RATIO:.2f} {'holds' if worst <= TARGET_RATIO else 'missed'}; "
          f"run took {elapsed:.0f} s" + (f", load average {os.getloadavg()[0]:.1f} at the end"
                                          if args.device.type == "cpu" else ""))
    if args.json:
        settings = {"img_size": args.img_size, "batch": args.batch, "k": args.k, "steps": args.steps,
                    "warmup": args.warmup, "device": where, "precision": precision, "train_flags": rest,
                    "torch": torch.__version__, "seconds": elapsed}
        write_json(args.json, {"settings": settings, "target_ratio": TARGET_RATIO, "rows": rows})
    return rows


if __name__ == "__main__":
    run_script(main)
