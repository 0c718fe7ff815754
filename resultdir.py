"""A result directory of train.py: the files it holds, by name, its config.json (read once), and its parts."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from utils import UserError, read_json, save_torch

PART_FILES = {"backbone": "backbone.pt", "ae": "ae.pt", "classifier": "classifier.pt"}
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


class ResultDir:
    """A result directory of train.py; its config.json is read on first use and kept."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path, self.checkpoint_path = self.path / CONFIG_FILE, self.path / CHECKPOINT_FILE
        self.summary_path, self.metrics_path = self.path / SUMMARY_FILE, self.path / METRICS_FILE

    def __repr__(self) -> str:
        return f"ResultDir({str(self.path)!r})"

    def has_config(self) -> bool:
        return self.config_path.is_file()

    @cached_property
    def config(self) -> dict:
        """config.json: every flag, versions, manifests' hashes, sizes; a missing one is a UserError naming it."""
        return read_json(self.config_path)

    @property
    def flags(self) -> dict:
        return self.config["flags"]

    def parts(self) -> dict[str, Path]:
        """The part files the directory holds, by part name."""
        return {part: self.path / name for part, name in PART_FILES.items() if (self.path / name).is_file()}

    def model_parts(self) -> dict[str, Path]:
        """The part files, the backbone's and the autoencoder's required."""
        parts = self.parts()
        for part in ("backbone", "ae"):
            if part not in parts:
                raise UserError(f"{self.path}: no {PART_FILES[part]} (expected a result directory of train.py)")
        return parts


def part_file(path: str | Path, part: str, flag: str) -> Path:
    """The state-dict file of a part: `path` itself, or the part's file inside the folder `path`."""
    path = Path(path)
    if path.is_dir():
        path = path / PART_FILES[part]
    if not path.is_file():
        raise UserError(f"{flag} {path}: no {part} weights there (expected a file or a folder with {PART_FILES[part]})")
    return path


def save_parts(parts: dict, folder: str | Path) -> None:
    """Write each part's state dict to its own file in `folder`."""
    for part, module in parts.items():
        save_torch(module.state_dict(), Path(folder) / PART_FILES[part])
