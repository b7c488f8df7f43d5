"""Image transforms by name: where each image's crop comes from, as explicit, recordable parameters.

* ``cifar``: the image at its own size (or squashed to ``size``, as small-image folders always were); the training
  augmentation (pad-4 random crop + flip) runs later on whole uint8 batches on the device (``BatchAugment``).
* ``imagenet``: training: a random resized crop (area 8–100 % of the image, aspect ratio 3/4–4/3; the sampler of
  Szegedy et al., CVPR 2015, as torchvision implements it) resized to ``size``×``size``, flipped with probability ½;
  evaluation: the shorter side resized to ``floor(size / 0.875)`` (256 for 224) and the central ``size``×``size``
  taken. The aspect ratio is always kept. ReviewKD (Chen et al., CVPR 2021) and MEAL V2 (Shen & Savvides, 2020) both
  train and evaluate on ImageNet with exactly this pair (MEAL V2 writes the resize as ``size·256/224``, the same
  number), so no paper needs a variant of its own.

A crop is five numbers in the source image's pixels, ``(top, left, height, width, flip)`` (``CROP_FIELDS``), drawn
from ``sample_rng(seed, epoch, index)``: the same sample of the same epoch gets the same crop in any worker, process or
resumed run, and a teacher cache can key stored views on the returned parameters. ``apply`` turns a decoded image and
its crop into a uint8 ``3×size×size`` tensor; normalisation happens on the device (``BatchAugment``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdistill.utils import ConfigError, unknown_name_error

TRANSFORMS = ("cifar", "imagenet")
CROP_FIELDS = ("top", "left", "height", "width", "flip")
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3 / 4, 4 / 3)
IMAGENET_CROP_FRACTION = 0.875


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of sample ``index``'s crop in ``epoch``: a pure function of the three numbers (a string seed
    is hashed with SHA-512 by ``random``, independent of ``PYTHONHASHSEED``)."""
    return random.Random(f"kdistill-crop/{seed}/{epoch}/{index}")


def random_resized_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = IMAGENET_SCALE,
    ratio: tuple[float, float] = IMAGENET_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform), as torchvision's ``RandomResizedCrop.get_params``: ten tries, then the largest centred crop whose
    ratio is clamped into ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(width: int, height: int, size: int, crop_fraction: float = IMAGENET_CROP_FRACTION) -> tuple[float, float, float, float]:
    """The source region that "resize the shorter side to ``floor(size / crop_fraction)``, then take the central
    ``size``×``size``" keeps, as ``(top, left, height, width)`` in source pixels (fractional)."""
    short = math.floor(size / crop_fraction)
    # the resized image's sides, as torchvision's Resize(int) computes them
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    top = round((new_h - size) / 2)
    left = round((new_w - size) / 2)
    sx, sy = width / new_w, height / new_h
    return top * sy, left * sx, size * sy, size * sx


@dataclass(frozen=True)
class ImageTransform:
    """A named transform (module docstring). ``size`` is the output side; for ``cifar`` ``None`` keeps each image's
    own size (all images of the split must then share it)."""

    name: str
    size: int | None = None
    scale: tuple[float, float] = IMAGENET_SCALE
    ratio: tuple[float, float] = IMAGENET_RATIO
    crop_fraction: float = IMAGENET_CROP_FRACTION
    flip: bool = True

    def __post_init__(self) -> None:
        if self.name not in TRANSFORMS:
            raise unknown_name_error("transform (data.transform)", self.name, TRANSFORMS)
        if self.name == "imagenet" and self.size is None:
            raise ConfigError("data.transform=imagenet needs data.image_size (the crop side, e.g. 224)")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {self.size}")

    @property
    def per_sample_augment(self) -> bool:
        """True when training crops are drawn per image (``imagenet``); ``cifar`` augments whole batches on the device."""
        return self.name == "imagenet"

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` of ``apply``'s result for a ``width``×``height`` source."""
        if self.size is None:
            return height, width
        return self.size, self.size

    def params(self, width: int, height: int, train: bool, rng: random.Random | None = None) -> Tensor:
        """The crop of a ``width``×``height`` image as a float64 tensor ``(top, left, height, width, flip)``.

        Training crops of ``imagenet`` need ``rng`` (``sample_rng``); ``cifar`` and evaluation crops are fixed.
        """
        if self.name == "cifar":
            return torch.tensor([0.0, 0.0, height, width, 0.0], dtype=torch.float64)
        if not train:
            return torch.tensor([*center_box(width, height, self.size, self.crop_fraction), 0.0], dtype=torch.float64)
        if rng is None:
            raise ValueError("a training crop needs a generator (sample_rng(seed, epoch, index))")
        top, left, h, w = random_resized_box(width, height, rng, self.scale, self.ratio)
        flip = float(self.flip and rng.random() < 0.5)
        return torch.tensor([top, left, h, w, flip], dtype=torch.float64)

    def apply(self, image: Image.Image | np.ndarray | Tensor, params: Tensor,
              source_size: tuple[int, int] | None = None) -> Tensor:
        """Crop ``params`` of ``image`` resized to the output size (bilinear, antialiased when shrinking, as Pillow
        and torchvision do) and maybe mirrored: a contiguous uint8 ``3×H×W`` tensor.

        ``image`` is a PIL image, an ``H×W×3`` uint8 array or a ``3×H×W`` uint8 tensor. ``source_size`` is the
        ``(width, height)`` the parameters refer to when ``image`` was decoded at a reduced size (JPEG DCT scaling);
        the box is then scaled onto ``image``. A whole-pixel box is cut, then resized; a fractional one (evaluation's
        centre crop) is reached by resizing the whole image and cutting, which is what "resize, then centre crop" means.
        """
        x = as_nchw(image)
        img_h, img_w = x.shape[2], x.shape[3]
        top, left, h, w, flip = params.tolist()
        if source_size is not None and source_size != (img_w, img_h):
            sx, sy = img_w / source_size[0], img_h / source_size[1]
            top, left, h, w = top * sy, left * sx, h * sy, w * sx
        out_h, out_w = self.output_size(*(source_size or (img_w, img_h)))
        if all(abs(v - round(v)) < 1e-6 for v in (top, left, h, w)):
            t, lf, hh, ww = (round(v) for v in (top, left, h, w))
            x = _resize(x[:, :, t : t + hh, lf : lf + ww], out_h, out_w)
        else:
            full_h, full_w = round(img_h * out_h / h), round(img_w * out_w / w)
            t, lf = round(top * out_h / h), round(left * out_w / w)
            t, lf = min(max(t, 0), full_h - out_h), min(max(lf, 0), full_w - out_w)
            x = _resize(x, full_h, full_w)[:, :, t : t + out_h, lf : lf + out_w]
        if flip:
            x = x.flip(3)
        return x[0].contiguous()

    def reduced_size(self, width: int, height: int, params: Tensor) -> tuple[int, int]:
        """The smallest ``(width, height)`` to decode the whole image at so the crop still has at least the output
        size on each side: what a JPEG decoder may scale its DCT down to without losing detail."""
        out_h, out_w = self.output_size(width, height)
        _, _, h, w, _ = params.tolist()
        return math.ceil(width * out_w / max(w, 1e-9)), math.ceil(height * out_h / max(h, 1e-9))

    def describe(self) -> dict[str, object]:
        """Everything that decides a crop's pixels, for cache keys and run cards."""
        return {"name": self.name, "size": self.size, "scale": list(self.scale), "ratio": list(self.ratio),
                "crop_fraction": self.crop_fraction, "flip": self.flip, "interpolation": "bilinear-antialias"}


def as_nchw(image: Image.Image | np.ndarray | Tensor) -> Tensor:
    """A PIL image, ``H×W×3`` array or ``3×H×W`` tensor as a ``1×3×H×W`` uint8 view (channels-last strides for
    arrays: no copy, and the layout torch's fast uint8 resize works in)."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB") if image.mode != "RGB" else image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 image, got shape {image.shape}")
        return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3×H×W image, got shape {tuple(image.shape)}")
    return image.unsqueeze(0)


def _resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    if x.shape[2] == out_h and x.shape[3] == out_w:
        return x
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)


def build_transform(name: str, size: int | None) -> ImageTransform:
    """A transform by name (``TRANSFORMS``) for output side ``size``."""
    return ImageTransform(name, size)


__all__ = [
    "CROP_FIELDS",
    "TRANSFORMS",
    "ImageTransform",
    "build_transform",
    "center_box",
    "as_nchw",
    "random_resized_box",
    "sample_rng",
]
