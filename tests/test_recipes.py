"""train.py's defaults and recipe files: the strong baseline's schedule, configs/ through the parser, config.json as
a recipe, flags that cannot work, the result directory's lock, the ImageNet weights and the embedding validation
ranks by."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import prepare
import train
from conftest import ROOT, SHORT_SCHEDULE
from datasets import load_eval_records, load_train_records
from model import PretrainedWeightsError, build_backbone
from recipes import read_recipe
from utils import UserError, config_record, hold_run_lock

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SETTING_FLAGS = ("config", "data", "result_dir")  # where the run is, not how it trains


def test_the_defaults_are_the_strong_baselines_recipe():
    args = train.parse_args([])
    recipe = {"backbone_name": "resnet50", "pretrained": "imagenet", "last_stride": 1, "img_size": [256, 128],
              "batch_p": 16, "batch_k": 4, "lr": 3.5e-4, "lr_classifier": 3.5e-4, "weight_decay": 5e-4,
              "scheduler": "step", "epochs": 120, "warmup_epochs": 10.0, "warmup_factor": 0.01,
              "milestones": [40.0, 70.0], "erasing": 0.5, "label_smoothing": 0.1, "margin": 0.3, "triplet": 1.0,
              "id": 1.0}
    assert {name: getattr(args, name) for name in recipe} == recipe


def test_prepare_follows_the_standard_protocol_by_default(market_tree: Path, tmp_path: Path):
    prepare.main(["--data", str(market_tree), "--out", str(tmp_path / "p")])
    train_records, num_classes = load_train_records(tmp_path / "p")
    query, gallery = load_eval_records(tmp_path / "p", "val")
    assert num_classes == 3 and (query, gallery) == ([], [])  # every identity of bounding_box_train trains


def test_the_default_schedule_warms_up_from_one_percent_and_steps_at_epochs_40_and_70():
    steps = 10  # an epoch's steps
    factor = [train.lr_factor(s, 120 * steps, 10 * steps, "step", [40 * steps, 70 * steps], 0.01)
              for s in (0, 50, 100, 399, 400, 699, 700, 1199)]
    assert factor == pytest.approx([0.01, 0.505, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_in_configs_parses_and_sets_its_flags(path: Path):
    args = train.parse_args(["--config", str(path)])
    for name, value in read_recipe(path).items():
        parsed = getattr(args, name)
        if name == "data":
            assert parsed == Path(value).absolute()
        else:
            assert parsed == (type(parsed)(value) if isinstance(parsed, (Path, float)) else value), name


def test_the_baseline_recipe_is_the_strong_baseline_without_an_autoencoder():
    args = train.parse_args(["--config", str(ROOT / "configs" / "market_strong_baseline.yaml")])
    defaults = train.parse_args([])
    assert (args.ae_name, args.embedding, args.bce, args.degraded_views, args.amp) == ("none", "mu-bn", 0.0, False,
                                                                                        True)
    for name in ("epochs", "milestones", "warmup_epochs", "warmup_factor", "scheduler", "lr", "batch_p", "batch_k"):
        assert getattr(args, name) == getattr(defaults, name), name


def test_flags_on_the_command_line_win_over_the_recipe():
    args = train.parse_args(["--config", str(ROOT / "configs" / "market_strong_baseline.yaml"), "--epochs", "20",
                             "--warmup-epochs", "1.67", "--milestones", "6.67", "11.67", "--degraded-views"])
    assert (args.epochs, args.warmup_epochs, args.milestones, args.degraded_views) == (20, 1.67, [6.67, 11.67], True)
    assert args.ae_name == "none"


def test_a_results_config_json_is_a_recipe_that_repeats_the_run(tiny_run: Path, tmp_path: Path):
    recorded = json.loads((tiny_run / "config.json").read_text())["flags"]
    args = train.parse_args(["--config", str(tiny_run / "config.json"), "--result-dir", str(tmp_path / "again")])
    again = json.loads(json.dumps(config_record(args)["flags"]))
    assert {k: v for k, v in again.items() if k not in SETTING_FLAGS} == {
        k: v for k, v in recorded.items() if k not in SETTING_FLAGS}
    assert again["data"] == recorded["data"] and again["result_dir"] == str(tmp_path / "again")


def test_a_recipe_with_an_unknown_flag_or_a_bad_value_is_refused(tmp_path: Path):
    (tmp_path / "typo.yaml").write_text("epochs: 20\nbatch-q: 8\n")
    with pytest.raises(UserError, match=r"typo.yaml: unknown flag\(s\) batch_q"):
        train.parse_args(["--config", str(tmp_path / "typo.yaml")])
    (tmp_path / "list.yaml").write_text("- epochs\n")
    with pytest.raises(UserError, match="list.yaml: expected a mapping"):
        train.parse_args(["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "bad.yaml").write_text("scheduler: linear\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(UserError, match="missing.yaml: cannot read it"):
        train.parse_args(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("flags, message", [
    (["--batch-k", "1"], "--batch-k 1: expected 2 or more images an identity"),
    (["--batch-p", "1"], "--batch-p 1: expected 2 or more identities"),
    (["--ae-name", "none", "--kl", "0.1"], "--kl 0.1: --ae-name none has no kl term"),
    (["--ae-name", "vae", "--sparsity", "0.01"], "--sparsity 0.01: --ae-name vae has no sparsity term"),
    (["--ae-name", "none", "--reconstruction", "1"], "--reconstruction 1: --ae-name none has no reconstruction"),
    (["--epochs", "20"], "--milestones 40 70: expected epochs from 1 to --epochs 20"),
    (["--backbone-name", "densenet121", "--last-stride", "1"], "--last-stride: applies to ResNets"),
    (["--backbone-name", "timm:vit_tiny_patch16_224", "--last-stride", "1"], "vit_tiny_patch16_224 is not one"),
    (["--warmup-factor", "0"], "--warmup-factor 0: expected a share"),
])
def test_flags_that_leave_a_term_or_the_schedule_without_its_inputs_are_refused(flags: list[str], message: str,
                                                                                capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_default_loss_weights_of_terms_an_autoencoder_lacks_are_not_errors():
    args = train.parse_args(["--ae-name", "none", "--epochs", "20", "--scheduler", "cosine"])
    assert (args.kl, args.reconstruction) == (1e-3, 1.0)  # the defaults, which only the autoencoders that have the
    # terms compute


def test_a_second_run_in_a_locked_result_directory_is_refused_naming_the_first(learnable: Path, tmp_path: Path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
         "from utils import hold_run_lock; lock = hold_run_lock(Path(sys.argv[2])); print('held', flush=True); "
         "time.sleep(60)", str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"run: another train.py \(process {holder.pid}\) is running in it"):
            train.main([*SHORT_SCHEDULE, "--data", str(learnable), "--result-dir", str(folder), "--epochs", "1",
                        "--backbone-name", "resnet18", "--workers", "0", "--quiet"])
        assert not (folder / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = hold_run_lock(folder)  # released when its process ended
    assert (folder / ".lock").read_text().strip() == str(os.getpid())
    lock.close()


def test_imagenet_weights_offline_name_the_file_the_cache_and_both_ways_out(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    def no_network(*_args, **_kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for pretrained, weights in (("imagenet", "DEFAULT"), ("IMAGENET1K_V1", "IMAGENET1K_V1")):
        url = torchvision.models.get_model_weights("resnet50")[weights].url
        with pytest.raises(PretrainedWeightsError) as info:
            build_backbone("resnet50", pretrained=pretrained)
        message = str(info.value)
        assert message.startswith(f"--pretrained {pretrained}: could not download")
        assert url in message and str(tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]) in message
        assert "--pretrained PATH" in message and "--pretrained none" in message


def test_an_unknown_torchvision_weights_name_lists_the_names_there_are():
    with pytest.raises(ValueError, match="IMAGENET1K_V9: not a weights name of resnet50; expected imagenet, "
                                         "IMAGENET1K_V1, IMAGENET1K_V2"):
        build_backbone("resnet50", pretrained="IMAGENET1K_V9")


def test_pretrained_file_flag_loads_every_backbone_key(tmp_path: Path):
    torch.manual_seed(3)
    saved, _ = build_backbone("resnet18", last_stride=1)
    torch.save(saved.state_dict(), tmp_path / "r18.pt")
    args = train.parse_args([*SHORT_SCHEDULE, "--backbone-name", "resnet18", "--pretrained", str(tmp_path / "r18.pt"),
                             "--ae-name", "none"])
    model, _ = train.build_model(args, num_classes=5, device=torch.device("cpu"))
    loaded = model.backbone.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in saved.state_dict().items())


def test_last_stride_is_accepted_for_every_resnet_it_names():
    for name in ("resnet50", "timm:resnet50d", "timm:resnet18.a1_in1k"):
        assert train.parse_args(["--backbone-name", name, "--last-stride", "2"]).last_stride == 2


def test_timm_resnets_take_last_stride_one():
    backbone, _ = build_backbone("timm:resnet18", last_stride=1)
    halved, _ = build_backbone("timm:resnet18", last_stride=2)
    image = torch.zeros(1, 3, 128, 64)
    assert backbone.forward_features(image).shape[-2:] == (8, 4)
    assert halved.forward_features(image).shape[-2:] == (4, 2)


def test_validation_ranks_by_the_embedding_after_the_neck(learnable: Path):
    """A neck that scales one feature unit up by far reorders the neighbours: validation's mAP must be the one of
    the embedding the flag names, computed here from model.embed's two variants."""
    args = train.parse_args([*SHORT_SCHEDULE, "--backbone-name", "resnet18", "--ae-name", "none", "--img-size", "64",
                             "32", "--embedding", "mu-bn", "--workers", "0"])
    model, _ = train.build_model(args, num_classes=4, device=torch.device("cpu"))
    neck = model.classifier.identity.bn
    torch.manual_seed(0)
    with torch.no_grad():
        neck.running_var.fill_(1.0)
        neck.weight.copy_(torch.rand_like(neck.weight) * 0.01)
        neck.weight[:3] = 100.0  # three units dominate the neck's distances
    model.eval()
    val_loader, num_query = validation_loader(learnable)
    by_flag = train.validate(model, val_loader, num_query, learnable)["val_mAP"]
    figures = {}
    for embedding in ("mu", "mu-bn"):
        model.embedding = embedding
        figures[embedding] = train.validate(model, val_loader, num_query, learnable)["val_mAP"]
    assert by_flag == figures["mu-bn"]
    assert abs(figures["mu-bn"] - figures["mu"]) > 0.02


def validation_loader(prepared: Path) -> tuple[list, int]:
    """The validation split as train.py's PIL evaluation loader gives it, and its query count."""
    from tensor_loader import evaluation_loader

    query, gallery = load_eval_records(prepared, "val")
    loader = evaluation_loader("pil", query + gallery, (64, 32), 32, 0, torch.device("cpu"), False)
    return list(loader), len(query)



def test_a_timm_backbone_sees_images_normalised_with_its_own_mean_and_std():
    """The loaders normalise with ImageNet's statistics; a timm model trained on others (0.5, 0.5 here) gets the
    images as its own pipeline would have normalised them, and its weights file keeps its keys."""
    import timm

    name = "vit_tiny_patch16_224.augreg_in21k"
    torch.manual_seed(0)
    backbone, _ = build_backbone(f"timm:{name}", img_size=(64, 32))
    reference = timm.create_model(name, num_classes=0, img_size=(64, 32))
    reference.load_state_dict(backbone.state_dict())
    pixels = torch.rand(2, 3, 64, 32)
    imagenet = torchvision.transforms.functional.normalize(pixels, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    own = torchvision.transforms.functional.normalize(pixels, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    backbone.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(imagenet), reference(own), rtol=1e-4, atol=1e-5)
    plain, _ = build_backbone("timm:resnet18")  # ImageNet's own statistics: nothing added
    assert not hasattr(plain, "input_scale")
