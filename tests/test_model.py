"""Backbones × autoencoders forward and backward on CPU, the heads' properties, and weights loading."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from losses import LossWeights, kl_normal, reconstruction_loss, total_loss
from model import (
    AE_NAMES,
    PretrainedWeightsError,
    ReIDModel,
    SiameseHead,
    WeightsMismatchError,
    build_autoencoder,
    build_backbone,
    load_part_state,
)
from utils import UserError

TIMM_SWIN = "timm:swin_tiny_patch4_window7_224"
# Published widths of each network's last stage, written out rather than read from model.py.
SMALLEST = {"resnet18": 512, "densenet121": 1024, "vgg11": 512, "swin_t": 768, "timm:resnet18": 512,
            TIMM_SWIN: 768}
LATENT = 16
LABELS = torch.tensor([0, 0, 1, 1])
# The loss terms each autoencoder adds to triplet, id and bce.
AE_TERMS = {"none": set(), "ae": {"reconstruction"}, "dae": {"reconstruction"},
            "vae": {"kl", "reconstruction"}, "sae": {"sparsity", "reconstruction"}}
OUTPUT_KEYS = {"feat", "target_feat", "z", "latent", "recon", "recon_target", "mu", "logvar", "logits", "sparse_code"}


def first_parameter_grad(module: nn.Module) -> torch.Tensor:
    """Gradient of the module's first parameter: the input layer for every backbone here."""
    return next(module.parameters()).grad


def train_step_checks(name: str, ae: str, size: tuple[int, int]) -> None:
    """Forward and backward on 2 identities × 2 images: shapes, loss terms, gradients reach the backbone."""
    torch.manual_seed(0)
    model = ReIDModel(name, ae, num_classes=2, latent_dim=LATENT, img_size=size)
    out = model(torch.randn(4, 3, *size))
    feat_dim = SMALLEST.get(name, model.feat_dim)
    embed_dim = feat_dim if ae == "none" else LATENT
    assert set(out) == OUTPUT_KEYS
    assert (model.feat_dim, model.embed_dim) == (feat_dim, embed_dim)
    assert out["feat"].shape == (4, feat_dim)
    assert out["z"].shape == (4, embed_dim)
    assert out["logits"].shape == (4, 2)
    total, terms = total_loss(out, LABELS, LossWeights(1, 1, 1, 1, 1, 1), model)
    total.backward()
    assert torch.isfinite(total)
    grad = first_parameter_grad(model.backbone)
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert set(terms) == {"triplet", "id", "bce"} | AE_TERMS[ae]


@pytest.mark.parametrize("ae", AE_NAMES)
@pytest.mark.parametrize("name", list(SMALLEST))
def test_every_family_and_autoencoder_trains_at_128x64(name: str, ae: str):
    train_step_checks(name, ae, (128, 64))


@pytest.mark.parametrize("name, ae", [("resnet50", "ae"), ("densenet121", "vae"), ("vgg11_bn", "sae"),
                                      ("swin_t", "dae"), (TIMM_SWIN, "vae"), ("timm:resnet18", "none")])
def test_every_family_trains_at_256x128(name: str, ae: str):
    train_step_checks(name, ae, (256, 128))


def test_largest_of_each_family_builds_with_its_feature_dim():
    resnet, resnet_dim = build_backbone("resnet152")
    densenet, densenet_dim = build_backbone("densenet201")
    vgg, vgg_dim = build_backbone("vgg19_bn")
    swin, swin_dim = build_backbone("swin_b")
    assert (resnet_dim, densenet_dim, vgg_dim, swin_dim) == (2048, 1920, 512, 1024)
    assert resnet.layer4[-1].conv3.out_channels == 2048
    assert densenet.features.norm5.num_features == 1920
    assert [m for m in vgg.features if isinstance(m, nn.Conv2d)][-1].out_channels == 512
    assert swin.norm.normalized_shape == (1024,)


def test_timm_feature_dim_is_the_pooled_output_width():
    # MobileNetV3 widens its 576 channels to 1024 in a pre-logits layer after pooling.
    backbone, dim = build_backbone("timm:mobilenetv3_small_100")
    assert dim == 1024
    assert backbone.eval()(torch.randn(1, 3, 128, 64)).shape == (1, 1024)


def test_timm_swin_is_created_for_the_requested_input_size():
    backbone, _ = build_backbone(TIMM_SWIN, img_size=(128, 64))
    assert tuple(backbone.patch_embed.img_size) == (128, 64)


@pytest.mark.parametrize("last_stride, map_size", [(1, (8, 4)), (2, (4, 2))])
def test_resnet_last_stride_sets_the_final_map_size(last_stride: int, map_size: tuple[int, int]):
    backbone, _ = build_backbone("resnet18", last_stride=last_stride)
    shapes = []
    backbone.layer4.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[2:])))
    backbone.eval()(torch.randn(1, 3, 128, 64))
    assert shapes == [map_size]


def test_vgg_feature_is_the_global_mean_of_its_conv_features():
    backbone, _ = build_backbone("vgg11")
    backbone.eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(images), backbone.features(images).mean((2, 3)), atol=1e-6)


def test_vae_embedding_is_mu_at_eval_and_sampled_latent_in_training():
    torch.manual_seed(0)
    model = ReIDModel("resnet18", "vae", num_classes=2, latent_dim=LATENT)
    images = torch.randn(4, 3, 32, 16)
    out = model(images)
    assert torch.equal(out["z"], out["mu"])
    assert not torch.allclose(out["latent"], out["mu"])
    model.eval()
    with torch.no_grad():
        out = model(images)
        mu = model.ae.mu(model.ae.encoder(model.backbone(images)))
        assert torch.equal(out["latent"], out["mu"])
        assert torch.allclose(model.embed(images), mu)
        assert torch.equal(model.embed(images), model.embed(images))


def test_vae_stays_finite_under_extreme_inputs():
    torch.manual_seed(0)
    vae = build_autoencoder("vae", 32, 8)
    with torch.no_grad():
        vae.logvar.weight.fill_(100.0)
        vae.logvar.weight[::2].neg_()
    feat = (1e4 * torch.randn(8, 32)).requires_grad_()
    raw_logvar = vae.logvar(vae.encoder(feat))
    assert raw_logvar.max() > 1e3 and raw_logvar.min() < -1e3
    out = vae(feat)
    assert out["logvar"].abs().max() <= 10
    loss = kl_normal(out["mu"], out["logvar"]) + reconstruction_loss(out["recon"], feat.detach())
    loss.backward()
    grads = [p.grad for p in vae.parameters() if p.grad is not None] + [feat.grad]
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)


def test_sae_code_is_the_sigmoid_embedding():
    sae = build_autoencoder("sae", 32, 8)
    feat = torch.randn(6, 32)
    out = sae(feat)
    assert out["sparse_code"] is out["z"]
    assert torch.allclose(out["z"], torch.sigmoid(sae.encoder(feat)))
    assert ((out["z"] > 0) & (out["z"] < 1)).all()


def test_dae_corrupts_its_input_only_in_training():
    torch.manual_seed(0)
    dae = build_autoencoder("dae", 32, 8)
    feat = torch.randn(6, 32)
    assert not torch.allclose(dae(feat)["z"], dae.encoder(feat))
    dae.eval()
    assert torch.equal(dae(feat)["z"], dae.encoder(feat))


def test_recon_target_is_the_clean_backbone_feature():
    torch.manual_seed(0)
    model = ReIDModel("resnet18", "dae", num_classes=2, latent_dim=LATENT)
    out = model(torch.randn(4, 3, 32, 16))
    assert torch.equal(out["recon_target"], out["feat"])
    assert not out["recon_target"].requires_grad
    assert out["recon"].shape == out["feat"].shape


def test_none_autoencoder_passes_the_feature_through():
    model = ReIDModel("resnet18", "none", num_classes=3, latent_dim=LATENT)
    out = model(torch.randn(4, 3, 32, 16))
    assert out["z"] is out["feat"]
    assert out["recon"] is None and out["recon_target"] is None and out["mu"] is None
    assert model.embed_dim == 512


def test_siamese_head_is_symmetric():
    torch.manual_seed(0)
    head = SiameseHead(8)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert head(a, b).shape == (5,)
    assert torch.equal(head(a, b), head(b, a))


def test_bnneck_bias_stays_frozen_and_classifier_has_no_bias():
    model = ReIDModel("resnet18", "ae", num_classes=3, latent_dim=LATENT)
    out = model(torch.randn(4, 3, 32, 16))
    out["logits"].sum().backward()
    neck = model.classifier.identity
    assert not neck.bn.bias.requires_grad and neck.bn.bias.grad is None
    assert torch.equal(neck.bn.bias, torch.zeros(LATENT))
    assert neck.fc.bias is None and neck.fc.weight.shape == (3, LATENT)


def test_parts_hold_every_parameter_once_and_classifier_holds_both_heads():
    model = ReIDModel("resnet18", "vae", num_classes=3, latent_dim=LATENT)
    parts = model.parts()
    assert list(parts) == ["backbone", "ae", "classifier"]
    part_params = [id(p) for part in parts.values() for p in part.parameters()]
    assert sorted(part_params) == sorted(id(p) for p in model.parameters())
    keys = model.classifier.state_dict()
    assert "identity.fc.weight" in keys and "siamese.mlp.0.weight" in keys


def test_verify_scores_pairs_with_the_siamese_head():
    model = ReIDModel("resnet18", "ae", num_classes=3, latent_dim=LATENT)
    z_i, z_j = torch.randn(3, LATENT), torch.randn(3, LATENT)
    assert torch.equal(model.verify(z_i, z_j), model.classifier.siamese(z_i, z_j))


def test_unknown_names_raise_value_errors_listing_the_valid_names():
    with pytest.raises(ValueError, match="resnet18.*swin_b.*timm:<name>"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="unknown timm model 'not_a_model'"):
        build_backbone("timm:not_a_model")
    with pytest.raises(ValueError, match="none, ae, vae, sae, dae"):
        build_autoencoder("xae", 8, 4)


def test_pretrained_file_loads_a_saved_backbone(tmp_path: Path):
    torch.manual_seed(0)
    saved, _ = build_backbone("resnet18")
    torch.save(saved.state_dict(), tmp_path / "backbone.pt")
    torch.save({"state_dict": saved.state_dict()}, tmp_path / "wrapped.pt")
    for file in ("backbone.pt", "wrapped.pt"):
        loaded, _ = build_backbone("resnet18", pretrained=tmp_path / file)
        for key, value in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_pretrained_file_in_torchvision_imagenet_format_loads_without_its_classifier(tmp_path: Path):
    torch.manual_seed(0)
    imagenet = torchvision.models.densenet121()
    torch.save(imagenet.state_dict(), tmp_path / "densenet121.pth")
    loaded, _ = build_backbone("densenet121", pretrained=tmp_path / "densenet121.pth")
    assert torch.equal(loaded.features.conv0.weight, imagenet.features.conv0.weight)
    assert torch.equal(loaded.features.norm5.running_var, imagenet.features.norm5.running_var)


def test_densenet_imagenet_file_in_torchvision_legacy_format_loads(tmp_path: Path):
    # torchvision's DenseNet files name layers "norm.1" (for "norm1") and, being older than PyTorch 0.4.1,
    # have no BatchNorm step counters.
    torch.manual_seed(0)
    imagenet = torchvision.models.densenet121()
    legacy = {key.replace("norm1", "norm.1").replace("conv2", "conv.2"): value
              for key, value in imagenet.state_dict().items() if not key.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    loaded, _ = build_backbone("densenet121", pretrained=tmp_path / "densenet121-a639ec97.pth")
    block = loaded.features.denseblock1.denselayer1
    assert torch.equal(block.norm1.weight, imagenet.features.denseblock1.denselayer1.norm1.weight)
    assert torch.equal(block.conv2.weight, imagenet.features.denseblock1.denselayer1.conv2.weight)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table resizing warns about torch internals
def test_timm_swin_imagenet_file_loads_at_the_reid_input_size(tmp_path: Path):
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model("swin_tiny_patch4_window7_224")  # 224×224, with its 1000-class head
    torch.save(imagenet.state_dict(), tmp_path / "swin.pth")
    loaded, _ = build_backbone(TIMM_SWIN, pretrained=tmp_path / "swin.pth", img_size=(128, 64))
    assert torch.equal(loaded.patch_embed.proj.weight, imagenet.patch_embed.proj.weight)
    # The last stage's map is 4×2: its 7×7 window shrinks to 4×2, its bias table to (2·4−1)·(2·2−1) rows.
    assert loaded.layers[3].blocks[0].attn.relative_position_bias_table.shape == (21, 24)


def test_a_file_without_a_state_dict_is_refused(tmp_path: Path):
    torch.save({"epoch": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(WeightsMismatchError, match="not a state dict"):
        build_backbone("resnet18", pretrained=tmp_path / "not_weights.pt")


def test_shape_mismatch_names_the_part_the_key_and_both_shapes(tmp_path: Path):
    state = build_backbone("resnet18")[0].state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError) as info:
        build_backbone("resnet18", pretrained=tmp_path / "bad.pt")
    message = str(info.value)
    assert message.startswith("backbone weights")
    assert "conv1.weight is [32, 3, 7, 7] in the file but [64, 3, 7, 7] in the model" in message


def test_key_mismatch_lists_missing_and_unexpected_keys():
    ae = build_autoencoder("ae", 8, 4)
    state = ae.state_dict()
    del state["decoder.3.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as info:
        load_part_state(ae, state, "ae")
    message = str(info.value)
    assert message.startswith("ae weights")
    assert "missing keys (1): decoder.3.bias" in message
    assert "unexpected keys (1): extra.weight" in message


def test_imagenet_weights_offline_raise_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*_args, **_kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "backbone resnet18" in message and "could not download" in message
    assert "https://download.pytorch.org/models/resnet18-" in message and "--pretrained PATH" in message


def test_timm_imagenet_weights_offline_raise_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    import timm.models._hub

    def no_network(*_args, **_kwargs):
        raise OSError("cannot reach the Hugging Face Hub")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone("timm:resnet18", pretrained="imagenet")
    message = str(info.value)
    assert "backbone timm:resnet18" in message and "timm/resnet18.a1_in1k" in message
    assert "--pretrained PATH" in message
