"""Every image mode Pillow opens becomes faithful 8-bit RGB, or is refused with a reason.

``Image.convert("RGB")`` alone is wrong for high-bit-depth images: a 16-bit grayscale PNG (mode
``I;16``, values 0..65535) is clipped at 255, so almost every pixel turns white, and a float image
(``F``, values 0..1) turns black. Here 16-bit values are scaled to 8 bits (``v >> 8``, so 65535 →
255), float images in [0, 1] or [0, 255] are scaled and rounded, and premultiplied-alpha modes go
through straight alpha first. Images with an alpha channel keep their stored colours and drop the
alpha, as torchvision's and timm's folder loaders do (a teacher trained with them saw those pixels).
Palette, CMYK, YCbCr, LAB, HSV and 1-bit images use Pillow's own conversions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnsupportedImage(ValueError):
    """An image whose pixel values cannot be mapped to 8-bit RGB without guessing."""


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB (module docstring); raises UnsupportedImage for values out of any known range."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in SIXTEEN_BIT:
        return _gray(np.asarray(im, dtype=np.uint16) >> 8)
    if mode == "I":  # 32-bit integers: 8-bit data widened, or 16-bit data (TIFF, some PNG readers)
        values = np.asarray(im, dtype=np.int64)
        low, high = int(values.min(initial=0)), int(values.max(initial=0))
        if low < 0 or high > 65535:
            raise UnsupportedImage(f"32-bit integer pixels in [{low}, {high}] have no 8-bit meaning")
        return _gray(values >> 8 if high > 255 else values)
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnsupportedImage("floating-point pixels include NaN or Inf")
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < 0 or high > 255:
            raise UnsupportedImage(f"floating-point pixels in [{low:g}, {high:g}] are neither in [0, 1] nor [0, 255]")
        scale = 255.0 if high <= 1.0 else 1.0
        return _gray(np.rint(values * scale))
    if mode == "RGBa":  # premultiplied alpha: undo it before dropping the alpha
        return im.convert("RGBA").convert("RGB")
    if mode == "La":  # Pillow has no conversion from La; undo the premultiplication here
        values = np.asarray(im, dtype=np.float64)
        gray, alpha = values[..., 0], values[..., 1]
        straight = np.where(alpha > 0, gray * 255.0 / np.maximum(alpha, 1.0), 0.0)
        return _gray(np.clip(np.rint(straight), 0, 255))
    return im.convert("RGB")
