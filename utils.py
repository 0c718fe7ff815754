"""Shared plumbing: atomic file I/O, JSON config, seeding, devices, logging, meters and plots."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used, so that light scripts start fast
    import matplotlib.figure
    import torch
    from PIL import Image

LOG = logging.getLogger("reid")


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def user_error_line(err: UserError) -> str:
    """The error's one line; one raised in a DataLoader worker arrives wrapped in the worker's traceback, whose
    last line is 'utils.UserError: <the line>'."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    kind, _, message = last.partition(": ")
    return message if kind.endswith("UserError") else last


def run_script(main: Callable[[], Any]) -> None:
    """A script's entry: runs `main`, and exits with a one-line 'error: ...' on a UserError."""
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {user_error_line(err)}")


def setup_logging(verbose: bool = False) -> None:
    """Log plain lines to stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, then rename it over `path`; the file gets the mode a plain
    open() would give it (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_npz_cache(path: Path | None, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz cache written by write_npz_cache with this `key`, or None (no file, another key)."""
    if path is None or not path.is_file():
        return None
    with np.load(path) as stored:
        if str(stored["key"]) != key:
            return None
        return {name: stored[name] for name in stored.files if name != "key"}


def write_npz_cache(path: Path | None, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Store `arrays` with their `key` as an .npz file, atomically (nothing without a path)."""
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), **arrays)
        atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise_flag_spelling(argv: list[str]) -> list[str]:
    """Accept `--flag_name` for `--flag-name` (the seed's spellings), leaving values untouched."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------------------
# Seeds and devices
# ---------------------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally make torch choose deterministic kernels."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; otherwise the named device, checked to exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name}: not a device name (expected auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple[float, ...], device: Any, dtype: Any = None) -> Any:
    """A constant tensor, made once per (values, device, dtype): made at each call it would be a copy to the GPU
    that waits for everything queued there. Read it only; it is shared."""
    import torch

    return torch.tensor(values, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: torch files written atomically and read safely
# ---------------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"  # a running train.py's process id; locked while it runs


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file and a rename, so a crash never leaves half a file."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch(path: str | Path) -> Any:
    """torch.load with weights_only=True, naming the file when it cannot be read."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from err


# ---------------------------------------------------------------------------------------------------------
# Configuration and metrics records
# ---------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import platform

    import numpy
    import torch
    import torchvision

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "numpy": numpy.__version__}
    try:
        import timm

        found["timm"] = timm.__version__
    except ImportError:
        found["timm"] = "not installed"
    return found


def config_record(args: Any, **extra: Any) -> dict:
    """Every flag, the library versions and anything else worth keeping beside a result."""
    return {"flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "versions": versions(), **extra}


def hold_run_lock(folder: Path) -> IO:
    """Lock `folder` for this process (released when it exits, however it ends); a folder another live process
    holds is refused, naming that process."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"--result-dir {folder}: another train.py (process {holder}) is running in it; wait for it "
                        "to end or choose another --result-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically from all its rows (so a resumed run never duplicates lines)."""
    atomic_write_bytes(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())


class AverageMeter:
    """Running mean of a scalar."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def plot_curves(rows: list[dict], keys: list[str], path: str | Path, title: str, xlabel: str = "epoch") -> None:
    """One panel a key, each a curve over the rows' `epoch`; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in row for row in rows)]
    if not keys:
        return
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(row["epoch"], row[key]) for row in rows if key in row]
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: matplotlib.figure.Figure, path: str | Path) -> None:
    """A matplotlib figure as a PNG at 100 dpi, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_xy(x: np.ndarray, y: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str, label: str,
            percent: bool = False) -> None:
    """One labelled curve, written atomically as PNG (CMC, ROC and PR curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    scale = 100 if percent else 1
    ax.plot(x, y * scale, marker="o" if len(x) <= 60 else None, markersize=2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_ylim(0, scale * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_image(image: Image.Image, path: str | Path) -> None:
    """A PIL image as a PNG, written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def rotated(names: list[str], turn: int) -> list[str]:
    """A benchmark's rows in the order of round `turn`: each round starts one row later, so no row always runs
    first."""
    shift = turn % len(names)
    return names[shift:] + names[:shift]
