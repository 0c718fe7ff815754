"""train.py: learning, result directory, exact resume, loading parts, bad input, distributed training."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import train
import trainstep
from conftest import ROOT, SHORT_SCHEDULE
from losses import reconstruction_loss, sparsity_kl, sparsity_l1, total_loss
from model import ReIDModel, build_trained
from precision import LossScaler
from utils import UserError, load_torch

TINY = [*SHORT_SCHEDULE, "--backbone-name", "resnet18", "--ae-name", "vae", "--latent-dim", "64",
        "--img-size", "64", "32", "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--quiet", "--deterministic",
        "--warmup-epochs", "0.5"]


@pytest.fixture(scope="module")
def trained(learnable: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run of 6 epochs, shared by the tests that read its result directory."""
    result = tmp_path_factory.mktemp("runs") / "r18_vae"
    train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(result), "--epochs", "6", "--lr", "1e-3",
                "--lr-classifier", "1e-2", *TINY])
    return result


def read_metrics(result: Path) -> list[dict]:
    return [json.loads(line) for line in (result / "metrics.jsonl").read_text().splitlines()]


def tensorboard_events(result: Path) -> EventAccumulator:
    """Every event under result/tensorboard as TensorBoard reads them: all kept, purged steps left out."""
    return EventAccumulator(str(result / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()


def tensorboard_scalars(result: Path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag under result/tensorboard as its (step, value) pairs, in the order written."""
    events = tensorboard_events(result)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_loss_falls_and_validation_map_rises(trained: Path):
    rows = read_metrics(trained)
    untrained, epochs = rows[0], rows[1:]
    assert untrained["epoch"] == 0 and len(epochs) == 6
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["untrained_val_mAP"] == untrained["val_mAP"]
    assert summary["best_val_mAP"] > untrained["val_mAP"] + 0.15


def test_result_directory_holds_every_record(trained: Path):
    for name in ("config.json", "backbone.pt", "ae.pt", "classifier.pt", "checkpoint.pt", "metrics.jsonl",
                 "losses.png", "summary.json"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["flags"]["backbone_name"] == "resnet18" and config["num_classes"] == 16
    assert set(config["manifests"]) == {"train", "val"} and "torch" in config["versions"]
    row = read_metrics(trained)[1]
    for key in ("loss", "triplet", "id", "kl", "reconstruction", "bce", "lr", "lr_classifier", "val_mAP",
                "val_rank1", "val_mINP"):
        assert key in row, key
    assert "sparsity" not in row  # weight 0 for vae by default: not computed
    assert row["lr_classifier"] == pytest.approx(10 * row["lr"])


def test_best_epoch_parts_are_kept(trained: Path):
    rows = read_metrics(trained)[1:]
    best = max(rows, key=lambda r: r["val_mAP"])
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_mAP"] == best["val_mAP"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(learnable: Path, tmp_path: Path):
    """With the tensor loader (the default), bit for bit: each batch's augmentation is seeded by its position."""
    flags = ["--data", str(learnable), "--epochs", "2", *TINY]
    train.main([*flags, "--result-dir", str(tmp_path / "whole")])
    stopped = train.main([*flags, "--result-dir", str(tmp_path / "parts"), "--max-steps", "3"])
    assert stopped == {"stopped_at_step": 3}
    assert load_torch(tmp_path / "parts" / "checkpoint.pt")["batch"] == 3
    train.main([*flags, "--result-dir", str(tmp_path / "parts"), "--resume"])
    whole = load_torch(tmp_path / "whole" / "checkpoint.pt")
    resumed = load_torch(tmp_path / "parts" / "checkpoint.pt")
    assert whole["step"] == resumed["step"]
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    rows_whole, rows_parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [r.keys() for r in rows_whole] == [r.keys() for r in rows_parts]
    for row_whole, row_parts in zip(rows_whole, rows_parts, strict=True):
        timeless = [k for k in row_whole if k not in ("images_per_s", "epoch_seconds")]
        assert [row_parts[k] for k in timeless] == pytest.approx([row_whole[k] for k in timeless], rel=1e-5)


def test_pre_parts_load_from_a_file_or_a_result_directory(trained: Path, learnable: Path, tmp_path: Path):
    model = ReIDModel("resnet18", "vae", 16, latent_dim=64, img_size=(64, 32))
    args = train.parse_args(["--pre-backbone", str(trained), "--pre-ae", str(trained / "ae.pt"),
                             "--pre-classifier", str(trained), "--backbone-name", "resnet18"])
    train.load_pretrained_parts(model, args)
    for part, module in model.parts().items():
        saved = load_torch(trained / f"{part}.pt")
        for key, value in module.state_dict().items():
            assert torch.equal(value, saved[key]), (part, key)
    train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "more"), "--epochs", "1",
                "--pre-backbone", str(trained), "--pre-ae", str(trained), "--pre-classifier", str(trained), *TINY])
    first = read_metrics(tmp_path / "more")[0]
    assert first["val_mAP"] > read_metrics(trained)[0]["val_mAP"]  # starts from the trained parts


def test_pre_part_that_does_not_fit_names_the_part(trained: Path, learnable: Path, tmp_path: Path):
    with pytest.raises(UserError, match=r"--pre-ae .*ae.pt: .*ae"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1",
                    "--pre-ae", str(trained), *TINY, "--latent-dim", "32"])
    with pytest.raises(UserError, match=r"--pre-backbone .*nowhere.*no backbone weights"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r2"), "--epochs", "1",
                    "--pre-backbone", str(tmp_path / "nowhere"), *TINY])


def test_unknown_names_list_the_valid_ones(learnable: Path, tmp_path: Path):
    with pytest.raises(UserError, match="--backbone-name resnet7: unknown backbone 'resnet7': expected .*resnet152"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r"), *TINY,
                    "--backbone-name", "resnet7"])
    with pytest.raises(SystemExit):
        train.parse_args(["--ae-name", "gan"])


@pytest.mark.parametrize(("flags", "expected"), [
    (["--eval-every", "0"], "--eval-every 0: expected a positive number"),
    (["--max-steps", "0"], "--max-steps 0: expected a positive number"),
    (["--img-size", "0", "32"], "--img-size 0 32: expected two positive numbers"),
    (["--workers", "-1"], "--workers -1: expected 0 or more"),
    (["--erasing", "1.5"], "--erasing 1.5: expected a value from 0 to 1"),
])
def test_bad_numbers_are_named(flags: list[str], expected: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert expected in capsys.readouterr().err


def test_data_is_recorded_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert train.parse_args(["--data", "data/prepared"]).data == tmp_path / "data" / "prepared"
    # A checkpoint of an older run holds --data as typed; from the same folder it is the same data.
    older = {"flags": {"data": "data/prepared", "batch_p": "16"}, "rng": [{"cpu": None, "cuda": None}]}
    upgraded = train.upgrade_checkpoint(older, tmp_path / "config.json", 1, torch.device("cpu"), {})
    assert upgraded["flags"]["data"] == str(tmp_path / "data" / "prepared") and upgraded["flags"]["batch_p"] == "16"


def test_pre_part_that_is_not_a_state_dict_is_named(learnable: Path, tmp_path: Path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match=r"--pre-backbone .*tensor.pt: .*not a state dict"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1",
                    "--pre-backbone", str(tmp_path / "tensor.pt"), *TINY])


def test_validation_split_with_nothing_to_rank_is_named_before_training(learnable: Path, tmp_path: Path):
    data = tmp_path / "prepared"
    shutil.copytree(learnable, data, symlinks=True)
    val = json.loads((data / "splits" / "val.json").read_text())
    (data / "splits" / "val.json").write_text(json.dumps({**val, "gallery": []}))
    with pytest.raises(UserError, match=r"split 'val' of .*prepared: .*gallery"):
        train.main([*SHORT_SCHEDULE, "--data", str(data), "--result-dir", str(tmp_path / "r"), "--epochs", "1", *TINY])
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_checkpoint_from_before_degraded_views_resumes_without_them(learnable: Path, tmp_path: Path):
    """Checkpoints older than --degraded-views lack the flag: they were trained without, today's default is on."""
    flags = ["--data", str(learnable), "--epochs", "1", "--result-dir", str(tmp_path / "old"), *TINY]
    train.main([*flags, "--no-degraded-views", "--max-steps", "1"])
    state = load_torch(tmp_path / "old" / "checkpoint.pt")
    del state["flags"]["degraded_views"]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(UserError, match=r"--degraded-views was False"):
        train.main([*flags, "--resume"])
    assert "best_val_mAP" in train.main([*flags, "--no-degraded-views", "--resume"])


@pytest.mark.parametrize(("changed", "message"), [
    (["--bce", "0"], "--bce was 1.0"), (["--lr", "1e-3"], "--lr was 0.00035"),
    (["--erasing", "0"], "--erasing was 0.5")])
def test_resume_refuses_changed_training_flags(changed: list[str], message: str, learnable: Path, tmp_path: Path):
    """Loss weights, learning rates, schedule and augmentation are the run's too: resuming with others would train
    a mix of two runs (or, for the loss terms, fail deep inside loading), so the flag is named."""
    flags = ["--data", str(learnable), "--epochs", "1", "--result-dir", str(tmp_path / "r"), *TINY]
    train.main([*flags, "--max-steps", "1"])
    with pytest.raises(UserError, match=rf"the run was started with other flags \({message}\)"):
        train.main([*flags, *changed, "--resume"])


def test_resume_with_another_loader_warns_and_continues(learnable: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    """The loader a run gets depends on free memory (the tensor set falls back to pil), so another one on resume
    is not refused, only named: its augmentation stream differs from there on."""
    flags = ["--data", str(learnable), "--epochs", "1", "--result-dir", str(tmp_path / "r"), *TINY]
    train.main([*flags, "--max-steps", "1"])
    assert train.main([*flags, "--loader", "pil", "--resume", "--max-steps", "2"]) == {"stopped_at_step": 2}
    assert "the run trained with --loader tensor and continues with pil" in caplog.text


def test_a_checkpoint_that_does_not_record_a_flag_is_checked_against_config_json(learnable: Path, tmp_path: Path):
    """Checkpoints from before the learning rates were locked do not record them; the run's config.json does."""
    flags = ["--data", str(learnable), "--epochs", "1", "--result-dir", str(tmp_path / "r"), "--lr", "1e-3", *TINY]
    train.main([*flags, "--max-steps", "1"])
    state = load_torch(tmp_path / "r" / "checkpoint.pt")
    del state["flags"]["lr"]
    torch.save(state, tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(UserError, match=r"--lr was 0.001\)"):
        train.main([*flags[:-len(TINY) - 2], *TINY, "--resume", "--max-steps", "2"])
    assert train.main([*flags, "--resume", "--max-steps", "2"]) == {"stopped_at_step": 2}


def test_resume_at_max_steps_trains_nothing_more(learnable: Path, tmp_path: Path):
    flags = ["--data", str(learnable), "--epochs", "1", "--result-dir", str(tmp_path / "r"), "--max-steps", "2",
             *TINY]
    assert train.main(flags) == {"stopped_at_step": 2}
    saved = load_torch(tmp_path / "r" / "checkpoint.pt")
    assert train.main([*flags, "--resume"]) == {"stopped_at_step": 2}
    again = load_torch(tmp_path / "r" / "checkpoint.pt")
    assert again["step"] == 2 and all(torch.equal(again["model"][k], v) for k, v in saved["model"].items())


def test_existing_run_is_not_overwritten_without_resume(trained: Path, learnable: Path):
    with pytest.raises(UserError, match="holds a run already; pass --resume"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(trained), "--epochs", "1", *TINY])


def poison_step(monkeypatch: pytest.MonkeyPatch, call: int, poison) -> None:
    """Make total_loss's `call`-th call (counting from 1) return `poison(total, terms)` instead."""
    calls = {"n": 0}
    real = trainstep.total_loss

    def poisoned(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        calls["n"] += 1
        return poison(total, terms) if calls["n"] == call else (total, terms)

    monkeypatch.setattr(trainstep, "total_loss", poisoned)


def nan_kl(total: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
    """A NaN KL term, in the total too."""
    terms = {**terms, "kl": terms["kl"] * float("nan")}
    return total + terms["kl"], terms


def nan_gradient(total: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
    """A total of unchanged value whose gradient is NaN: √(0·kl) is 0, its derivative ∞ · 0."""
    return total + (terms["kl"] * 0).sqrt(), terms


@pytest.mark.parametrize(("poison", "message"), [
    (nan_kl, r"non-finite loss at epoch 1, step 2 \(batch 2\): term 'kl' = nan; the update was skipped"),
    (nan_gradient, r"non-finite gradient at epoch 1, step 2 \(batch 2\) with finite losses; the update was skipped")])
def test_a_non_finite_step_stops_the_run_with_the_last_good_state_saved(poison, message: str, learnable: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """The bad step is read a step late, but its update and the next were skipped on the device: the checkpoint
    holds the weights, Adam state and schedule of a run stopped cleanly before it (batch norm's running
    statistics aside, which the forward passes move)."""
    good = tmp_path / "good"
    train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(good), "--epochs", "1", "--max-steps",
               "2", *TINY])
    poison_step(monkeypatch, 3, poison)
    with pytest.raises(UserError, match=message):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1",
                   *TINY])
    saved, expected = load_torch(tmp_path / "r" / "checkpoint.pt"), load_torch(good / "checkpoint.pt")
    assert (saved["step"], saved["batch"], saved["meters"]) == (2, 2, expected["meters"])
    parameters = [name for name, value in expected["model"].items() if value.is_floating_point()
                  and "running_" not in name]
    for name in parameters:
        assert torch.equal(saved["model"][name], expected["model"][name]), name
    for key in ("exp_avg", "exp_avg_sq", "step"):
        for index, state in expected["optimizer"]["state"].items():
            assert torch.equal(saved["optimizer"]["state"][index][key], state[key]), (index, key)
    assert saved["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"] == 2
    assert saved["scheduler"]["_last_lr"] == expected["scheduler"]["_last_lr"]


def test_a_non_finite_batch_norm_statistic_keeps_the_last_checkpoint(learnable: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """A NaN image at step 2 poisons the backbone's running statistics in the forward pass, which no skipped
    update undoes: checkpoint.pt stays the one saved after step 2 (--checkpoint-every 1), every buffer finite."""
    calls = {"n": 0}
    real = trainstep.TrainStep.views

    def poisoned(self, images):
        calls["n"] += 1
        return real(self, images * float("nan") if calls["n"] == 3 else images)

    monkeypatch.setattr(trainstep.TrainStep, "views", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss at epoch 1, step 2 \(batch 2\): .*but backbone\.bn1\."
                                        r"running_mean and \d+ other buffers went non-finite too, so no checkpoint "
                                        r"was written \(--resume continues from the last one"):
        train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1",
                    "--checkpoint-every", "1", "--no-degraded-views", *TINY])
    saved = load_torch(tmp_path / "r" / "checkpoint.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(value).all() for value in saved["model"].values() if value.is_floating_point())


def test_a_skipped_update_leaves_parameters_and_adam_state_and_stays_skipped():
    """apply_gradients on a NaN loss: no parameter or moment moves, and a finite step after it is skipped too."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = trainstep.guard_updates(torch.optim.Adam([weight], lr=0.1, fused=True))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = train.parse_args([])
    balancer = train.build_balancer(args, train.loss_weights(args))
    first = trainstep.apply_gradients(weight.sum(), {"id": weight.sum()}, balancer, optimizer, scheduler, weight)
    assert first.result() == ({"loss": 3.0, "id": 3.0}, False, False)
    moved = weight.detach().clone()
    assert torch.allclose(moved, torch.full((3,), 0.9))
    for total in (weight.sum() * float("nan"), weight.sum()):
        read = trainstep.apply_gradients(total, {"id": total}, balancer, optimizer, scheduler, weight)
        assert read.result()[1]
        assert torch.equal(weight.detach(), moved)
        assert optimizer.state[weight]["step"].item() == 1.0
    with pytest.raises(ValueError, match="fused"):
        trainstep.guard_updates(torch.optim.Adam([weight]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_training_step_on_a_gpu_queues_without_a_sync(dtype: torch.dtype):
    """train.py's step as it runs with --amp (forward with degraded views and every loss, backward, the finite check,
    fused Adam, the losses' copy to the host; in float16, as on a GPU without native bfloat16, the scaled backward and
    the scale's update too): nothing in it waits for the GPU; the read a step later may."""
    device = torch.device("cuda")
    args = train.parse_args(["--backbone-name", "resnet18", "--latent-dim", "32", "--img-size", "64", "32",
                             "--batch-p", "4", "--batch-k", "2", "--amp", "--device", "cuda"])
    model = ReIDModel("resnet18", args.ae_name, 4, latent_dim=32, img_size=(64, 32)).to(
        device, memory_format=torch.channels_last)
    weights = train.loss_weights(args)
    balancer = train.build_balancer(args, weights).to(device)
    scaler = LossScaler(device) if dtype == torch.float16 else None
    optimizer = train.build_optimizer(model, args, balancer, scaler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    module = trainstep.TrainStep(model, weights, balancer, train.step_options(args))
    images, labels = torch.randn(8, 3, 64, 32, device=device), torch.arange(4, device=device).repeat_interleave(2)

    def step(index: int) -> trainstep.LossRead:
        module.step = index
        total, terms = trainstep.batch_losses(module, images, labels, device, dtype)
        return trainstep.apply_gradients(total, terms, balancer, optimizer, scheduler, train.shared_layer(model),
                                         scaler=scaler)

    reads = [step(0)]  # Adam's state and the constants made
    torch.cuda.synchronize()
    for index in (1, 2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            reads.append(step(index))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [read.result()[1] for read in reads] == [False] * 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_checkpoints_and_resume_continues(sig: signal.Signals, learnable: Path,
                                                                         tmp_path: Path):
    """As Ctrl-C in a terminal: the signal reaches train.py and its loader workers alike."""
    result = tmp_path / "r"
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(learnable), "--result-dir", str(result), *TINY,
               "--workers", "2", "--loader", "pil"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--epochs", "40"], stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (result / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # into the second epoch, the workers busy
    os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped at step" in stderr and "Traceback" not in stderr
    stopped = load_torch(result / "checkpoint.pt")["step"]
    subprocess.run([*command, "--epochs", "40", "--resume", "--max-steps", str(stopped + 2)], check=True, env=env,
                   capture_output=True)
    assert load_torch(result / "checkpoint.pt")["step"] == stopped + 2


def test_an_unreadable_image_in_a_worker_is_one_line(learnable: Path, tmp_path: Path):
    data = tmp_path / "prepared"
    shutil.copytree(learnable, data, symlinks=True)
    broken = sorted((data / "bounding_box_train").iterdir())[0]
    broken.unlink()
    broken.write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data), "--result-dir",
                             str(tmp_path / "r"), "--epochs", "1", *TINY, "--workers", "1", "--loader", "pil"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"error: {broken}: cannot read image")
    assert "Traceback" not in result.stderr


def test_sparsity_mode_flag_picks_the_penalty():
    torch.manual_seed(0)
    model = ReIDModel("resnet18", "sae", 4, latent_dim=16, img_size=(32, 16))
    images, labels = torch.randn(4, 3, 32, 16), torch.tensor([0, 0, 1, 1])
    code = model(images)["sparse_code"]
    expected = {"kl": sparsity_kl(code, 0.05), "l1": sparsity_l1(code)}
    for mode in ("kl", "l1"):
        args = train.parse_args(["--ae-name", "sae", "--sparsity-mode", mode, "--no-degraded-views"])
        weights = train.loss_weights(args)
        step = trainstep.TrainStep(model, weights, train.build_balancer(args, weights), train.step_options(args))
        _, terms = step(images, labels)
        assert terms["sparsity"].item() == pytest.approx(expected[mode].item(), rel=1e-5), mode


def test_learning_rate_warms_up_then_decays():
    assert train.lr_factor(0, 100, 10, "cosine", [], 0.1) == pytest.approx(0.1)
    assert train.lr_factor(5, 100, 10, "cosine", [], 0.1) == pytest.approx(0.55)
    assert train.lr_factor(10, 100, 10, "cosine", [], 0.1) == pytest.approx(1.0)
    assert train.lr_factor(100, 100, 10, "cosine", [], 0.1) == pytest.approx(0.01)
    assert train.lr_factor(55, 100, 10, "cosine", [], 0.1) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway
    assert train.lr_factor(60, 100, 0, "step", [50, 80], 0.1) == pytest.approx(0.1)
    assert train.lr_factor(90, 100, 0, "step", [50, 80], 0.1) == pytest.approx(0.01)
    assert train.lr_factor(49, 100, 0, "step", [50, 80], 0.1) == pytest.approx(1.0)


def torchrun(program: Path, port: int, learnable: Path, result: Path, *extra: str) -> subprocess.CompletedProcess:
    """`program` (train.py, or a wrapper of it) in two processes on the CPU, one epoch of the tiny setting."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(program),
         "--data", str(learnable), "--result-dir", str(result), "--epochs", "1", "--device", "cpu", *TINY, *extra],
        capture_output=True, text=True, env=env, cwd=result.parent, timeout=300)


# train.py run with trainstep.total_loss wrapped: `patch` is the wrapper's body, `calls[0]` the call's number.
PATCHED_TRAIN = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import trainstep
real, calls = trainstep.total_loss, [0]

def patched(*args, **kwargs):
    calls[0] += 1
{patch}

trainstep.total_loss = patched
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def patched_train(folder: Path, patch: str) -> Path:
    """A script that runs train.py with total_loss wrapped by `patch` (indented as the wrapper's body)."""
    script = folder / "patched_train.py"
    script.write_text(PATCHED_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py"), patch=patch))
    return script


def test_two_processes_train_identical_replicas(learnable: Path, tmp_path: Path):
    result = torchrun(ROOT / "train.py", 29531, learnable, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    checksums = summary["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


POISON_RANK_ONE = """\
    total, terms = real(*args, **kwargs)
    if os.environ["RANK"] == "1" and calls[0] == 3:
        terms = {**terms, "kl": terms["kl"] * float("nan")}
        total = total + terms["kl"]
    return total, terms"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(learnable: Path, tmp_path: Path):
    """Rank 1's loss turns NaN at step 2: the skip flag is shared, so both ranks skip it and stop there, rank 1
    naming the term, rank 0 the gradient, with no rank left waiting in a collective."""
    result = torchrun(patched_train(tmp_path, POISON_RANK_ONE), 29533, learnable, tmp_path / "ddp")
    assert result.returncode != 0
    where = r"at epoch 1, step 2 \(batch 2\)"
    assert re.search(rf"error: non-finite loss {where}: term 'kl' = nan; the update was skipped", result.stderr)
    assert re.search(rf"error: non-finite gradient {where} with finite losses; the update was skipped", result.stderr)
    assert load_torch(tmp_path / "ddp" / "checkpoint.pt")["step"] == 2


STOP_RANK_ONE = """\
    sys.stderr.write(f"losses over {len(args[1])} images\\n")  # one write: the two ranks' lines do not interleave
    if os.environ["RANK"] == "1" and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)"""


def test_a_stop_on_one_rank_stops_every_rank_and_the_run_resumes_exactly(learnable: Path, tmp_path: Path):
    """SIGTERM reaches rank 1 alone, in its second step: the request travels with that step's flags, so both
    ranks stop at the same step with no rank left waiting in a collective; the checkpoint holds each rank's
    generators, and the resumed run ends where an uninterrupted one does. Each rank's losses are the global
    batch's (4×2 images: its 4 and the other rank's, gathered)."""
    stopped = torchrun(patched_train(tmp_path, STOP_RANK_ONE), 29535, learnable, tmp_path / "parts")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert stopped.stderr.count("stopped at step 3 (epoch 1, batch 3)") == 2  # each rank, at the same step
    assert stopped.stderr.count("losses over 8 images") == 6 and "losses over 4 images" not in stopped.stderr
    state = load_torch(tmp_path / "parts" / "checkpoint.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2
    for result, extra in (("parts", ["--resume"]), ("whole", [])):
        run = torchrun(ROOT / "train.py", 29535, learnable, tmp_path / result, *extra, "--max-steps", "5")
        assert run.returncode == 0, run.stderr[-2000:]
    resumed, whole = (load_torch(tmp_path / name / "checkpoint.pt") for name in ("parts", "whole"))
    assert resumed["step"] == whole["step"] == 5
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_resume_in_another_number_of_processes_continues_the_global_batch(learnable: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    """Two processes checkpoint at step 2 and one continues: the sampler, augmentation, degraded views and Siamese
    pairs draw the same global batch whatever the number of processes, so the run goes on, warned that the model's
    own noise differs; config.json records the world size, SyncBatchNorm and the global batch of each."""
    two = torchrun(ROOT / "train.py", 29539, learnable, tmp_path / "run", "--max-steps", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "--sync-bn does not apply on cpu: SyncBatchNorm runs only on CUDA" in two.stderr
    batch = {"identities": 4, "images_per_identity": 2, "images": 8, "sync_bn": False}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["global_batch"] == {**batch, "world_size": 2, "images_per_rank": 4}
    assert config["world_size"] == 2 and config["flags"]["sync_bn"] is None  # as asked: a recipe keeps the default
    flags = ["--data", str(learnable), "--result-dir", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu", *TINY]
    assert train.main([*flags, "--resume", "--max-steps", "3"]) == {"stopped_at_step": 3}
    assert "saved by 2 processes and continues in 1 on the same global batch" in caplog.text
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["global_batch"] == {**batch, "world_size": 1, "images_per_rank": 8}


def test_image_reconstruction_lowers_its_loss_and_draws_recon_png(learnable: Path, tmp_path: Path):
    result = tmp_path / "recon"
    train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(result), "--epochs", "3",
               "--recon-target", "image",
                "--lr", "1e-3", *TINY])
    rows = read_metrics(result)[1:]
    assert rows[-1]["reconstruction"] < 0.8 * rows[0]["reconstruction"]
    from PIL import Image

    with Image.open(result / "recon.png") as grid:  # 8 inputs above 8 reconstructions, 16×8 each, ×4, padded
        assert grid.size == (4 * (8 * (8 + 2) + 2), 4 * (2 * (16 + 2) + 2))
        drawn = np.asarray(grid.convert("RGB"))
    images = tensorboard_events(result).Images("reconstruction")  # each epoch's grid, the last one recon.png's
    assert [image.step for image in images] == [row["step"] for row in rows]
    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as logged:
        assert np.array_equal(np.asarray(logged.convert("RGB")), drawn)
    model = ReIDModel("resnet18", "vae", 16, latent_dim=64, img_size=(64, 32), recon_target="image")
    out = model(torch.randn(4, 3, 64, 32))
    assert out["recon"].shape == out["recon_target"].shape == (4, 3, 16, 8)


def epoch_mean(scalars: list[tuple[int, float]], row: dict, steps_per_epoch: int) -> float:
    """The mean of a per-step scalar over the steps of a row's epoch."""
    values = [value for step, value in scalars if row["step"] - steps_per_epoch < step <= row["step"]]
    assert len(values) == steps_per_epoch
    return sum(values) / len(values)


def test_tensorboard_shows_what_metrics_jsonl_records_and_a_resumed_run_writes_on_without_doubled_steps(
        learnable: Path, tmp_path: Path):
    """A run stopped at step 3, events a crash after its checkpoint would have left, and the run resumed to the end
    of epoch 1: each step's loss terms once, the resumed ones, their means metrics.jsonl's; the learning rates,
    weights and validation of each row; the epoch's images/s (the resumed part's images over its seconds)."""
    result = tmp_path / "r"
    flags = ["--data", str(learnable), "--result-dir", str(result), "--epochs", "2", *TINY]
    train.main([*flags, "--max-steps", "3"])
    time.sleep(1.1)  # event files are named by the second they are opened in, and read in that order
    with SummaryWriter(str(result / "tensorboard")) as stale:
        for step in (4, 5):
            stale.add_scalar("loss/triplet", 1e6, step)
    time.sleep(1.1)
    steps = 15  # 120 images, P×K = 8
    train.main([*flags, "--resume", "--max-steps", str(steps + 2)])
    rows, scalars = read_metrics(result), tensorboard_scalars(result)
    assert [row["step"] for row in rows] == [0, steps]
    for name in ("loss", "triplet", "id", "kl", "reconstruction", "bce"):
        tag = "loss/total" if name == "loss" else f"loss/{name}"
        assert [step for step, _ in scalars[tag]] == list(range(1, steps + 3)), tag
        assert epoch_mean(scalars[tag], rows[1], steps) == pytest.approx(rows[1][name], rel=1e-5), tag
    assert max(value for _, value in scalars["loss/triplet"]) < 1e3
    assert "loss/sparsity" not in scalars
    for tag, key in (("lr/lr", "lr"), ("lr/lr_classifier", "lr_classifier")):
        assert scalars[tag] == [(steps, pytest.approx(rows[1][key], rel=1e-6))]
    for tag, key in (("val/mAP", "val_mAP"), ("val/rank1", "val_rank1"), ("val/mINP", "val_mINP"),
                     ("weight/kl", "weight_kl"), ("weight/bce", "weight_bce")):
        assert scalars[tag] == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows], tag
    assert scalars["throughput/images_per_s"] == [(steps, pytest.approx((steps - 3) * 8 / rows[1]["epoch_seconds"],
                                                                        rel=1e-5))]


def test_no_tensorboard_writes_no_event_files(learnable: Path, tmp_path: Path):
    train.main(["--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1", "--max-steps", "1",
                "--no-tensorboard", *TINY])
    assert (tmp_path / "r" / "checkpoint.pt").is_file() and not (tmp_path / "r" / "tensorboard").exists()


def overflow_gradient(total: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
    """A total of unchanged value whose gradient is 1e30 times the KL's: no loss scale keeps it finite in float16."""
    huge = terms["kl"].float() * 1e30  # the term may be float16 under autocast: its value would overflow too
    return total + (huge - huge.detach()), terms


def test_float16_skips_an_overflow_lowers_the_scale_trains_on_and_resumes_the_scale(learnable: Path, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    """--amp's float16 path (a GPU without native bfloat16), on the CPU: step 2's gradient overflows; its update is
    skipped (Adam counts 3 updates in 4 steps), the scale halves, the run goes on; --resume continues the scale
    (from 2⁸, which this run's own gradients do not overflow)."""
    monkeypatch.setattr(train, "autocast_dtype", lambda amp, device_type, native_bf16: torch.float16)
    monkeypatch.setattr(train, "LossScaler", functools.partial(LossScaler, init_scale=2.0**8))
    poison_step(monkeypatch, 3, overflow_gradient)
    flags = ["--data", str(learnable), "--result-dir", str(tmp_path / "r"), "--epochs", "1", "--amp", *TINY]
    assert train.main([*flags, "--max-steps", "4"]) == {"stopped_at_step": 4}
    assert json.loads((tmp_path / "r" / "config.json").read_text())["precision"] == "float16"
    state = load_torch(tmp_path / "r" / "checkpoint.pt")
    # steps 0 and 1 count 2 toward growth, step 2's overflow halves the scale and restarts the count, step 3 counts 1
    assert state["scaler"] == {"scale": 2.0**7, "growth_tracker": 1}
    assert {index: s["step"].item() for index, s in state["optimizer"]["state"].items()} == dict.fromkeys(
        state["optimizer"]["state"], 3.0)
    assert state["meters"]["loss"][1] == 4 * 8 and math.isfinite(state["meters"]["loss"][0])  # step 2 counted
    assert train.main([*flags, "--resume", "--max-steps", "5"]) == {"stopped_at_step": 5}
    assert load_torch(tmp_path / "r" / "checkpoint.pt")["scaler"] == {"scale": 2.0**7, "growth_tracker": 2}


# ---------------------------------------------------------------------------------------------------------
# Degraded views and the VAE's choices (issue 13)
# ---------------------------------------------------------------------------------------------------------

def tiny_step(flags: list[str], seed: int = 0) -> trainstep.TrainStep:
    """A TrainStep over a resnet18 at 32×16 with four identities, built from train.py's flags."""
    args = train.parse_args(["--latent-dim", "16", "--batch-p", "4", "--batch-k", "2", *flags])
    torch.manual_seed(seed)
    model = ReIDModel("resnet18", args.ae_name, 4, latent_dim=16, img_size=(32, 16), embedding=args.embedding)
    weights = train.loss_weights(args)
    return trainstep.TrainStep(model, weights, train.build_balancer(args, weights), train.step_options(args, 4))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 16, generator=generator), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def encoder_input(step: trainstep.TrainStep, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the autoencoder's encoder read during one step."""
    seen = []
    handle = step.model.ae.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    step(images, labels)
    handle.remove()
    return seen[0].detach()


def test_the_encoder_reads_the_degraded_view_and_the_target_is_the_clean_feature():
    images, labels = batch()
    step = tiny_step(["--ae-name", "dae", "--degraded-views", "--degrade-prob", "1"])
    step.step = 3
    (degraded, clean), views = step.views(images)
    assert views == 1
    assert clean is images and not torch.equal(degraded, images)
    model = step.model.train()
    with torch.no_grad():  # train mode: BatchNorm by batch statistics, so each view's feature is its own batch's
        degraded_feat, clean_feat = model.backbone(degraded), model.backbone(images)
    # The DAE's own feature noise (dropout and Gaussian) is off here to compare exactly.
    step.model.ae.drop, step.model.ae.noise = 0.0, 0.0
    seen = encoder_input(step, images, labels)
    torch.testing.assert_close(seen, degraded_feat)
    out = model(degraded, images)
    torch.testing.assert_close(out["recon_target"], clean_feat)
    assert (seen - out["recon_target"]).abs().max() > 1e-3


def test_no_gradient_reaches_the_clean_view_through_the_reconstruction():
    step = tiny_step(["--ae-name", "vae", "--degraded-views"])
    images, _ = batch()
    degraded = images.clone().add_(0.5).requires_grad_()
    clean = images.clone().requires_grad_()
    out = step.model.train()(degraded, clean)
    assert not out["recon_target"].requires_grad
    reconstruction_loss(out["recon"], out["recon_target"]).backward()
    assert clean.grad is None
    assert degraded.grad is not None and degraded.grad.abs().sum() > 0


def gradients_of(step: trainstep.TrainStep, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(7)  # the VAE's sample and the negative pairs' draw
    total, _ = step(images, labels)
    total.backward()
    return total.detach(), {name: p.grad.clone() for name, p in step.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ae", ["vae", "dae", "none"])
def test_the_flags_off_reproduce_the_step_bit_for_bit(ae: str):
    images, labels = batch()
    series = ["--ae-name", ae, "--no-degraded-views", "--ae-placement", "series", "--embedding", "mu"]
    absent = tiny_step(series)
    off = tiny_step([*series, "--degrade-prob", "0.3", "--kl-warmup", "0", "--beta", "1"])
    # The step as it was before these flags: the model on the batch, then the weighted sum of the losses.
    before = tiny_step(series)
    before.step = 5  # the Siamese pairs' random negatives are the step's own draw (trainstep.step_seed)
    torch.manual_seed(7)
    outputs = before.model(images)
    reference, _ = total_loss(outputs, labels, before.weights, before.model, **before.options,
                              lottery=before.pair_lottery(len(labels), images.device))
    reference.backward()
    reference_grads = {name: p.grad for name, p in before.model.named_parameters() if p.grad is not None}
    for step in (absent, off):
        step.step = 5
        total, grads = gradients_of(step, images, labels)
        assert torch.equal(total, reference.detach())
        assert grads.keys() == reference_grads.keys()
        assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)


def test_degraded_views_with_nothing_degraded_give_the_same_losses_and_gradients():
    images, labels = batch()
    total_off, grads_off = gradients_of(tiny_step(["--ae-name", "vae", "--no-degraded-views"]), images, labels)
    total_on, grads_on = gradients_of(tiny_step(["--ae-name", "vae", "--degraded-views", "--degrade-prob", "0"]),
                                      images, labels)
    assert torch.equal(total_on, total_off)
    assert all(torch.equal(grads_on[name], grads_off[name]) for name in grads_off)


def test_kl_warm_up_ramps_beta_from_zero():
    assert trainstep.kl_beta(0, 10, 0.5) == 0.0
    assert trainstep.kl_beta(5, 10, 0.5) == pytest.approx(0.25)
    assert trainstep.kl_beta(10, 10, 0.5) == 0.5
    assert trainstep.kl_beta(40, 10, 0.5) == 0.5
    assert trainstep.kl_beta(0, 0, 2.0) == 2.0
    step = tiny_step(["--ae-name", "vae", "--kl", "0.1", "--kl-warmup", "2", "--beta", "4"])  # 8 warm-up steps
    images, labels = batch()
    for at, beta in ((0, 0.0), (2, 1.0), (8, 4.0)):
        step.step = at
        torch.manual_seed(7)
        total, terms = step(images, labels)
        weights = {"triplet": 1.0, "id": 1.0, "kl": 0.1 * beta, "reconstruction": 1.0, "bce": 1.0}
        expected = sum(weights[name] * value.item() for name, value in terms.items())
        assert total.item() == pytest.approx(expected, rel=1e-5), at
        assert "kl" in terms  # reported unweighted even while β is 0


def test_a_compiled_step_compiles_once_while_beta_and_the_degraded_views_change_by_step():
    """A new step's β and view seed reach the compiled step as data: no recompilation (which past dynamo's limit
    falls back to eager), and the compiled step's total follows β as the eager one does."""
    step = tiny_step(["--ae-name", "vae", "--kl", "0.1", "--kl-warmup", "2", "--beta", "4", "--degraded-views"])
    compiled_graphs = []

    def counting_backend(graph: torch.fx.GraphModule, inputs: list) -> Callable:
        compiled_graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counting_backend)
    images, labels = batch()
    totals = {}
    for at in (0, 2, 5, 8):
        step.step = at
        torch.manual_seed(7)
        totals[at], terms = compiled(images, labels)
        expected = sum(w * terms[n].item() for n, w in {"triplet": 1.0, "id": 1.0, "kl": 0.1 * trainstep.kl_beta(
            at, 8, 4.0), "reconstruction": 1.0, "bce": 1.0}.items())
        assert totals[at].item() == pytest.approx(expected, rel=1e-5), at
        if at == 0:
            first = len(compiled_graphs)
    torch._dynamo.reset()
    assert first >= 1 and len(compiled_graphs) == first


def test_mu_bn_embeds_through_the_neck_and_the_siamese_head_gets_the_code_back():
    step = tiny_step(["--ae-name", "vae", "--embedding", "mu-bn"])
    model = step.model
    images, _ = batch()
    for _ in range(3):  # running statistics away from their initial 0 and 1
        model.train()(images)
    model.eval()
    with torch.no_grad():
        code = model.ae.encode(model.backbone(images))
        bn = model.classifier.identity.bn
        expected = (code - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        embedding = model.embed(images)
        torch.testing.assert_close(embedding, expected)
        assert not torch.allclose(embedding, code)
        torch.testing.assert_close(model.verify_embeddings(embedding[:4], embedding[4:]),
                                   model.verify(code[:4], code[4:]), rtol=1e-4, atol=1e-5)


def test_the_new_flags_are_saved_and_eval_loads_the_embedding(synthetic_prepared: Path, tmp_path: Path):
    import eval as evaluation
    import eval_inputs

    result = tmp_path / "run"
    train.main([*SHORT_SCHEDULE, "--data", str(synthetic_prepared), "--result-dir", str(result), "--epochs", "1",
                "--backbone-name", "resnet18", "--ae-name", "vae", "--latent-dim", "32", "--img-size", "64", "32",
                "--batch-p", "4", "--batch-k", "2", "--workers", "0", "--quiet", "--degraded-views",
                "--degrade-prob", "0.7", "--kl-warmup", "1", "--beta", "2", "--embedding", "mu-bn"])
    flags = json.loads((result / "config.json").read_text())["flags"]
    assert (flags["degraded_views"], flags["degrade_prob"], flags["kl_warmup"], flags["beta"], flags["embedding"]) \
        == (True, 0.7, 1.0, 2.0, "mu-bn")
    args = evaluation.parse_args(["--result-dir", str(result), "--workers", "0"])
    source = eval_inputs.evaluation_options(args).model
    settings = eval_inputs.model_settings(source, eval_inputs.trained_result(source))
    assert settings["embedding"] == "mu-bn"
    assert build_trained(settings).embedding == "mu-bn"
    report = evaluation.main(["--result-dir", str(result), "--workers", "0"])
    assert 0 <= report["mAP"] <= 1 and report["model"]["embedding"] == "mu-bn"
