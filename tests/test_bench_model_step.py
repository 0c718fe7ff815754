"""bench/model_step.py runs end to end on tiny inputs (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench import model_step
from model import ReIDModel

TINY = ["--device", "cpu", "--backbones", "resnet18", "--img-size", "32", "16", "--batch", "4", "--k", "2",
        "--steps", "1", "--warmup", "1"]


def test_model_step_writes_a_row_per_autoencoder_with_every_term_it_produces(tmp_path: Path, capsys):
    out = tmp_path / "model_step.json"
    model_step.main([*TINY, "--ae", "vae", "sae", "--json", str(out), "--", "--latent-dim", "16"])
    result = json.loads(out.read_text())
    vae, sae = result["rows"]
    assert vae["terms"] == ["bce", "id", "kl", "reconstruction", "triplet"]
    assert sae["terms"] == ["bce", "id", "reconstruction", "sparsity", "triplet"]
    for row in (vae, sae):
        assert row["bare_ms"] > 0 and row["ours_ms"] > 0 and row["heads_ms"] > 0
        assert abs(row["ratio"] - row["ours_ms"] / row["bare_ms"]) < 1e-9
        assert row["ours_ops"] > row["bare_ops"] > 0 and row["ops_ratio"] == row["ours_ops"] / row["bare_ops"]
    assert result["target_ratio"] == 1.10
    assert "worst ratio" in capsys.readouterr().out


def test_kernel_ops_count_the_operators_that_run_a_kernel():
    x = torch.randn(6)
    # view, unsqueeze and t make views (not counted); add, mul and sum each run one kernel
    assert model_step.kernel_ops(lambda: ((x.view(2, 3).t() + 1) * 2).unsqueeze(0).sum()) == 3


def test_an_image_reconstruction_target_has_no_heads_split(tmp_path: Path):
    out = tmp_path / "model_step.json"
    model_step.main([*TINY, "--json", str(out), "--", "--latent-dim", "16", "--recon-target", "image"])
    (row,) = json.loads(out.read_text())["rows"]
    assert "heads_ms" not in row and row["ours_ms"] > 0


def test_without_backbone_passes_the_feature_through_and_restores_the_backbone():
    model = ReIDModel("resnet18", "ae", 5, latent_dim=8)
    backbone = model.backbone
    with model_step.without_backbone(model):
        assert isinstance(model.backbone, nn.Identity)
    assert model.backbone is backbone
