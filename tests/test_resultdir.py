"""The result directory object: its files by name, config.json read once, and once per evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import eval as evaluation
import topk
from resultdir import CHECKPOINT_FILE, PART_FILES, ResultDir, part_file
from utils import UserError


def count_config_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every read of a file named config.json from here on, recorded as it happens."""
    reads: list[Path] = []
    read_text = Path.read_text

    def counted(path: Path, *args, **kwargs) -> str:
        if path.name == "config.json":
            reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    return reads


def test_config_json_is_read_on_first_use_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "config.json").write_text(json.dumps({"flags": {"data": "d", "ae_name": "sae"}, "num_classes": 3}))
    reads = count_config_reads(monkeypatch)
    result = ResultDir(tmp_path)
    assert reads == []
    assert result.flags == {"data": "d", "ae_name": "sae"} and result.config["num_classes"] == 3
    assert result.flags["ae_name"] == "sae"
    assert reads == [tmp_path / "config.json"]


def test_the_files_have_one_name_each(tmp_path: Path):
    result = ResultDir(tmp_path)
    assert (result.config_path.name, result.checkpoint_path.name, result.summary_path.name,
            result.metrics_path.name) == ("config.json", CHECKPOINT_FILE, "summary.json", "metrics.jsonl")
    (tmp_path / PART_FILES["backbone"]).write_bytes(b"")
    assert result.parts() == {"backbone": tmp_path / "backbone.pt"}
    with pytest.raises(UserError, match=r"no ae\.pt \(expected a result directory of train\.py\)"):
        result.model_parts()
    assert part_file(tmp_path, "backbone", "--backbone_dir") == tmp_path / "backbone.pt"
    with pytest.raises(UserError, match=r"--ae_dir .*: no ae weights there"):
        part_file(tmp_path, "ae", "--ae_dir")


def test_an_evaluation_reads_config_json_once(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "topk*", "search"))
    reads = count_config_reads(monkeypatch)
    evaluation.main(["--result-dir", str(run), "--workers", "0", "--verify-pairs", "0"])
    assert reads == [run / "config.json"]
    reads.clear()
    topk.main(["--result-dir", str(run), "--workers", "0", "--k", "3", "--queries", "random:1"])
    assert reads == [run / "config.json"]
