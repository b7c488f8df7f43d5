"""Transforms by name (kdistill.data.transforms) and per-sample decoding (kdistill.data.decode)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.data.decode import decode_batch, decode_sample, resolve_decoder
from kdistill.data.transforms import ImageTransform, center_box, random_resized_box, sample_rng
from kdistill.utils import ConfigError


def _photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (JPEG-friendly): low-frequency colour fields."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    full = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    hwc = (full[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(hwc, "RGB")


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_random_resized_boxes_are_deterministic_under_a_seed_and_respect_the_ranges() -> None:
    boxes = [random_resized_box(500, 375, sample_rng(7, 2, i)) for i in range(200)]
    assert boxes == [random_resized_box(500, 375, sample_rng(7, 2, i)) for i in range(200)]
    other_epoch = [random_resized_box(500, 375, sample_rng(7, 3, i)) for i in range(200)]
    other_seed = [random_resized_box(500, 375, sample_rng(8, 2, i)) for i in range(200)]
    assert sum(a != b for a, b in zip(boxes, other_epoch, strict=True)) > 190
    assert sum(a != b for a, b in zip(boxes, other_seed, strict=True)) > 190
    for top, left, h, w in boxes:
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        # rounding each side to whole pixels moves area and ratio by at most one pixel a side
        assert 0.08 * 500 * 375 - (w + h + 1) <= w * h <= 500 * 375
        assert 3 / 4 - 1 / h - 1e-9 <= w / h <= 4 / 3 + 1 / h + 1e-9
    areas = [w * h / (500 * 375) for _, _, h, w in boxes]
    assert min(areas) < 0.2 and max(areas) > 0.8  # the whole range is used


def test_random_resized_box_falls_back_to_the_centred_clamped_crop() -> None:
    # 1000×10: every try needs a side of at least sqrt(0.08 * 10000 * 3/4) ≈ 24 > 10 px, so all ten fail;
    # the ratio 100 is clamped to 4/3: height 10, width round(13.33) = 13, centred
    assert random_resized_box(1000, 10, sample_rng(0, 0, 0)) == (0, (1000 - 13) // 2, 10, 13)
    assert random_resized_box(10, 1000, sample_rng(0, 0, 0)) == ((1000 - 13) // 2, 0, 13, 10)


def test_center_box_by_hand() -> None:
    # 500×400 → shorter side 256 → 320×256; central 224² starts at (16, 48) → ×1.5625 in source pixels
    assert center_box(500, 400, 224) == pytest.approx((25.0, 75.0, 350.0, 350.0))
    # portrait 375×500 → 256×341 (int(256·500/375) = 341): top round(58.5) = 58 (banker's rounding, as torchvision)
    top, left, h, w = center_box(375, 500, 224)
    assert (top, left) == pytest.approx((58 * 500 / 341, 16 * 375 / 256))
    assert (h, w) == pytest.approx((224 * 500 / 341, 224 * 375 / 256))


def test_imagenet_eval_crop_matches_torchvision_resize_then_center_crop() -> None:
    import torchvision.transforms.v2 as T
    from torchvision.transforms.v2.functional import pil_to_tensor

    image = _photo(333, 500)
    ours = ImageTransform("imagenet", 224)
    params = ours.params(*image.size, train=False)
    x = ours.apply(image, params)
    ref = pil_to_tensor(T.Compose([T.Resize(256), T.CenterCrop(224)])(image))
    assert x.shape == ref.shape == (3, 224, 224) and x.dtype == torch.uint8
    diff = (x.int() - ref.int()).abs()
    # one resampling of the source box instead of resize-then-crop: the same filter, rounding differs by a level
    assert diff.max() <= 2 and diff.float().mean() < 0.2


def test_imagenet_train_crop_and_flip_match_torchvision_resized_crop() -> None:
    from torchvision.transforms.v2.functional import horizontal_flip, pil_to_tensor, resized_crop

    image = _photo(500, 375, seed=1)
    t = ImageTransform("imagenet", 96)
    for i in range(30):
        p = t.params(*image.size, train=True, rng=sample_rng(0, 0, i))
        top, left, h, w, flip = (int(v) for v in p.tolist())
        ref = resized_crop(image, top, left, h, w, [96, 96])
        ref = pil_to_tensor(horizontal_flip(ref) if flip else ref)
        diff = (t.apply(image, p).int() - ref.int()).abs().float()
        assert diff.mean() < 0.5, (i, p.tolist())
    flips = [t.params(500, 375, True, sample_rng(0, 0, i))[4].item() for i in range(400)]
    assert 150 < sum(flips) < 250


def test_cifar_transform_keeps_or_squashes_the_whole_image() -> None:
    image = _photo(40, 30)
    keep = ImageTransform("cifar")
    p = keep.params(40, 30, train=True)
    assert p.tolist() == [0, 0, 30, 40, 0]
    assert torch.equal(keep.apply(image, p), torch.from_numpy(np.array(image)).permute(2, 0, 1))
    squash = ImageTransform("cifar", 16).apply(image, p)
    pil = torch.from_numpy(np.array(image.resize((16, 16), Image.BILINEAR))).permute(2, 0, 1)
    assert squash.shape == (3, 16, 16) and (squash.int() - pil.int()).abs().max() <= 1  # Pillow's filter, rounding


def test_transform_and_decoder_names_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"unknown transform \(data.transform\) 'imagenett'.*Did you mean 'imagenet'"):
        ImageTransform("imagenett", 224)
    with pytest.raises(ConfigError, match="data.transform=imagenet needs data.image_size"):
        ImageTransform("imagenet")
    with pytest.raises(ConfigError, match=r"unknown decoder \(data.decoder\) 'pill'.*'pil'"):
        resolve_decoder("pill")
    assert resolve_decoder("pil") == "pil"


def test_reduced_size_by_hand() -> None:
    t = ImageTransform("imagenet", 64)
    # a 350×350 crop of a 500×400 image shown at 64²: the whole image needs only ceil(500·64/350) × ceil(400·64/350)
    assert t.reduced_size(500, 400, torch.tensor([25.0, 75, 350, 350, 0])) == (92, 74)


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg", "torchvision"])
def test_decoders_agree_and_dct_scaled_decoding_stays_close(decoder: str) -> None:
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    image = _photo(640, 480, seed=2)
    data = _jpeg(image)
    t = ImageTransform("imagenet", 64)
    full, p_full = decode_sample(data, t, False, decoder="pil", reduce=False)
    x, p = decode_sample(data, t, False, decoder=decoder, reduce=False)
    assert torch.equal(p, p_full)
    assert (x.int() - full.int()).abs().max() <= 1  # the same libjpeg-turbo underneath
    reduced, p_red = decode_sample(data, t, False, decoder=decoder, reduce=True)
    assert torch.equal(p_red, p_full) and reduced.shape == (3, 64, 64)
    # decoded at 1/4 (160×120 ≥ the 97×73 the crop needs), then shrunk 1.6× instead of 6.6×
    assert (reduced.float() - full.float()).abs().mean() < 3.0
    train, p_train = decode_sample(data, t, True, sample_rng(0, 1, 2), decoder=decoder)
    assert torch.equal(p_train, t.params(640, 480, True, sample_rng(0, 1, 2)))


def test_dct_scaling_decodes_fewer_pixels() -> None:
    data = _jpeg(_photo(640, 480, seed=3))
    t = ImageTransform("imagenet", 64)
    with Image.open(io.BytesIO(data)) as im:
        p = t.params(*im.size, train=False)
        # shorter side 480 → 73 (floor(64 / 0.875)): the central crop is 422.3 × 420.8 source pixels, so
        # 640·64/422.3 → 97 and 480·64/420.8 → 73 pixels suffice; 1/4 (160×120) is the largest scale keeping them
        assert t.reduced_size(*im.size, p) == (97, 73) == (math.ceil(640 * 64 / p[3].item()), 73)
        im.draft("RGB", t.reduced_size(*im.size, p))
        assert im.size == (160, 120)


def test_cmyk_jpeg_goes_through_pillow_with_the_same_crop() -> None:
    pytest.importorskip("simplejpeg")
    data = _jpeg(_photo(64, 48, seed=4).convert("CMYK"))
    t = ImageTransform("imagenet", 16)
    x, p = decode_sample(data, t, True, sample_rng(0, 0, 1), decoder="simplejpeg")
    x2, p2 = decode_sample(data, t, True, sample_rng(0, 0, 1), decoder="pil")
    assert torch.equal(p, p2) and torch.equal(x, x2)


def test_png_and_broken_files() -> None:
    buf = io.BytesIO()
    _photo(50, 40).save(buf, format="PNG")
    x, _ = decode_sample(buf.getvalue(), ImageTransform("imagenet", 32), False, decoder=resolve_decoder("auto"))
    assert x.shape == (3, 32, 32)
    with pytest.raises(Exception):  # noqa: B017 - Pillow raises several types for damaged files
        decode_sample(b"not an image", ImageTransform("imagenet", 32), False)
    truncated = _jpeg(_photo(200, 150))[:600]
    with pytest.raises(Exception):  # noqa: B017
        decode_sample(truncated, ImageTransform("imagenet", 32), False, decoder=resolve_decoder("auto"))


def test_batched_torchvision_decode_cpu_fallback_matches_pillow() -> None:
    files = [_jpeg(_photo(320, 240, seed=s)) for s in range(3)]
    t = ImageTransform("imagenet", 48)
    params = torch.stack([t.params(320, 240, True, sample_rng(0, 0, i)) for i in range(3)])
    params[:, :4] = params[:, :4].round()
    batch = decode_batch(files, params, t, device="cpu")
    assert batch.shape == (3, 3, 48, 48) and batch.dtype == torch.uint8
    for i, f in enumerate(files):
        with Image.open(io.BytesIO(f)) as im:
            ref = t.apply(im.convert("RGB"), params[i])
        assert (batch[i].float() - ref.float()).abs().mean() < 1.5
