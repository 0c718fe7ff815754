"""utils.py: files written atomically get the mode the user's umask implies."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from utils import atomic_write_bytes, current_umask, write_json


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_an_atomically_written_file_follows_the_umask(tmp_path: Path, mask: int, mode: int):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_bytes(tmp_path / "result.bin", b"\x01\x02")
        write_json(tmp_path / "nested" / "results.json", {"mAP": 0.5})
        (tmp_path / "plain.txt").write_bytes(b"x")  # what open() gives, the reference
    finally:
        os.umask(old)
    for name in ("result.bin", "nested/results.json", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert (tmp_path / "result.bin").read_bytes() == b"\x01\x02"


def test_rewriting_a_file_keeps_the_umask_mode_and_leaves_no_temporary_file(tmp_path: Path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.txt", b"first")
        atomic_write_bytes(tmp_path / "a.txt", b"second")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_bytes() == b"second"
