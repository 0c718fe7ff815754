"""export.py: the ONNX embedding network of each backbone family equals torch's under onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from folder_search import list_images
from model import ReIDModel, load_trained
from utils import UserError


@pytest.mark.parametrize(("backbone", "ae"), [("resnet18", "vae"), ("densenet121", "ae"), ("vgg11", "none"),
                                              ("swin_t", "sae"), ("timm:resnet18", "dae")])
def test_each_family_exports_with_a_dynamic_batch_and_equal_embeddings(synthetic_prepared: Path, backbone: str,
                                                                       ae: str):
    torch.manual_seed(0)
    model = ReIDModel(backbone, ae, 5, latent_dim=16, img_size=(64, 32)).eval()
    images = export.check_batch(list_images([synthetic_prepared / "bounding_box_test"], "--images")[:5], (64, 32))
    data = export.onnx_bytes(model)
    assert export.max_difference(data, model, images) <= 1e-4
    session = export.onnx_session(data)
    for batch in (images[:1], images[1:4]):  # other batch sizes than the traced one
        found = session.run(["embedding"], {"images": batch.numpy()})[0]
        with torch.no_grad():
            expected = model.embed(batch).numpy()
        assert found.shape == (len(batch), model.embed_dim)
        np.testing.assert_allclose(found, expected, atol=1e-4)


def test_cli_writes_the_checked_file_and_its_settings(tiny_run: Path, tmp_path: Path):
    report = export.main(["--result-dir", str(tiny_run), "--out", str(tmp_path / "model.onnx"), "--check-images", "6"])
    stored = json.loads((tmp_path / "model.onnx.json").read_text())
    assert stored["max_abs_difference"] == report["max_abs_difference"] <= 1e-4
    assert stored["input"]["shape"] == ["N", 3, 64, 32] and stored["checked_images"] == 6
    model = load_trained(tiny_run)
    batch = torch.randn(3, 3, 64, 32)
    found = export.onnx_session((tmp_path / "model.onnx").read_bytes()).run(None, {"images": batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(found, model.embed(batch).numpy(), atol=1e-4)


def test_a_failed_check_writes_nothing(tiny_run: Path, tmp_path: Path):
    with pytest.raises(UserError, match="not written"):
        export.main(["--result-dir", str(tiny_run), "--out", str(tmp_path / "model.onnx"), "--tolerance", "-1"])
    assert not (tmp_path / "model.onnx").exists()
