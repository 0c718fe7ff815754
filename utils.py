"""Shared plumbing: atomic file I/O, JSON config, seeding, devices, logging, meters and plots."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

LOG = logging.getLogger("reid")


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def setup_logging(verbose: bool = False) -> None:
    """Log plain lines to stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
