"""Export a trained model's embedding network to ONNX, checked against torch with onnxruntime on real images.

python export.py --result-dir runs/demo --out runs/demo/model.onnx
python export.py --result-dir runs/demo --out model.onnx --images my_crops/

The network takes float32 N×3×H×W images at the model's size, normalised with ImageNet statistics (any N), and
returns the embedding as ReIDModel.embed does. The file is written only when onnxruntime's embeddings of a batch
of real images are within --tolerance of torch's; the settings and the difference go to <out>.json beside it.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from datasets import IMAGENET_MEAN, IMAGENET_STD
from embedding import ImageList
from folder_search import list_images
from model import ReIDModel, build_trained, result_settings
from resultdir import ResultDir
from utils import (
    LOG,
    UserError,
    atomic_write_bytes,
    config_record,
    normalise_flag_spelling,
    run_script,
    setup_logging,
    write_json,
)

if TYPE_CHECKING:
    import onnxruntime


class EmbeddingNetwork(nn.Module):
    """ReIDModel.embed as a module's forward, what the ONNX file holds."""

    def __init__(self, model: ReIDModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def onnx_bytes(model: ReIDModel, opset: int = 17) -> bytes:
    """The embedding network as ONNX bytes with a dynamic batch; input `images`, output `embedding`."""
    network = EmbeddingNetwork(model).cpu().eval()
    example = torch.zeros(2, 3, *model.img_size)
    buffer = io.BytesIO()
    # The TorchScript exporter: torch.export's cannot trace these backbones with a dynamic batch (torch 2.14).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(network, (example,), buffer, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return buffer.getvalue()


def onnx_session(data: bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of ONNX bytes (`threads` intra-op threads, else onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def max_difference(data: bytes, model: ReIDModel, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and torch's embeddings of a batch of images."""
    ours = model.cpu().eval().embed(images).float().numpy()
    theirs = onnx_session(data).run(["embedding"], {"images": images.numpy()})[0]
    return float(np.abs(theirs - ours).max())


def check_batch(paths: Sequence[Path], img_size: tuple[int, int]) -> torch.Tensor:
    """The images as the network takes them: resized to the model's size and normalised (its test transforms)."""
    images = ImageList(paths, img_size)
    return torch.stack([images[i][0] for i in range(len(images))])


def default_images(result: ResultDir, flag: str) -> list[Path]:
    """Images to check with when --images is not given: the gallery of the data the model was trained on."""
    data = Path(result.flags["data"])
    if not (data / "bounding_box_test").is_dir():
        raise UserError(f"{flag}: needed, as the training data {data} (config.json) is not here; give image files "
                        "or folders to check the export with")
    return list_images([data / "bounding_box_test"], flag)


def build_parser() -> argparse.ArgumentParser:
    """export.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result-dir", "--all-dir", dest="result_dir", type=Path, required=True,
                        help="a result directory of train.py")
    parser.add_argument("--out", type=Path, help="the ONNX file (default RESULT_DIR/model.onnx)")
    parser.add_argument("--images", nargs="+", help="image files or folders to check with (default: the training "
                        "data's bounding_box_test)")
    parser.add_argument("--check-images", type=int, default=16, help="how many of them (one batch)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference allowed")
    parser.add_argument("--opset", type=int, default=17)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """export.py's flags; `--flag_name` works too."""
    parser = build_parser()
    args = parser.parse_args(normalise_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.check_images < 1:
        parser.error(f"--check-images {args.check_images}: expected a positive number")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    out = args.out if args.out is not None else args.result_dir / "model.onnx"
    if not args.result_dir.is_dir():
        raise UserError(f"--result-dir {args.result_dir}: no such folder (expected a result directory of train.py)")
    result = ResultDir(args.result_dir)
    model = build_trained(result_settings(result), "cpu")
    paths = list_images(args.images, "--images") if args.images else default_images(result, "--images")
    images = check_batch(paths[:args.check_images], model.img_size)
    data = onnx_bytes(model, args.opset)
    difference = max_difference(data, model, images)
    LOG.info("onnxruntime against torch on %d images: max abs difference %.2e (tolerance %.0e)", len(images),
             difference, args.tolerance)
    if not difference <= args.tolerance:
        raise UserError(f"--tolerance {args.tolerance:g}: onnxruntime's embeddings differ from torch's by "
                        f"{difference:.3g}; {out} not written")
    atomic_write_bytes(out, data)
    report = config_record(args, input={"name": "images", "shape": ["N", 3, *model.img_size], "dtype": "float32",
                                        "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
                           output={"name": "embedding", "shape": ["N", model.embed_dim]},
                           checked_images=len(images), max_abs_difference=difference)
    write_json(out.with_name(out.name + ".json"), report)
    LOG.info("%s (%.1f MB) and %s", out, len(data) / 2**20, out.with_name(out.name + ".json"))
    return report


if __name__ == "__main__":
    run_script(main)
