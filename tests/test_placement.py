"""Where the autoencoder sits (series, branch, residual, residual-apart), the views' consistency terms and CIL's
AugMix views."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from test_corruptions import smooth_image

import train
from augmix import AUGMIX_OPS, augmix_transform, augmix_views
from corruptions import CORRUPTIONS, SEVERITIES, corrupt
from losses import LossWeights, feature_consistency, js_consistency, kl_normal, reconstruction_loss, total_loss
from model import DENOISERS, PLACEMENTS, ReIDModel
from trainstep import TrainStep, clean_view_rows

IMG = (64, 32)
LATENT = 16


def build(ae: str, placement: str, embedding: str = "mu", classes: int = 4) -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel("resnet18", ae, classes, latent_dim=LATENT, img_size=IMG, placement=placement,
                     embedding=embedding)


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("ae", ["ae", "vae", "sae", "dae"])
def test_each_placement_embeds_its_own_tensor(ae: str, placement: str):
    model = build(ae, placement).eval()
    x = images()
    with torch.no_grad():
        feat = model.backbone(x)
        out = model(x)
        denoised = feat + model.ae.decoder(model.ae.encode(feat))
        expected = {"series": model.ae.encode(feat), "branch": feat, "residual": denoised,
                    "residual-apart": denoised}[placement]
        trained = feat if placement == "residual-apart" else expected  # what the triplet and identity terms read
        embedding = model.embed(x)
    dim = LATENT if placement == "series" else model.feat_dim
    assert model.embed_dim == dim and embedding.shape == (8, dim) and out["logits"].shape == (8, 4)
    torch.testing.assert_close(embedding, expected)
    torch.testing.assert_close(out["z"], trained)
    torch.testing.assert_close(out["logits"], model.classifier.identity(trained))
    assert out["recon"].shape == out["recon_target"].shape == (8, model.feat_dim)


def test_branch_with_the_latent_joins_the_two_normalised_parts():
    model = build("vae", "branch", "mu+latent").eval()
    x = images()
    with torch.no_grad():
        feat = model.backbone(x)
        embedding = model.embed(x)
        verified = model.verify_embeddings(embedding[:4], embedding[4:])
    assert model.embed_dim == model.feat_dim + LATENT and embedding.shape == (8, model.feat_dim + LATENT)
    torch.testing.assert_close(embedding[:, :model.feat_dim], feat / feat.norm(dim=1, keepdim=True))
    mu = model.ae.encode(feat)
    torch.testing.assert_close(embedding[:, model.feat_dim:], mu / mu.norm(dim=1, keepdim=True))
    assert verified.shape == (4,)  # the Siamese head reads the joined embedding
    assert model.classifier.identity.bn.num_features == model.feat_dim


@pytest.mark.parametrize("ae,placement", [("none", "series"), ("vae", "series"), ("sae", "branch"),
                                          ("dae", "residual")])
def test_the_l2_embedding_is_the_unit_code_the_triplet_reads(ae: str, placement: str):
    plain, unit = build(ae, placement).eval(), build(ae, placement, "mu-l2").eval()
    x = images()
    with torch.no_grad():
        code, embedding, out = plain.embed(x), unit.embed(x), unit(x)
    z, logits = out["z"], out["logits"]
    assert unit.embed_dim == plain.embed_dim and embedding.shape == code.shape
    torch.testing.assert_close(embedding, code / code.norm(dim=1, keepdim=True))
    torch.testing.assert_close(z, embedding)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(x)))
    torch.testing.assert_close(logits, unit.classifier.identity(code))  # the classifier reads the code itself


def backbone_gradient(model: ReIDModel, loss_of: callable) -> float:
    """The summed |gradient| the backbone's parameters get from one loss of a train-mode forward."""
    model.zero_grad(set_to_none=True)
    x = images()
    out = model(x, x + 0.1)
    loss_of(out).backward()
    return float(sum(p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None))


@pytest.mark.parametrize("ae", ["vae", "sae"])
def test_in_branch_the_autoencoder_reaches_the_backbone_only_through_its_reconstruction(ae: str):
    model = build(ae, "branch", "mu+latent").train()
    feat_dim = model.feat_dim
    regulariser = (lambda out: out["mu"].pow(2).sum() + out["logvar"].sum()) if ae == "vae" else (
        lambda out: out["sparse_code"].sum())
    assert backbone_gradient(model, regulariser) == 0
    assert backbone_gradient(model, lambda out: out["z"][:, feat_dim:].sum()) == 0  # the latent in the embedding
    assert backbone_gradient(model, lambda out: (out["recon"] - out["recon_target"]).pow(2).mean()) > 0
    assert backbone_gradient(model, lambda out: out["z"][:, :feat_dim].sum()) > 0  # the feature itself


def test_in_branch_a_hook_on_the_feature_sees_the_reconstructions_gradient_alone():
    model = build("vae", "branch", "mu+latent").train()
    x = images()
    out = model(x, x + 0.1)
    seen: list[torch.Tensor] = []
    out["feat"].register_hook(lambda grad: seen.append(grad.clone()))
    # the KL and the latent's share of the embedding: nothing (or zeros, through the concatenation) reaches it
    (kl_normal(out["mu"], out["logvar"]) + out["z"][:, model.feat_dim:].pow(2).sum()).backward(retain_graph=True)
    assert all(grad.abs().sum() == 0 for grad in seen)
    seen.clear()
    reconstruction_loss(out["recon"], out["recon_target"]).backward()
    assert len(seen) == 1 and seen[0].abs().sum() > 0


@pytest.mark.parametrize("placement", DENOISERS)
@pytest.mark.parametrize("ae", ["ae", "dae", "vae"])
def test_residual_with_the_denoiser_zeroed_is_the_model_without_an_autoencoder(ae: str, placement: str):
    residual = build(ae, placement)
    plain = build("none", "series")
    plain.backbone.load_state_dict(residual.backbone.state_dict())
    plain.classifier.load_state_dict(residual.classifier.state_dict())
    torch.testing.assert_close(residual.ae.decoder[-1].weight, torch.zeros_like(residual.ae.decoder[-1].weight))
    x, labels = images(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    weights = LossWeights(triplet=1.0, id=1.0, bce=1.0)
    for model in (residual, plain):
        model.train()
    lottery = torch.rand(28, generator=torch.Generator().manual_seed(5))
    got = total_loss(residual(x), labels, weights, residual, pair_count=4, lottery=lottery)[1]
    want = total_loss(plain(x), labels, weights, plain, pair_count=4, lottery=lottery)[1]
    for name in ("triplet", "id", "bce"):
        torch.testing.assert_close(got[name], want[name])
    with torch.no_grad():
        torch.testing.assert_close(residual.eval().embed(x), plain.eval().embed(x))


def test_residual_draws_the_denoised_degraded_feature_towards_the_clean_one():
    model = build("dae", "residual").train()
    x = images()
    clean = x + 0.5
    out = model(x, clean)
    torch.testing.assert_close(out["recon"], out["z"])  # the denoised feature is both the embedding and compared
    with torch.no_grad():
        torch.testing.assert_close(out["recon_target"], model.backbone(clean))
    assert not out["recon_target"].requires_grad


def parameter_gradient(parameters: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> float:
    """The summed |gradient| `parameters` get from `loss`."""
    grads = torch.autograd.grad(loss, list(parameters), retain_graph=True, allow_unused=True)
    return float(sum(g.abs().sum() for g in grads if g is not None))


@pytest.mark.parametrize("ae", ["ae", "dae"])
def test_residual_apart_trains_the_denoiser_by_its_reconstruction_alone(ae: str):
    model = build(ae, "residual-apart").train()
    x, labels = images(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model(x, x + 0.5)
    weights = LossWeights(triplet=1.0, id=1.0, bce=1.0)
    discriminative = total_loss(out, labels, weights, model, pair_count=4,
                                lottery=torch.rand(28, generator=torch.Generator().manual_seed(5)))[0]
    recon = reconstruction_loss(out["recon"], out["recon_target"])
    assert parameter_gradient(model.ae.parameters(), discriminative) == 0
    assert parameter_gradient(model.backbone.parameters(), discriminative) > 0
    assert parameter_gradient(model.ae.parameters(), recon) > 0
    assert parameter_gradient(model.backbone.parameters(), recon) == 0
    with torch.no_grad():  # the denoised degraded feature is drawn towards the clean view's
        torch.testing.assert_close(out["recon"], out["feat"] + model.ae.decoder(model.ae.encode(out["feat"])))
        torch.testing.assert_close(out["recon_target"], model.backbone(x + 0.5))


def test_stacked_views_take_the_clean_views_feature_as_every_target():
    model = build("sae", "series").train()
    x = images(4)
    out = model(torch.cat([x, x + 0.3, x - 0.3]), views=3)
    torch.testing.assert_close(out["target_feat"], out["feat"][:4].detach().repeat(3, 1))
    torch.testing.assert_close(out["recon_target"], out["target_feat"])
    rows = clean_view_rows(out, 3)
    assert rows["z"].shape == (4, LATENT) and rows["logits"].shape == (4, 4)
    assert rows["view_logits"].shape == (4, 3, 4)
    torch.testing.assert_close(rows["view_logits"][:, 1], out["logits"][4:8])


def test_the_js_term_matches_a_hand_worked_value():
    # p = (0.5, 0.5), (0.9, 0.1), (0.2, 0.8); M = (1.6/3, 1.4/3); (1/3)·Σ KL(p‖M) by hand:
    # KL₁ = 0.5 ln(0.5/0.53333) + 0.5 ln(0.5/0.46667) = 0.0022272; KL₂ = 0.9 ln(0.9/0.53333) + 0.1 ln(0.1/0.46667)
    # = 0.3168788; KL₃ = 0.2 ln(0.2/0.53333) + 0.8 ln(0.8/0.46667) = 0.2350313; mean 0.1847125.
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    assert js_consistency(logits).item() == pytest.approx(0.1847125, abs=1e-6)
    assert js_consistency(logits + 3.0).item() == pytest.approx(0.1847125, abs=1e-6)  # softmax ignores a shift


def test_the_feature_consistency_matches_a_hand_worked_value():
    feat = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    clean = torch.tensor([[1.0, 0.0], [3.0, -1.0]], requires_grad=True)
    loss = feature_consistency(feat, clean)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    loss.backward()
    assert clean.grad is None or clean.grad.abs().sum() == 0  # the clean view's feature is held fixed


def test_the_consistency_terms_are_zero_for_identical_views():
    logits = torch.randn(5, 1, 7).repeat(1, 3, 1)
    assert js_consistency(logits).item() == pytest.approx(0.0, abs=1e-6)
    feat = torch.randn(5, 9)
    assert feature_consistency(feat, feat.clone()).item() == 0.0


def step_args(**flags) -> argparse.Namespace:
    return train.parse_args(["--data", "unused", "--batch-p", "2", "--batch-k", "2", "--ae-name", "none",
                             "--no-degraded-views", *[token for k, v in flags.items() for token in (k, v) if token]])


def test_a_view_that_is_not_degraded_gives_a_zero_consistency_term():
    args = step_args(**{"--degraded-views": "", "--degrade-prob": "0", "--consistency": "1"})
    model = build("none", "series")
    weights = train.loss_weights(args)
    step = TrainStep(model, weights, train.build_balancer(args, weights), train.step_options(args)).train()
    _, terms = step(images(4), torch.tensor([0, 0, 1, 1]))
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("ae", "recon_target", "consistency", "passes"), [
    ("ae", "image", "0", 1), ("ae", "feature", "0", 2), ("none", "image", "0", 1), ("none", "image", "1", 2)])
def test_the_clean_view_goes_through_the_backbone_only_for_a_feature_target(ae: str, recon_target: str,
                                                                             consistency: str, passes: int):
    args = step_args(**{"--ae-name": ae, "--recon-target": recon_target, "--degraded-views": "",
                        "--consistency": consistency})
    torch.manual_seed(0)
    model = ReIDModel("resnet18", ae, 4, latent_dim=LATENT, img_size=IMG, recon_target=recon_target)
    weights = train.loss_weights(args)
    step = TrainStep(model, weights, train.build_balancer(args, weights), train.step_options(args)).train()
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    step(images(4), torch.tensor([0, 0, 1, 1]))
    assert calls == [4] * passes


def test_augmix_trains_on_the_clean_view_and_ties_the_three_by_js():
    args = step_args(**{"--augmix": ""})
    assert args.js == train.CIL_JS_WEIGHT and not args.degraded_views
    model = build("none", "series")
    weights = train.loss_weights(args)
    step = TrainStep(model, weights, train.build_balancer(args, weights), train.step_options(args)).train()
    total, terms = step(images(4), torch.tensor([0, 0, 1, 1]))
    assert set(terms) == {"triplet", "id", "bce", "js"} and terms["js"].item() > 0
    total.backward()


def test_augmix_uses_only_operations_that_are_not_benchmark_corruptions():
    space = augmix_transform()._PARTIAL_AUGMENTATION_SPACE
    assert tuple(space) == AUGMIX_OPS
    benchmark_words = {part for name in CORRUPTIONS for part in name.split("_")}
    assert not {name.lower() for name in AUGMIX_OPS} & benchmark_words


def test_no_augmix_operation_equals_a_benchmark_corruption_on_a_test_image():
    image = smooth_image(0)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    transform = augmix_transform()
    corrupted = [corrupt(image, name, severity, 0).astype(float) for name in CORRUPTIONS for severity in SEVERITIES]
    for name in AUGMIX_OPS:
        magnitudes_of, signed = transform._PARTIAL_AUGMENTATION_SPACE[name]
        magnitudes = magnitudes_of(10, *image.shape[:2])
        # every non-zero magnitude AugMix draws at its severity, both signs
        values = [0.0] if magnitudes is None else [float(magnitudes[i]) for i in range(1, transform.severity)]
        for value in values:
            for sign in (1, -1) if signed else (1,):
                out = transform._apply_image_or_video_transform(tensor, name, sign * value,
                                                                interpolation=transform.interpolation,
                                                                fill=transform._fill)
                out = out.permute(1, 2, 0).numpy().astype(float)
                nearest = min(np.abs(out - other).mean() for other in corrupted)
                assert nearest > 2.0, f"{name} {sign * value:g} is {nearest:.2f} grey levels from a corruption"


def test_augmix_views_are_a_function_of_the_seed_and_the_global_row():
    x = images(6)
    whole = augmix_views(x, 99, 2)
    halves = [augmix_views(x[3 * r:3 * (r + 1)], 99, 2, (r, 2)) for r in range(2)]
    for view in range(2):
        torch.testing.assert_close(torch.cat([halves[0][view], halves[1][view]]), whole[view])
    assert not torch.equal(augmix_views(x, 100, 1)[0], whole[0])
    assert whole[0].shape == x.shape and not torch.equal(whole[0], whole[1])


@pytest.mark.parametrize(("flags", "message"), [
    (["--augmix", "--degraded-views"], "choose one kind of views"),
    (["--no-degraded-views", "--js", "3"], "add --augmix"),
    (["--no-degraded-views", "--consistency", "1"], "needs --degraded-views or --augmix"),
    (["--ae-name", "vae", "--ae-placement", "series", "--embedding", "mu+latent"], "needs placement branch"),
    (["--ae-name", "none", "--ae-placement", "branch"], "--ae-name none has none"),
    (["--ae-name", "vae", "--ae-placement", "residual", "--recon-target", "image"], "not the image"),
    (["--ae-name", "dae", "--ae-placement", "residual-apart", "--recon-target", "image"], "not the image"),
])
def test_views_and_placement_flags_that_do_not_fit_are_named(flags: list[str], message: str,
                                                            capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "unused", *flags])
    assert message in capsys.readouterr().err


def test_a_mixed_image_stays_an_image():
    x = images(2)
    (mixed,) = augmix_views(x, 1, 1)
    pixels = mixed * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[
        :, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert math.isfinite(float(mixed.sum()))
