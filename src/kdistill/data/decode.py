"""Decoding one image file into its transformed uint8 crop, at reduced size when the crop allows it.

A JPEG stores 8×8 blocks of DCT coefficients, so libjpeg can decode at 1/2, 1/4 or 1/8 of the full size for a fraction
of the work. When the crop, resized to the output side, needs fewer pixels than a reduced decode still has
(``ImageTransform.reduced_size``), the file is decoded at the smallest such scale ("DCT scaling": Pillow's draft mode,
simplejpeg's ``min_width``/``min_height``); the crop box is then mapped onto the smaller image. Decoders
(``DECODERS``): ``pil`` (Pillow with libjpeg-turbo), ``simplejpeg`` (libjpeg-turbo directly, JPEG only; other files
fall back to Pillow), ``torchvision`` (``torchvision.io.decode_jpeg``, no DCT scaling). ``auto`` is the fastest that is
installed, as measured by ``benchmarks/pipeline.py`` (docs/data.md).

On a GPU, ``decode_batch`` decodes a batch of JPEG files with torchvision's batched ``decode_jpeg(device="cuda")``
(nvjpeg) and crops on the device; on a CPU the same call decodes with torchvision on the CPU.
"""

from __future__ import annotations

import importlib.util
import io
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdistill.data.image_modes import to_rgb
from kdistill.data.transforms import ImageTransform
from kdistill.utils import unknown_name_error

DECODERS = ("auto", "pil", "simplejpeg", "torchvision")
JPEG_MAGIC = b"\xff\xd8"


def resolve_decoder(name: str) -> str:
    """``auto`` → ``simplejpeg`` when installed (fastest here), else ``pil``; other names are checked."""
    if name not in DECODERS:
        raise unknown_name_error("decoder (data.decoder)", name, DECODERS)
    if name == "auto":
        return "simplejpeg" if importlib.util.find_spec("simplejpeg") is not None else "pil"
    if name == "simplejpeg" and importlib.util.find_spec("simplejpeg") is None:
        raise unknown_name_error("decoder (data.decoder; simplejpeg is not installed: pip install simplejpeg)",
                                 name, [d for d in DECODERS if d != "simplejpeg"])
    return name


def _decode_pil(data: bytes, transform: ImageTransform, train: bool, rng: random.Random | None,
                reduce: bool) -> tuple[Tensor, Tensor]:
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        params = transform.params(*size, train, rng)
        if reduce and im.format == "JPEG":
            im.draft("RGB", transform.reduced_size(*size, params))
        im = to_rgb(im)  # 16-bit, float, palette, CMYK, alpha: faithful 8-bit RGB (data/image_modes.py)
        return transform.apply(im, params, size), params


def _decode_simplejpeg(data: bytes, transform: ImageTransform, train: bool, rng: random.Random | None,
                       reduce: bool) -> tuple[Tensor, Tensor]:
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    params = transform.params(width, height, train, rng)
    min_w, min_h = transform.reduced_size(width, height, params) if reduce else (width, height)
    # only the exact halvings (factor >= 2): libjpeg-turbo's other n/8 scales are slower than a full decode
    factor = min(width / max(min_w, 1), height / max(min_h, 1))
    if factor >= 2:
        array = simplejpeg.decode_jpeg(data, "rgb", min_width=min_w, min_height=min_h, min_factor=2)
    else:
        array = simplejpeg.decode_jpeg(data, "rgb")
    return transform.apply(Image.fromarray(array, "RGB"), params, (width, height)), params


def _decode_torchvision(data: bytes, transform: ImageTransform, train: bool, rng: random.Random | None,
                        reduce: bool) -> tuple[Tensor, Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    params = transform.params(chw.shape[2], chw.shape[1], train, rng)
    image = Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return transform.apply(image, params), params


def decode_sample(
    data: bytes,
    transform: ImageTransform,
    train: bool,
    rng: random.Random | None = None,
    decoder: str = "pil",
    reduce: bool = True,
) -> tuple[Tensor, Tensor]:
    """The uint8 ``3×H×W`` crop of the encoded image ``data`` and its crop parameters (``CROP_FIELDS``).

    ``decoder`` is a resolved name (``resolve_decoder``); files that are not JPEG always go through Pillow.
    ``reduce`` allows DCT-scaled decoding (module docstring). Raises on unreadable data (the caller counts it).
    """
    if decoder == "pil" or not data.startswith(JPEG_MAGIC):
        return _decode_pil(data, transform, train, rng, reduce)
    if decoder == "simplejpeg":
        return _decode_simplejpeg(data, transform, train, rng, reduce)
    return _decode_torchvision(data, transform, train, rng, reduce)


def decode_batch(files: Sequence[bytes], params: Tensor, transform: ImageTransform,
                 device: str | torch.device = "cpu") -> Tensor:
    """Decode JPEG ``files`` with torchvision (batched nvjpeg on a CUDA ``device``, the CPU decoder otherwise) and
    cut each crop ``params[i]`` (``CROP_FIELDS``, source pixels) at the output size: uint8 ``N×3×S×S`` on ``device``.

    The crop is resized with antialiased bilinear interpolation on the device, so pixels differ slightly (a few
    levels) from Pillow's; use the same path for training and evaluation."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    raw = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device) if device.type == "cuda" else \
        [decode_jpeg(r, mode=ImageReadMode.RGB) for r in raw]
    out = []
    for image, p in zip(decoded, params.tolist(), strict=True):
        top, left, h, w, flip = p
        out_h, out_w = transform.output_size(image.shape[2], image.shape[1])
        t0, l0 = int(top), int(left)
        t1, l1 = min(image.shape[1], int(round(top + h))), min(image.shape[2], int(round(left + w)))
        crop = image[:, t0:t1, l0:l1].unsqueeze(0).float()
        crop = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
        out.append(crop.flip(2) if flip else crop)
    return torch.stack(out).to(device)
