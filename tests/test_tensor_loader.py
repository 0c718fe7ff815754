"""tensor_loader.py: the decoded set, batched augmentation against the PIL path's, resumable batches, the fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

import tensor_loader
from datasets import IMAGENET_MEAN, IMAGENET_STD, PKSampler, build_transforms, load_train_records
from tensor_loader import AugmentParams, DecodedTrainLoader, augment_batch, batch_generator, draw_params
from utils import UserError, device_constant

SIZE = (64, 32)  # pad-and-crop margin max(1, round(64 / 25.6)) = 2
PAD = 2


def pixels_of(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images back to 0..255 values (float, unrounded)."""
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    return (images * std + mean) * 255


def test_decoded_images_equal_the_pil_test_transform(synthetic_prepared: Path):
    records = load_train_records(synthetic_prepared)[0][:6]
    size = (128, 64)  # the 64×32 images upscaled, as the PIL path's Resize does
    store = tensor_loader.decode_records(records, size, 2, torch.device("cpu"), progress=False)
    loader = tensor_loader.DecodedEvalLoader(store, records, 4, torch.device("cpu"))
    images = torch.cat([batch[0] for batch in loader])
    transform = build_transforms(size, False)
    expected = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in records])
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert store.dtype == torch.uint8 and store.shape == (6, 3, *size)


def edge_padded_crop(image: torch.Tensor, flip: bool, top: int, left: int) -> torch.Tensor:
    """The PIL path's flip, edge pad and crop, written with torch's replicate padding."""
    image = image.flip(-1) if flip else image
    padded = F.pad(image[None].float(), (PAD, PAD, PAD, PAD), mode="replicate")[0]
    return padded[:, top:top + SIZE[0], left:left + SIZE[1]]


def test_crop_and_flip_read_the_edge_padded_image():
    store = torch.randint(0, 256, (3, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cases = [(0, True, 0, 0), (1, False, 4, 1), (2, True, 2, 4), (0, False, 3, 3)]
    params = AugmentParams(flip=torch.tensor([c[1] for c in cases]), offsets=torch.tensor([c[2:] for c in cases]),
                           boxes=torch.zeros(len(cases), 4, dtype=torch.long), lighting=None, lighting_order=[])
    images = augment_batch(store, torch.tensor([c[0] for c in cases]), params, torch.Generator(), torch.device("cpu"))
    for image, (index, flip, top, left) in zip(images, cases, strict=True):
        torch.testing.assert_close(pixels_of(image), edge_padded_crop(store[index], flip, top, left),
                                   rtol=0, atol=1e-3)


def test_erasing_fills_exactly_its_box_with_standard_noise():
    store = torch.full((2, 3, *SIZE), 128, dtype=torch.uint8)
    boxes = torch.tensor([[5, 3, 40, 20], [0, 0, 0, 0]])
    params = AugmentParams(torch.tensor([False, False]), torch.full((2, 2), PAD), boxes, None, [])
    images = augment_batch(store, torch.tensor([0, 1]), params, torch.Generator().manual_seed(1), torch.device("cpu"))
    plain = images[1, :, 0, 0]
    changed = (images != plain[None, :, None, None]).any(1)
    assert changed[1].sum() == 0
    assert changed[0, 5:45, 3:23].all() and changed[0].sum() == 40 * 20
    noise = images[0, :, 5:45, 3:23]
    assert abs(noise.mean().item()) < 4 / np.sqrt(noise.numel())  # 2,400 N(0, 1) draws: 4 standard errors
    assert noise.std().item() == pytest.approx(1.0, abs=0.06)


def coordinate_image() -> np.ndarray:
    """A 64×32 image whose red channel is 4·row and green 8·column: each pixel says where it came from."""
    rows, cols = np.meshgrid(np.arange(SIZE[0]), np.arange(SIZE[1]), indexing="ij")
    return np.stack([4 * rows, 8 * cols, np.zeros_like(rows)], -1).astype(np.uint8)


def measured_augmentation(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Flip, crop offsets and erased share of each augmented coordinate image, read from its pixels alone: the
    offsets are the most common (source − output) position (erased and edge pixels are the minority)."""
    pixels = pixels_of(images).round()
    rows, cols = pixels[:, 0] / 4, pixels[:, 1] / 8
    out_rows = torch.arange(SIZE[0])[:, None].expand(SIZE)
    out_cols = torch.arange(SIZE[1])[None, :].expand(SIZE)
    flips = (cols[:, :, 1:] < cols[:, :, :-1]).flatten(1).float().mode(1).values.bool()
    tops = (rows - out_rows + PAD).flatten(1).mode(1).values
    lefts = torch.where(flips[:, None, None], SIZE[1] - 1 - cols - out_cols + PAD, cols - out_cols + PAD).flatten(1)
    lefts = lefts.mode(1).values
    source = torch.from_numpy(coordinate_image()).permute(2, 0, 1)
    erased = []
    for image, flip, top, left in zip(pixels, flips.tolist(), tops.long().tolist(), lefts.long().tolist(),
                                      strict=True):
        expected = edge_padded_crop(source, flip, top, left)
        erased.append((image != expected).any(0).float().mean().item())
    return {"flip": flips.numpy(), "top": tops.numpy(), "left": lefts.numpy(), "erased": np.array(erased)}


def test_batched_augmentation_matches_the_pil_path_statistics():
    """1,280 samples each way. Flip rate and erasing rate: two-proportion z below 4 (|z| ≥ 4 by chance 6e-5);
    crop offsets (5 values each way): χ² of the two histograms, p above 1e-4; erased area share where erased:
    two-sample Kolmogorov–Smirnov, p above 1e-4. Fixed seeds, so the outcome is the same every run."""
    count, batch = 1280, 64
    image = Image.fromarray(coordinate_image())
    transform = build_transforms(SIZE, True, erasing=0.5)
    pil_images = []
    for seed in range(count):
        torch.manual_seed(seed)  # as ReIDDataset with the sampler's per-sample seed
        pil_images.append(transform(image))
    store = torch.from_numpy(coordinate_image()).permute(2, 0, 1)[None].contiguous()
    batched_images = []
    for b in range(count // batch):
        generator = batch_generator(0, 1, b)
        params = draw_params(batch, SIZE, 0.5, False, generator)
        batched_images.append(augment_batch(store, torch.zeros(batch, dtype=torch.long), params, generator,
                                            torch.device("cpu")))
    pil, ours = measured_augmentation(torch.stack(pil_images)), measured_augmentation(torch.cat(batched_images))
    for name, values in (("flip", lambda m: m["flip"]), ("erasing", lambda m: m["erased"] > 0)):
        a, b = values(pil).mean(), values(ours).mean()
        pooled = (a + b) / 2
        z = (a - b) / np.sqrt(2 * pooled * (1 - pooled) / count)
        assert abs(z) < 4, (name, a, b)
        assert 0.4 < b < 0.6, (name, b)  # both near ½, not merely alike
    for name in ("top", "left"):
        table = np.array([np.bincount(m[name].astype(int), minlength=2 * PAD + 1) for m in (pil, ours)])
        assert table.shape == (2, 2 * PAD + 1) and table.min() > 0, (name, table)
        assert stats.chi2_contingency(table).pvalue > 1e-4, (name, table)
    erased_pil, erased_ours = pil["erased"][pil["erased"] > 0], ours["erased"][ours["erased"] > 0]
    assert stats.ks_2samp(erased_pil, erased_ours).pvalue > 1e-4
    assert 0.015 <= erased_ours.min() and erased_ours.max() <= 0.36  # 0.02..0.33 of the area, sides rounded


def test_lighting_factors_stay_in_color_jitter_ranges_and_change_the_pixels():
    generator = batch_generator(3, 1, 0)
    params = draw_params(500, SIZE, 0.0, True, generator)
    low, high = params.lighting.amin(0), params.lighting.amax(0)
    assert (low >= torch.tensor([0.7, 0.8, 0.8, -0.03])).all() and (high <= torch.tensor([1.3, 1.2, 1.2, 0.03])).all()
    assert sorted(params.lighting_order) == [0, 1, 2, 3]
    store = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.2, 1.0, 1.0, 0.0]])  # brightness ×1.2 alone: min(1.2·x, 255)
    one = AugmentParams(torch.tensor([False]), torch.full((1, 2), PAD), torch.zeros(1, 4, dtype=torch.long),
                        factors, [0, 1, 2, 3])
    image = augment_batch(store, torch.tensor([0]), one, torch.Generator(), torch.device("cpu"))[0]
    torch.testing.assert_close(pixels_of(image), (store[0].float() * 1.2).clamp(max=255), rtol=0, atol=1e-3)


@pytest.mark.parametrize(("factors", "reference"), [
    ([1.0, 1.2, 1.0, 0.0], lambda x: TF.adjust_contrast(x, 1.2)),
    ([1.0, 0.8, 1.0, 0.0], lambda x: TF.adjust_contrast(x, 0.8)),
    ([1.0, 1.0, 1.2, 0.0], lambda x: TF.adjust_saturation(x, 1.2)),
    ([1.0, 1.0, 0.8, 0.0], lambda x: TF.adjust_saturation(x, 0.8)),
    ([1.0, 1.0, 1.0, 0.03], lambda x: TF.adjust_hue(x, 0.03)),
    ([1.0, 1.0, 1.0, -0.03], lambda x: TF.adjust_hue(x, -0.03))])
def test_each_lighting_factor_acts_as_color_jitter_does(factors: list[float], reference):
    """Contrast, saturation and hue alone against torchvision's functions, which ColorJitter applies (hue as a
    share of the colour circle, as ColorJitter takes it): within 0.01 of a grey level."""
    store = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = AugmentParams(torch.tensor([False]), torch.full((1, 2), PAD), torch.zeros(1, 4, dtype=torch.long),
                        torch.tensor([factors]), [0, 1, 2, 3])
    image = augment_batch(store, torch.tensor([0]), one, torch.Generator(), torch.device("cpu"))[0]
    expected = reference(store[0].float() / 255) * 255
    torch.testing.assert_close(pixels_of(image), expected, rtol=0, atol=0.01)


def test_a_resumed_epoch_draws_the_same_batches(synthetic_prepared: Path):
    records = load_train_records(synthetic_prepared)[0]
    store = tensor_loader.decode_records(records, SIZE, 1, torch.device("cpu"), progress=False)
    sampler = PKSampler([r.label for r in records], 4, 2, seed=5)
    loader = DecodedTrainLoader(store, records, sampler, 0.5, True, torch.device("cpu"))
    sampler.set_epoch(2)
    whole = list(loader)
    sampler.set_epoch(2, start_batch=3)
    resumed = list(loader)
    assert len(resumed) == len(whole) - 3 > 0
    for (images, labels, _, indices), again in zip(whole[3:], resumed, strict=True):
        assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(indices, again[3])
        assert torch.equal(labels, torch.tensor([records[i].label for i in indices]))
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], whole[0][0])  # another epoch, other augmentation


def test_device_constants_are_made_once_and_hold_their_values():
    first = device_constant(IMAGENET_STD, torch.device("cpu"))
    assert first is device_constant(IMAGENET_STD, torch.device("cpu"))
    assert first.tolist() == pytest.approx([0.229, 0.224, 0.225]) and first.dtype == torch.float32
    assert device_constant(IMAGENET_STD, torch.device("cpu"), torch.float64).dtype == torch.float64
    values = torch.arange(6).view(2, 3)
    assert tensor_loader.to_device(values, torch.device("cpu")) is values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_from_the_decoded_set_on_a_gpu_queues_without_a_sync(synthetic_prepared: Path):
    """Every copy to the GPU goes through pinned memory and every constant is made once: nothing waits."""
    import degradations

    device = torch.device("cuda")
    records = load_train_records(synthetic_prepared)[0]
    store = tensor_loader.decode_records(records, SIZE, 1, device, progress=False)
    sampler = PKSampler([r.label for r in records], 4, 2, seed=5)
    loader = DecodedTrainLoader(store, records, sampler, 0.5, True, device)
    sampler.set_epoch(1)
    next(iter(loader))  # the constants made
    degradations.degrade(next(iter(loader))[0], torch.Generator(device).manual_seed(0), 0.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, labels, _, _ = next(iter(loader))
        degradations.degrade(images, torch.Generator(device).manual_seed(1), 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.device.type == labels.device.type == "cuda"


def test_where_the_decoded_set_goes(monkeypatch: pytest.MonkeyPatch):
    """One 64×32 image is 6,144 bytes; the GPU may take 0.4 of its free memory, the host 0.5 of its."""
    free = {"cuda": 20_000, "cpu": 20_000}
    monkeypatch.setattr(tensor_loader, "free_memory", lambda device: free[device.type])
    assert tensor_loader.decoded_bytes(1, SIZE) == 6_144
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert tensor_loader.store_device(1, SIZE, cuda) == cuda  # 6,144 ≤ 8,000
    free["cuda"] = 15_000
    assert tensor_loader.store_device(1, SIZE, cuda) == cpu  # 6,144 > 6,000 on the GPU, ≤ 10,000 on the host
    assert tensor_loader.store_device(1, SIZE, cpu) == cpu
    assert tensor_loader.store_device(2, SIZE, cpu) is None  # 12,288 > 10,000


def test_a_set_that_does_not_fit_falls_back_to_pil_with_a_message(synthetic_prepared: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(tensor_loader, "free_memory", lambda device: 1000)
    records = load_train_records(synthetic_prepared)[0]
    sampler = PKSampler([r.label for r in records], 4, 2)
    with caplog.at_level(logging.WARNING, logger="reid"):
        loader = tensor_loader.training_loader("tensor", records, sampler, SIZE, 0.5, False, 0, torch.device("cpu"))
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert f"the {len(records)} training images at 64×32 need" in caplog.text and "--loader pil" in caplog.text
    images, labels, _, _ = next(iter(loader))
    assert images.shape == (8, 3, *SIZE) and len(labels) == 8


def test_an_unreadable_image_is_named_while_decoding(synthetic_prepared: Path, tmp_path: Path):
    records = load_train_records(synthetic_prepared)[0][:3]
    broken = tmp_path / "0002_c1s1_000001_01.jpg"
    broken.write_bytes(b"not a jpeg")
    records[1] = type(records[1])(str(broken), 2, 1, 0)
    with pytest.raises(UserError, match=f"{broken}: cannot read image"):
        tensor_loader.decode_records(records, SIZE, 2, torch.device("cpu"), progress=False)
