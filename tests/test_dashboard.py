"""dashboard.py: metrics rows and step losses as TensorBoard tags, and a missing tensorboard package named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dashboard
from utils import UserError


def test_a_steps_losses_are_tagged_by_term_and_the_total():
    assert dashboard.loss_scalars({"loss": 4.5, "triplet": 0.25, "kl": 3.0}) == {
        "loss/total": 4.5, "loss/triplet": 0.25, "loss/kl": 3.0}


def test_a_metrics_row_becomes_rates_weights_validation_scale_and_speed():
    row = {"epoch": 2, "step": 30, "loss": 4.0, "triplet": 0.5, "lr": 3e-4, "lr_classifier": 3e-3,
           "images_per_s": 99.0, "epoch_seconds": 4.0, "weight_triplet": 1.0, "weight_kl": 0.001,
           "loss_scale": 32768.0, "val_mAP": 0.5, "val_mINP": 0.2, "val_rank1": 0.6, "val_rank5": 0.9}
    assert dashboard.epoch_scalars(row, ["lr", "lr_classifier", "lr_balance"], 120) == {
        "lr/lr": 3e-4, "lr/lr_classifier": 3e-3, "weight/triplet": 1.0, "weight/kl": 0.001,
        "val/mAP": 0.5, "val/rank1": 0.6, "val/rank5": 0.9, "val/mINP": 0.2, "precision/loss_scale": 32768.0,
        "throughput/images_per_s": 30.0}


def test_the_untrained_row_has_validation_and_weights_only():
    row = {"epoch": 0, "step": 0, "val_mAP": 0.1, "val_mINP": 0.05, "val_rank1": 0.2, "val_rank5": 0.4,
           "weight_id": 1.0}
    assert dashboard.epoch_scalars(row, ["lr", "lr_classifier"], 0) == {
        "val/mAP": 0.1, "val/rank1": 0.2, "val/rank5": 0.4, "val/mINP": 0.05, "weight/id": 1.0}


def test_a_missing_tensorboard_package_names_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^--tensorboard: the tensorboard package is not installed .*--no-tensorboard"):
        dashboard.Dashboard(tmp_path, ["lr"])
    assert not (tmp_path / dashboard.LOG_DIR).exists()
