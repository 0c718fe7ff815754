"""bench/train_throughput.py runs end to end on a tiny set, its compiled row included (train.py --compile's only
run in the suite; a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import train_throughput


def test_train_throughput_writes_every_row_and_the_ratios(synthetic_prepared: Path, tmp_path: Path, capsys):
    out = tmp_path / "throughput.json"
    train_throughput.main(["--device", "cpu", "--backbone", "resnet18", "--img-size", "32", "16", "--batch", "2",
                           "2", "--steps", "1", "--warmup", "1", "--rounds", "2", "--workers", "0", "--data",
                           str(synthetic_prepared), "--json", str(out), "--compile-row", "--", "--latent-dim", "16"])
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["bare backbone", "ours, tensors", "ours, pipeline", "loader alone",
                                    "ours, compiled"]
    assert result["rows"]["bare backbone"]["ratio_to_bare"] == 1.0
    assert all(len(row["seconds_each_round"]) == 2 for row in result["rows"].values())
    eager, compiled = (result["rows"][name]["seconds_each_round"] for name in ("ours, tensors", "ours, compiled"))
    assert result["compiled_over_eager"]["each_round"] == [e / c for e, c in zip(eager, compiled, strict=True)]
    for row in result["rows"].values():
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0
        assert abs(row["images_per_s"] * row["ms_per_step"] / 1e3 - 4) < 1e-6  # 2×2 images a step
    assert set(result["loss_terms"]) == {"triplet", "id", "kl", "reconstruction", "bce"}
    assert "ours (pipeline) / bare backbone" in capsys.readouterr().out
