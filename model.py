"""The re-ID network: backbone → autoencoder → identity classifier and Siamese head, tied in ReIDModel."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from datasets import IMAGENET_MEAN, IMAGENET_STD
from resultdir import ResultDir
from utils import UserError, load_torch, resolve_device


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights were asked for but could not be fetched."""


class WeightsMismatchError(UserError, RuntimeError):
    """A weights file does not fit the part it is loaded into."""


# ---------------------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------------------

MAX_LISTED_KEYS = 5


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a file, plain or under a "state_dict"/"model" key; also .safetensors (timm's)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = load_torch(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def _listed(keys: list[str]) -> str:
    more = f", … and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def load_part_state(module: nn.Module, state: dict[str, Tensor], part: str) -> None:
    """Load `state` into `module` strictly; a mismatch names the part, the keys and both shapes."""
    own = module.state_dict()
    # Files saved before PyTorch 0.4.1 (torchvision's older ImageNet weights) lack BatchNorm's step counters.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} is {list(state[k].shape)} in the file but {list(own[k].shape)} in the model"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if wrong:
        problems.append(f"shape mismatch ({len(wrong)}): " + _listed(wrong))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + _listed(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + _listed(unexpected))
    if problems:
        raise WeightsMismatchError(f"{part} weights do not fit the {part}: " + "; ".join(problems))
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Backbones: a library model with its ImageNet classifier replaced by nn.Identity, so it returns the
# globally pooled feature and its state-dict keys stay the library's (an ImageNet file loads as it is).
# ---------------------------------------------------------------------------------------------------------

TORCHVISION_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "densenet121": 1024, "densenet161": 2208, "densenet169": 1664, "densenet201": 1920,
    **{f"vgg{depth}{bn}": 512 for depth in (11, 13, 16, 19) for bn in ("", "_bn")},
    "swin_t": 768, "swin_s": 768, "swin_b": 1024,
}
BACKBONE_NAMES = tuple(TORCHVISION_DIMS)
TIMM_PREFIX = "timm:"
# The ImageNet classifier's attribute in each torchvision family.
HEADS = {"resnet": "fc", "densenet": "classifier", "vgg": "classifier", "swin": "head"}
# Keys of an ImageNet classifier that a headless backbone drops when loading a library's weights file.
HEAD_PREFIXES = ("fc.", "classifier.", "head.")
DENSENET_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12]\.)")


def _fetch_error(pretrained: str, name: str, source: str, cache: str, err: OSError) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"--pretrained {pretrained}: could not download the ImageNet weights of backbone {name} ({err}). Fetch "
        f"{source} where there is network access into {cache} (read from there next time), or pass the file: "
        "--pretrained PATH, or train from random weights: --pretrained none")


def is_weights_name(pretrained: str | Path | None) -> bool:
    """Whether `pretrained` names torchvision weights (IMAGENET1K_V1, ...) rather than a file."""
    return isinstance(pretrained, str) and bool(re.fullmatch(r"[A-Z0-9_]+", pretrained)) and not Path(
        pretrained).exists()


def torchvision_weights(name: str, pretrained: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights of backbone `name` that `pretrained` names: imagenet is the library's DEFAULT."""
    weights = torchvision.models.get_model_weights(name)
    if pretrained == "imagenet":
        return weights.DEFAULT
    if pretrained not in weights.__members__:
        raise ValueError(f"--pretrained {pretrained}: not a weights name of {name}; expected imagenet, "
                         f"{', '.join(weights.__members__)}, a file or none")
    return weights[pretrained]


def is_resnet(name: str) -> bool:
    """Whether backbone `name` is a ResNet, torchvision's or timm's (the backbones --last-stride applies to)."""
    if not name.startswith(TIMM_PREFIX):
        return name.startswith("resnet")
    import timm

    arch = name[len(TIMM_PREFIX):].split(".")[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__ == "timm.models.resnet"


def _set_last_stride_one(resnet: nn.Module) -> None:
    # The first block of layer4 is the only place that halves the map; keeping it doubles the map (BoT).
    for module in resnet.layer4[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):  # timm's avg-down shortcut (50d)
            module.kernel_size, module.stride = 1, 1


def _torchvision_backbone(name: str, pretrained: str | None, last_stride: int) -> tuple[nn.Module, int]:
    weights = torchvision_weights(name, pretrained) if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except OSError as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        raise _fetch_error(pretrained, name, weights.url, str(cache), err) from err
    family = re.match(r"[a-z]+", name).group()
    if family == "vgg":
        # Pool the conv features globally; the 7×7 pool and the FC layers are ImageNet-specific.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
    if family == "resnet" and last_stride == 1:
        _set_last_stride_one(model)
    setattr(model, HEADS[family], nn.Identity())
    return model, TORCHVISION_DIMS[name]


def _timm_backbone(name: str, imagenet: bool, img_size: tuple[int, int]) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} in {TIMM_PREFIX}{name} (see timm.list_models())")
    kwargs = {"pretrained": imagenet, "num_classes": 0}
    try:
        try:
            # Swin and ViT fix their grid (and Swin its attention masks) at creation, so they need the size.
            model = timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            model = timm.create_model(name, **kwargs)
    except OSError as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = cfg.hf_hub_id if cfg and cfg.hf_hub_id else None
        source = f"{hub_id} from the Hugging Face Hub" if hub_id else "timm's weights"
        cache = f"{HF_HUB_CACHE}/models--{hub_id.replace('/', '--')}" if hub_id else "timm's cache"
        raise _fetch_error("imagenet", TIMM_PREFIX + name, source, cache, err) from err
    renormalise_input(model, model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get(
        "std", IMAGENET_STD))
    # Some models (MobileNetV3) add a pre-logits layer after num_features; its width is the output's.
    return model, getattr(model, "head_hidden_size", None) or model.num_features


def renormalise_input(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make `model` take images normalised with ImageNet's statistics (as every loader here gives them) when it was
    trained on another mean and std: a per-channel affine map before its forward, from buffers outside its state
    dict (its weights files load as they are)."""
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return
    imagenet_mean, imagenet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    scale = imagenet_std / torch.tensor(std)
    shift = (imagenet_mean - torch.tensor(mean)) / torch.tensor(std)
    model.register_buffer("input_scale", scale[None, :, None, None], persistent=False)
    model.register_buffer("input_shift", shift[None, :, None, None], persistent=False)
    model.register_forward_pre_hook(lambda module, args: (args[0] * module.input_scale + module.input_shift,
                                                          *args[1:]))


def _convert_library_file(state: dict[str, Tensor], backbone: nn.Module, name: str) -> dict[str, Tensor]:
    # What the libraries do to their own files on load. timm: each architecture's checkpoint_filter_fn (by
    # its modules' convention), which resizes what depends on the input size (Swin's window bias tables,
    # ViT's position embeddings). torchvision: DenseNet's files predate its names ("norm.1" for "norm1").
    if name.startswith(TIMM_PREFIX):
        import sys

        convert = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
        return convert(state, backbone) if convert else state
    if name.startswith("densenet"):
        return {DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return state


def load_pretrained_file(backbone: nn.Module, path: str | Path, name: str) -> None:
    """Load backbone `name` from our backbone.pt or from the library's ImageNet file (classifier dropped)."""
    state = _convert_library_file(read_state_dict(path), backbone, name)
    own = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    load_part_state(backbone, state, "backbone")


def build_backbone(name: str, pretrained: str | Path | None = None, last_stride: int = 1,
                   img_size: tuple[int, int] = (256, 128)) -> tuple[nn.Module, int]:
    """A backbone mapping [B, 3, H, W] images to [B, F] pooled features, and F.

    `pretrained`: None or "none" (random init), "imagenet", a torchvision weights name, or a weights file.
    `last_stride` applies to ResNets (torchvision's and timm's); `img_size` to timm models that fix their input size
    at creation.
    """
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, not {last_stride}")
    pretrained = None if pretrained == "none" else pretrained
    library = pretrained == "imagenet" or is_weights_name(pretrained)
    if name.startswith(TIMM_PREFIX):
        if library and pretrained != "imagenet":
            raise ValueError(f"--pretrained {pretrained}: weights names are torchvision's; a timm model takes "
                             "imagenet (its name picks the weights, e.g. timm:resnet50.a1_in1k) or a file")
        backbone, dim = _timm_backbone(name[len(TIMM_PREFIX):], library, tuple(img_size))
        if last_stride == 1 and hasattr(backbone, "layer4"):  # timm's ResNets name their stages as torchvision's
            _set_last_stride_one(backbone)
    elif name in TORCHVISION_DIMS:
        backbone, dim = _torchvision_backbone(name, pretrained if library else None, last_stride)
    else:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONE_NAMES)}, "
                         f"or {TIMM_PREFIX}<name> for any timm model")
    if pretrained is not None and not library:
        load_pretrained_file(backbone, pretrained, name)
    return backbone, dim


# ---------------------------------------------------------------------------------------------------------
# Autoencoders: feature [B, F] → latent [B, L] → reconstructed feature [B, F]. Each returns the same keys.
# ---------------------------------------------------------------------------------------------------------

AE_NAMES = ("none", "ae", "vae", "sae", "dae")
LOGVAR_LIMIT = 10.0
# The loss terms whose inputs an autoencoder produces: a decoder's reconstruction, a VAE's μ and log-variance, a
# sparse code. The other terms need only the embedding and the heads (triplet, id, bce) or the views.
AUTOENCODER_TERMS = {"none": (), "ae": ("reconstruction",), "vae": ("kl", "reconstruction"),
                     "sae": ("sparsity", "reconstruction"), "dae": ("reconstruction",)}


def produced_terms(ae_name: str, recon_target: str = "feature", views: bool = False,
                   augmix: bool = False) -> frozenset[str]:
    """The loss terms a model produces inputs for, in every placement: the embedding's and heads' terms, its
    autoencoder's, reconstruction with an image decoder, and the views' consistency terms (JS with AugMix only)."""
    terms = {"triplet", "id", "bce", *AUTOENCODER_TERMS[ae_name]}
    if recon_target == "image":
        terms.add("reconstruction")
    if views or augmix:
        terms.add("consistency")
    if augmix:
        terms.add("js")
    return frozenset(terms)


def term_autoencoders(term: str) -> tuple[str, ...]:
    """The autoencoders that produce `term`'s inputs themselves (every one for a term of the embedding or views)."""
    return tuple(name for name in AE_NAMES if term in produced_terms(name, views=True, augmix=True))


def _outputs(z: Tensor, latent: Tensor, recon: Tensor | None, mu: Tensor | None = None,
             logvar: Tensor | None = None, sparse_code: Tensor | None = None) -> dict[str, Tensor | None]:
    return {"z": z, "latent": latent, "recon": recon, "mu": mu, "logvar": logvar, "sparse_code": sparse_code}


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def _hidden_dim(in_dim: int, latent_dim: int) -> int:
    return max(latent_dim, in_dim // 2)


class IdentityAE(nn.Module):
    """The baseline: the backbone feature is the embedding, nothing is reconstructed."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.latent_dim = in_dim

    def encode(self, feat: Tensor) -> Tensor:
        return feat

    def forward(self, feat: Tensor) -> dict[str, Tensor | None]:
        return _outputs(feat, feat, None)


class AutoEncoder(nn.Module):
    """Plain autoencoder: one hidden layer each way."""

    def __init__(self, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp(in_dim, _hidden_dim(in_dim, latent_dim), latent_dim)
        self.decoder = _mlp(latent_dim, _hidden_dim(in_dim, latent_dim), in_dim)

    def encode(self, feat: Tensor) -> Tensor:
        return self.encoder(feat)

    def corrupt(self, feat: Tensor) -> Tensor:
        return feat

    def forward(self, feat: Tensor) -> dict[str, Tensor | None]:
        z = self.encode(self.corrupt(feat) if self.training else feat)
        return _outputs(z, z, self.decoder(z))


class SparseAE(AutoEncoder):
    """Sparse autoencoder: the code goes through a sigmoid, so its mean activation is a probability."""

    def encode(self, feat: Tensor) -> Tensor:
        return torch.sigmoid(self.encoder(feat))

    def forward(self, feat: Tensor) -> dict[str, Tensor | None]:
        out = super().forward(feat)
        out["sparse_code"] = out["z"]
        return out


class DenoisingAE(AutoEncoder):
    """Denoising autoencoder: in training the encoder sees a masked, noisy feature; the target stays clean."""

    def __init__(self, in_dim: int, latent_dim: int, drop: float = 0.1, noise: float = 0.1) -> None:
        super().__init__(in_dim, latent_dim)
        self.drop, self.noise = drop, noise

    def corrupt(self, feat: Tensor) -> Tensor:
        # Noise relative to the features' spread, which differs by orders of magnitude between backbones.
        scale = self.noise * feat.detach().std()
        return F.dropout(feat, self.drop, training=True) + scale * torch.randn_like(feat)


class VariationalAE(nn.Module):
    """Variational autoencoder: the embedding is μ; the decoder gets a reparameterised sample in training."""

    def __init__(self, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        hidden = _hidden_dim(in_dim, latent_dim)
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)
        self.decoder = _mlp(latent_dim, hidden, in_dim)

    def encode(self, feat: Tensor) -> Tensor:
        return self.mu(self.encoder(feat))

    def forward(self, feat: Tensor) -> dict[str, Tensor | None]:
        hidden = self.encoder(feat)
        mu = self.mu(hidden)
        # A soft clamp keeps exp(logvar) finite (and the KL too) while leaving a gradient inside the range.
        logvar = LOGVAR_LIMIT * torch.tanh(self.logvar(hidden) / LOGVAR_LIMIT)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return _outputs(mu, latent, self.decoder(latent), mu=mu, logvar=logvar)


def build_autoencoder(name: str, in_dim: int, latent_dim: int) -> nn.Module:
    """The autoencoder `name` from a feature of `in_dim` to `latent_dim` (ignored by "none")."""
    if name == "none":
        return IdentityAE(in_dim)
    kinds = {"ae": AutoEncoder, "vae": VariationalAE, "sae": SparseAE, "dae": DenoisingAE}
    if name not in kinds:
        raise ValueError(f"unknown autoencoder {name!r}: expected one of {', '.join(AE_NAMES)}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be positive, not {latent_dim}")
    return kinds[name](in_dim, latent_dim)


# ---------------------------------------------------------------------------------------------------------
# Heads on the embedding z
# ---------------------------------------------------------------------------------------------------------


class SiameseHead(nn.Module):
    """Same-person logit of a pair from an MLP on (|z_i − z_j|, z_i ⊙ z_j): symmetric by construction."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, z_i: Tensor, z_j: Tensor) -> Tensor:
        return self.mlp(torch.cat([(z_i - z_j).abs(), z_i * z_j], dim=1)).squeeze(1)


class BNNeckClassifier(nn.Module):
    """BNNeck (BatchNorm, bias frozen at zero as in BoT), then a bias-free linear layer to the identities."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        # BoT freezes the shift at zero so the normalised features stay centred, where softmax boundaries sit.
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(self.bn(z))


class Heads(nn.Module):
    """The identity classifier on the code and the Siamese head on the embedding: one part, saved together as
    classifier.pt."""

    def __init__(self, code_dim: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.identity = BNNeckClassifier(code_dim, num_classes)
        self.siamese = SiameseHead(embed_dim)


# ---------------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------------


RECON_TARGETS = ("feature", "image")
# Where the autoencoder sits. series: its code is the embedding. branch: the backbone feature is (as in BoT), and the
# autoencoder beside it reads the feature, its reconstruction regularising the backbone. residual: a feature denoiser,
# the embedding f + D(E(f)). residual-apart: the same denoiser trained apart, on the detached feature and by its
# reconstruction alone, while the triplet, identity and Siamese terms read the backbone feature f.
PLACEMENTS = ("series", "branch", "residual", "residual-apart")
DENOISERS = ("residual", "residual-apart")
# The retrieval embedding: the placement's code (the autoencoder's μ in series, the feature in branch, the denoised
# feature in residual and residual-apart), that code through the identity classifier's BatchNorm neck (BoT's test-time
# feature), the L2-normalised code, or, in branch, the L2-normalised code beside the autoencoder's L2-normalised μ. The
# triplet and Siamese terms read the embedding as training forms it (the neck's input for mu-bn; in residual-apart,
# the feature f).
EMBEDDINGS = ("mu", "mu-bn", "mu-l2", "mu+latent")


def recon_size(img_size: tuple[int, int]) -> tuple[int, int]:
    """The reduced resolution an image reconstruction is made at: a quarter of the input's side."""
    return max(img_size[0] // 4, 4), max(img_size[1] // 4, 2)


class ImageDecoder(nn.Module):
    """Latent → image at reduced resolution through transposed convolutions; linear output, as the target is
    the normalised input (ImageNet statistics), not [0, 1]."""

    def __init__(self, latent_dim: int, size: tuple[int, int], width: int = 128) -> None:
        super().__init__()
        stages = 0
        while stages < 4 and size[0] % 2 ** (stages + 1) == 0 and size[1] % 2 ** (stages + 1) == 0:
            stages += 1
        self.start = (size[0] // 2**stages, size[1] // 2**stages)
        self.width = width
        self.project = nn.Sequential(nn.Linear(latent_dim, width * self.start[0] * self.start[1]),
                                     nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = width
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latent: Tensor) -> Tensor:
        x = self.project(latent).view(-1, self.width, *self.start)
        return self.layers(x)


class ReIDModel(nn.Module):
    """Backbone → autoencoder, placed in series, as a branch or as a residual denoiser → (identity classifier on the
    code, Siamese head on the embedding)."""

    def __init__(self, backbone_name: str, ae_name: str, num_classes: int, latent_dim: int = 512,
                 pretrained: str | Path | None = None, last_stride: int = 1,
                 img_size: tuple[int, int] = (256, 128), recon_target: str = "feature", embedding: str = "mu",
                 placement: str = "series") -> None:
        super().__init__()
        check_model_choices(ae_name, recon_target, embedding, placement)
        self.embedding, self.placement = embedding, placement if ae_name != "none" else "series"
        self.backbone, self.feat_dim = build_backbone(backbone_name, pretrained, last_stride, img_size)
        self.ae, self.ae_name = build_autoencoder(ae_name, self.feat_dim, latent_dim), ae_name
        self.recon_target, self.recon_size = recon_target, recon_size(img_size)
        if recon_target == "image":  # part of the autoencoder, so it is saved and loaded with it (ae.pt)
            self.ae.image_decoder = ImageDecoder(self.ae.latent_dim, self.recon_size)
        if self.placement in DENOISERS:  # the denoiser starts as the identity: the model starts as `none`
            nn.init.zeros_(self.ae.decoder[-1].weight)
            nn.init.zeros_(self.ae.decoder[-1].bias)
        self.code_dim = self.ae.latent_dim if self.placement == "series" else self.feat_dim
        self.embed_dim = self.code_dim + (self.ae.latent_dim if embedding == "mu+latent" else 0)
        self.img_size = tuple(img_size)
        self.classifier = Heads(self.code_dim, self.embed_dim, num_classes)

    def parts(self) -> dict[str, nn.Module]:
        """The separately saved parts, by their file names' stems."""
        return {"backbone": self.backbone, "ae": self.ae, "classifier": self.classifier}

    def code(self, feat: Tensor) -> Tensor:
        """The placement's deterministic code of backbone features: the autoencoder's μ (series), the feature
        (branch), or the denoised feature f + D(E(f)) (residual, residual-apart)."""
        if self.placement == "series":
            return self.ae.encode(feat)
        # The decoder reads the deterministic code (μ, no denoising noise).
        return feat + self.ae.decoder(self.ae.encode(feat)) if self.placement in DENOISERS else feat

    def embed(self, images: Tensor) -> Tensor:
        """The retrieval embedding [B, embed_dim]: deterministic (μ for the VAE, no denoising noise), through the
        BatchNorm neck when the embedding is mu-bn, normalised for mu-l2, beside the normalised μ for mu+latent."""
        feat = self.backbone(images)
        code = self.code(feat)
        if self.embedding == "mu-bn":
            return self.classifier.identity.bn(code)
        return self.trained_embedding(code, self.ae.encode(feat) if self.embedding == "mu+latent" else None)

    def trained_embedding(self, code: Tensor, latent: Tensor | None) -> Tensor:
        """The embedding the triplet and Siamese terms read: the code, normalised for mu-l2, joined to the latent
        for mu+latent."""
        if self.embedding == "mu+latent":
            return joined(code, latent)
        return F.normalize(code, dim=1) if self.embedding == "mu-l2" else code

    def verify(self, z_i: Tensor, z_j: Tensor) -> Tensor:
        """Same-person logits [N] of the code pairs (z_i[n], z_j[n]), as training forms them."""
        return self.classifier.siamese(z_i, z_j)

    def verify_embeddings(self, e_i: Tensor, e_j: Tensor) -> Tensor:
        """Same-person logits of embed()'s outputs: a mu-bn embedding is taken back through the neck (eval mode,
        an affine map per unit) to the code the Siamese head was trained on."""
        if self.embedding == "mu-bn":
            bn = self.classifier.identity.bn
            scale = torch.sqrt(bn.running_var + bn.eps) / bn.weight
            e_i, e_j = ((e - bn.bias) * scale + bn.running_mean for e in (e_i, e_j))
        return self.verify(e_i, e_j)

    def forward(self, images: Tensor, clean: Tensor | None = None, views: int = 1,
                clean_pass: bool = True) -> dict[str, Tensor | None]:
        """What the losses use: feat, target_feat, z (the embedding), latent, recon, recon_target, mu, logvar,
        logits (of the code), sparse_code.

        `clean`, when given, is the clean view of the degraded `images`; with `views` > 1, `images` is that many
        views of one batch stacked, the clean one first. The targets (the reconstruction's and target_feat, the clean
        view's feature) come from the clean view, detached: no gradient reaches them. Without `clean_pass` the clean
        batch only gives the image target, and target_feat is each row's own feature (no second backbone pass).
        """
        feat = self.backbone(images)
        # residual-apart: the autoencoder reads the detached feature, so none of its terms reaches the backbone.
        read = feat.detach() if self.placement == "residual-apart" else feat
        out = self.ae(read)
        if self.placement == "branch":
            # Only the reconstruction reaches the backbone through the autoencoder: its other outputs (code, KL,
            # sparsity) come from a pass on the detached feature.
            out = {**self.ae(feat.detach()), "recon": out["recon"], "latent": out["latent"]}
        code = out["z"] if self.placement == "series" else feat
        if self.placement in DENOISERS:
            out["recon"] = read + out["recon"]  # the denoised feature, drawn towards the clean view's
            code = out["recon"] if self.placement == "residual" else feat
        out["feat"], out["target_feat"] = feat, self.clean_feature(feat, clean if clean_pass else None, views)
        if self.recon_target == "image":
            out["recon"] = self.ae.image_decoder(out["latent"])
            target = (images if clean is None else clean).detach()[:len(images) // views]
            out["recon_target"] = F.adaptive_avg_pool2d(target, self.recon_size).repeat(views, 1, 1, 1)
        else:
            out["recon_target"] = None if out["recon"] is None else out["target_feat"]
        out["z"] = self.trained_embedding(code, out["z"])
        out["logits"] = self.classifier.identity(code)
        return out

    def clean_feature(self, feat: Tensor, clean: Tensor | None, views: int) -> Tensor:
        """Each row's clean-view feature, detached: the first view's with stacked views, the clean batch's
        (BatchNorm normalising it by its own statistics in train mode), or the row's own."""
        if views > 1:
            return feat[:len(feat) // views].detach().repeat(views, 1)
        if clean is None:
            return feat.detach()
        with torch.no_grad():
            return self.backbone(clean)


def joined(code: Tensor, latent: Tensor) -> Tensor:
    """The mu+latent embedding: the L2-normalised code beside the L2-normalised latent."""
    return torch.cat([F.normalize(code, dim=1), F.normalize(latent, dim=1)], dim=1)


def check_model_choices(ae_name: str, recon_target: str, embedding: str, placement: str) -> None:
    """A ValueError naming the choice that is unknown or does not fit the others."""
    if recon_target not in RECON_TARGETS:
        raise ValueError(f"unknown reconstruction target {recon_target!r}: expected {' or '.join(RECON_TARGETS)}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}: expected one of {', '.join(EMBEDDINGS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if embedding == "mu+latent" and (placement != "branch" or ae_name == "none"):
        raise ValueError("embedding mu+latent joins an autoencoder's latent to the feature: it needs placement "
                         f"branch and an autoencoder, not {placement} with {ae_name}")
    if placement in DENOISERS and recon_target == "image":
        raise ValueError(f"placement {placement} denoises the feature: its reconstruction target is the feature, "
                         "not the image")


# ---------------------------------------------------------------------------------------------------------
# From a result directory to a model in eval mode: the one path eval.py, topk.py and export.py take
# ---------------------------------------------------------------------------------------------------------


def trained_settings(flags: dict, files: dict[str, str], num_classes: int | None = None, backbone: str | None = None,
                     ae: str | None = None, img_size: tuple[int, int] | None = None,
                     latent_dim: int | None = None) -> dict:
    """What rebuilds a trained model: names, sizes and part files; the names and the input size from the arguments
    when given, else config.json's flags; the latent size from the flags, the argument only where they lack it."""
    return {"backbone": backbone or flags.get("backbone_name"), "ae": ae or flags.get("ae_name"),
            "files": {part: str(path) for part, path in files.items()},
            "latent_dim": int(flags.get("latent_dim") or latent_dim or 512),
            "img_size": tuple(img_size or flags.get("img_size") or (256, 128)),
            "last_stride": int(flags.get("last_stride") or 1), "num_classes": num_classes,
            "recon_target": flags.get("recon_target") or "feature", "embedding": flags.get("embedding") or "mu",
            "placement": flags.get("ae_placement") or "series"}


def result_settings(result: ResultDir) -> dict:
    """trained_settings of a result directory of train.py: its config.json and part files."""
    return trained_settings(result.flags, result.model_parts(), result.config.get("num_classes"))


def classifier_classes(state: dict | None) -> int | None:
    """The number of training identities, read off a saved classifier's output layer."""
    if state is None:
        return None
    weight = state.get("identity.fc.weight")
    return int(weight.shape[0]) if weight is not None else None


def model_from_settings(settings: dict, num_classes: int, pretrained: str | Path | None = None) -> ReIDModel:
    """The model `settings` (trained_settings's keys) describe, its backbone from `pretrained`: the one construction
    that training and evaluation share."""
    return ReIDModel(settings["backbone"], settings["ae"], num_classes, latent_dim=settings["latent_dim"],
                     pretrained=pretrained, last_stride=settings["last_stride"], img_size=tuple(settings["img_size"]),
                     recon_target=settings["recon_target"], embedding=settings.get("embedding", "mu"),
                     placement=settings.get("placement", "series"))


def build_trained(settings: dict, device: str | torch.device = "cpu") -> ReIDModel:
    """The model named by `settings` with its saved parts loaded, in eval mode; a part that does not fit is named."""
    states = {part: read_state_dict(path) for part, path in settings["files"].items()}
    num_classes = settings["num_classes"] or classifier_classes(states.get("classifier")) or 1
    try:
        model = model_from_settings(settings, num_classes)
    except ValueError as err:
        raise UserError(str(err)) from err
    parts = model.parts()
    for part, state in states.items():
        try:
            load_part_state(parts[part], state, part)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{settings['files'][part]}: does not fit {settings['backbone']} + {settings['ae']}: "
                            f"{err}") from err
    return model.to(resolve_device(str(device))).eval()


def load_trained(result_dir: str | Path, device: str | torch.device = "cpu") -> ReIDModel:
    """The trained model of a result directory in eval mode: parts, flags and image size from the directory."""
    return build_trained(result_settings(ResultDir(result_dir)), device)
