"""Under torchrun a step is the global P×K batch's: two processes against one, and each rank's share of its draws."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensor_loader
from conftest import ROOT, SHORT_SCHEDULE
from datasets import PKSampler, load_train_records
from degradations import degrade
from globalbatch import sync_batch_norm
from losses import pairwise_distances
from utils import UserError

WORKER = ROOT / "tests" / "global_batch_worker.py"
# train.py's defaults (sae, degraded views, every term of it, the Siamese pairs' random negatives) on the CPU.
FLAGS = [*SHORT_SCHEDULE, "--device", "cpu", "--workers", "0"]
BALANCES = ("fixed", "gradnorm")
# The tolerance. Measured: parameters' gradients and weights to about 1e-13 (float64), GradNorm's weights'
# gradient (float32, as the balancer keeps them) to 3e-8.
TOLERANCE = 1e-5


def run_worker(out: Path, processes: int, mode: str, flags: list[str], port: int) -> dict:
    """global_batch_worker.py's record: one process, or `processes` under torchrun."""
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                        f"--master_port={port}"]
    result = subprocess.run([sys.executable, *launch, str(WORKER), str(out), mode, *flags], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=out.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The single process's record on the fixed 8×4 batch, by --balance mode."""
    folder = tmp_path_factory.mktemp("one_process")
    return {mode: run_worker(folder / f"{mode}.pt", 1, "global", [*FLAGS, "--balance", mode], 0)
            for mode in BALANCES}


def assert_same_step(two: dict, one: dict, tolerance: float) -> None:
    """The same loss values at each step, gradients after the first and parameters after the third."""
    for step_two, step_one in zip(two["losses"], one["losses"], strict=True):
        assert step_two.keys() == step_one.keys()
        for name, value in step_one.items():
            assert step_two[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
    for key in ("grads", "weights"):
        assert two[key].keys() == one[key].keys()
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=tolerance, atol=tolerance, msg=f"{key} {name}")


@pytest.mark.parametrize("balance", BALANCES)
def test_two_processes_on_the_global_batch_step_as_one_process(balance: str, one_process: dict, tmp_path: Path):
    """Each rank's half of the 8×4 batch, its loss inputs gathered: the same losses, first gradients and weights
    after three Adam steps as one process on the whole batch (float64, BatchNorm statistics frozen on the CPU)."""
    two = run_worker(tmp_path / "two.pt", 2, "global", [*FLAGS, "--balance", balance], 29541)
    assert_same_step(two, one_process[balance], TOLERANCE)


def hardest_negatives(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each anchor's batch-hard negative: the closest image of another identity."""
    distances = pairwise_distances(z).masked_fill(labels[:, None] == labels[None, :], float("inf"))
    return distances.argmin(1)


def test_without_the_gather_the_mined_triplets_and_the_step_differ(one_process: dict, tmp_path: Path):
    """The same two processes with each rank's losses over its own half (the step before the global batch): the
    batch-hard negatives of the whole batch lie partly in the other rank's half, and the step differs."""
    one = one_process["fixed"]
    labels = torch.arange(8).repeat_interleave(4)
    negatives = hardest_negatives(one["z"], labels)
    half = torch.arange(32) // 16
    assert (half[negatives] != half).any()  # a triplet that no rank can mine in its own half
    local = run_worker(tmp_path / "local.pt", 2, "local", [*FLAGS, "--balance", "fixed"], 29543)
    assert abs(local["losses"][0]["triplet"] - one["losses"][0]["triplet"]) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(local, one, TOLERANCE)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm across two processes needs two GPUs")
def test_two_gpus_with_sync_batch_norm_step_as_one_gpu(tmp_path: Path):
    """BatchNorm in training mode, its statistics the global batch's through SyncBatchNorm (on by default)."""
    flags = [*SHORT_SCHEDULE, "--device", "cuda", "--workers", "0", "--deterministic"]
    one = run_worker(tmp_path / "one.pt", 1, "global", flags, 0)
    two = run_worker(tmp_path / "two.pt", 2, "global", flags, 29545)
    assert_same_step(two, one, TOLERANCE)


def test_sync_batch_norm_applies_under_torchrun_on_cuda_alone(caplog: pytest.LogCaptureFixture):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert sync_batch_norm(None, 2, cuda) and sync_batch_norm(True, 2, cuda)
    assert not sync_batch_norm(False, 2, cuda) and not sync_batch_norm(None, 1, cuda)
    with caplog.at_level(logging.INFO, logger="reid"):
        assert not sync_batch_norm(None, 2, cpu)
        assert not sync_batch_norm(True, 2, cpu)
    assert [record.levelname for record in caplog.records] == ["INFO", "WARNING"]
    assert "--sync-bn does not apply on cpu: SyncBatchNorm runs only on CUDA" in caplog.text


def test_the_ranks_split_the_single_process_batch_in_rank_order():
    labels = [label for label in range(12) for _ in range(5)]
    whole = PKSampler(labels, p=4, k=3, seed=2)
    ranks = [PKSampler(labels, p=4, k=3, seed=2, rank=rank, world_size=2) for rank in (0, 1)]
    assert [sampler.rows for sampler in ranks] == [slice(0, 6), slice(6, 12)] and whole.rows == slice(0, 12)
    for batch, *shares in zip(whole, *ranks, strict=True):
        assert [item for share, sampler in zip(shares, ranks, strict=True) for item in share] == batch
        assert all(batch[sampler.rows] == share for share, sampler in zip(shares, ranks, strict=True))
    with pytest.raises(UserError, match="--batch-p 4: the global batch's identities are split evenly over the "
                                        "processes, and 3 do not divide 4"):
        PKSampler(labels, p=4, k=3, rank=0, world_size=3)


def test_a_rank_degrades_its_rows_as_the_whole_batch_is_degraded():
    images = torch.randn(8, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    whole = degrade(images, torch.Generator().manual_seed(3), 0.7)
    shares = [degrade(images[rank * 4:(rank + 1) * 4], torch.Generator().manual_seed(3), 0.7, (rank, 2))
              for rank in (0, 1)]
    assert torch.equal(torch.cat(shares), whole) and not torch.equal(whole, images)


def test_a_rank_augments_its_rows_as_the_whole_batch_is_augmented(synthetic_prepared: Path):
    """The decoded loader, erasing and lighting on: each rank's batch is its rows of the single process's."""
    records = load_train_records(synthetic_prepared)[0]
    store = tensor_loader.decode_records(records, (64, 32), 1, torch.device("cpu"), progress=False)
    labels = [r.label for r in records]

    def batches(rank: int, world: int) -> list[torch.Tensor]:
        sampler = PKSampler(labels, 4, 2, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(1)
        loader = tensor_loader.DecodedTrainLoader(store, records, sampler, 0.9, True, torch.device("cpu"))
        return [images for images, _, _, _ in loader]

    whole, shares = batches(0, 1), [batches(rank, 2) for rank in (0, 1)]
    for batch, first, second in zip(whole, *shares, strict=True):
        assert torch.equal(torch.cat([first, second]), batch)
