"""TensorBoard for a training run: its losses, loss weights, learning rates, speed, validation and reconstructions as
event files under <result-dir>/tensorboard. metrics.jsonl stays the run's record; this is its dashboard.

    tensorboard --logdir runs/r50/tensorboard
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from utils import UserError

LOG_DIR = "tensorboard"
VAL_METRICS = ("val_mAP", "val_rank1", "val_rank5", "val_mINP")


def loss_scalars(values: dict[str, float]) -> dict[str, float]:
    """A step's loss values as tags: the weighted total as loss/total, each term as loss/<term>."""
    return {f"loss/{'total' if name == 'loss' else name}": value for name, value in values.items()}


def epoch_scalars(row: dict, lr_names: Sequence[str], images: int) -> dict[str, float]:
    """A row of metrics.jsonl as tags: lr/<group>, weight/<term>, val/<metric>, float16's loss scale, and the
    images/s of the epoch's `images` over its seconds (a row without them, the untrained one, has none of those)."""
    scalars = {f"lr/{name}": row[name] for name in lr_names if name in row}
    scalars |= {f"weight/{key.removeprefix('weight_')}": value for key, value in row.items()
                if key.startswith("weight_")}
    scalars |= {f"val/{key.removeprefix('val_')}": row[key] for key in VAL_METRICS if key in row}
    if "loss_scale" in row:
        scalars["precision/loss_scale"] = row["loss_scale"]
    if "epoch_seconds" in row:
        scalars["throughput/images_per_s"] = images / max(row["epoch_seconds"], 1e-9)
    return scalars


class Dashboard:
    """A run's SummaryWriter, written by rank 0 as train.py reads each step's losses (a step late, on the host) and
    ends each epoch. A fresh run clears what an earlier, uncheckpointed one left in the folder; a resumed run writes
    on in it, purging the steps after its checkpoint that the interrupted run had written, so none is doubled."""

    def __init__(self, result_dir: Path, lr_names: Sequence[str], resumed_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise UserError("--tensorboard: the tensorboard package is not installed (pip install tensorboard, "
                            "or pass --no-tensorboard)") from err
        # events from step purge_step on, left by an earlier writer, are hidden from TensorBoard
        purge_step = 0 if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(str(result_dir / LOG_DIR), purge_step=purge_step)
        self.lr_names = tuple(lr_names)
        self.images_seen = 0

    def losses(self, values: dict[str, float], step: int) -> None:
        """A step's loss values at its number counted from 1, the count of steps done after it (as in the rows)."""
        for tag, value in loss_scalars(values).items():
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict, images_seen: int) -> None:
        """A row of metrics.jsonl at its step; `images_seen`, the images this process has trained on so far, gives
        the epoch's speed."""
        for tag, value in epoch_scalars(row, self.lr_names, images_seen - self.images_seen).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.images_seen = images_seen
        self.writer.flush()

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A (3, H, W) image with values from 0 to 1, as recon.png draws it."""
        self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        """Write out what is queued and close the event file."""
        self.writer.close()
