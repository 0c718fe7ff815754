"""onnxruntime on the CPU against torch eager: images/s of the exported embedding network, in the same run.

python bench/onnx_speed.py                                  # resnet50 + vae at 256×128, batch 16, random weights
python bench/onnx_speed.py --result-dir runs/demo              # the demo's trained model at its size
python bench/onnx_speed.py --backbone swin_t --threads 1

Both run the same weights on the same preloaded batch with the same thread count; they take turns for --rounds
rounds of --steps batches after a warm-up, and each keeps its fastest round (wall and CPU time beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export  # noqa: E402
from model import ReIDModel, load_trained  # noqa: E402
from utils import write_json  # noqa: E402


def fastest_round(step: Callable[[], object], steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of `steps` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result-dir", "--all-dir", dest="result_dir", type=Path,
                        help="a result directory (default: a fresh --backbone + --ae)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--ae", default="vae")
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="batches a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.result_dir is not None:
        model = load_trained(args.result_dir)
    else:
        model = ReIDModel(args.backbone, args.ae, 10, img_size=tuple(args.img_size)).eval()
    images = torch.randn(args.batch, 3, *model.img_size)
    session = export.onnx_session(export.onnx_bytes(model), args.threads)
    feed = {"images": images.numpy()}

    def torch_step() -> object:
        with torch.inference_mode():
            return model.embed(images)

    steps = {"torch eager": torch_step, "onnxruntime CPU": lambda: session.run(["embedding"], feed)}
    for step in steps.values():
        step()  # warm-up
    best = {name: (float("inf"), 0.0) for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            best[name] = min(best[name], fastest_round(step, args.steps))
    name = args.result_dir or f"{args.backbone} + {args.ae}"
    print(f"{name} at {model.img_size[0]}×{model.img_size[1]}, batch {args.batch}, {args.threads} threads, "
          f"fastest of {args.rounds} rounds of {args.steps} batches")
    reference = args.steps * args.batch / best["torch eager"][0]
    rows = []
    for method, (wall, cpu) in best.items():
        rate = args.steps * args.batch / wall
        rows.append({"method": method, "images_per_s": rate, "ms_per_batch": 1000 * wall / args.steps,
                     "cpu_ms_per_batch": 1000 * cpu / args.steps, "ratio": rate / reference})
        print(f"  {method:<16} {rate:8.1f} images/s  {1000 * wall / args.steps:8.1f} ms a batch "
              f"(CPU {1000 * cpu / args.steps:8.1f} ms)  ×{rate / reference:.2f} torch's")
    report = {"flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
