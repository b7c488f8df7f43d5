"""Decoding one image file into its transformed uint8 crop, at reduced size when the crop allows it.

A JPEG stores 8×8 blocks of DCT coefficients, so libjpeg can decode at 1/2, 1/4 or 1/8 of the full size for a fraction
of the work. When the crop, resized to the output side, needs fewer pixels than a reduced decode still has
(``ImageTransform.reduced_size``), the file is decoded at the smallest such scale ("DCT scaling": Pillow's draft mode,
simplejpeg's ``min_width``/``min_height``); the crop box is then mapped onto the smaller image. Decoders
(``DECODERS``): ``pil`` (Pillow with libjpeg-turbo), ``simplejpeg`` (libjpeg-turbo directly, JPEG only; other files
fall back to Pillow), ``torchvision`` (``torchvision.io.decode_jpeg``, no DCT scaling). ``auto`` is the fastest that is
installed, as measured by ``benchmarks/pipeline.py`` (docs/data.md).

``gpu``: worker processes only read the files and draw the crops; the main process decodes each batch with
torchvision's batched ``decode_jpeg(device="cuda")`` (nvjpeg) and crops on the GPU (``decode_batch``); without a GPU
the same path decodes with torchvision on the CPU.
"""

from __future__ import annotations

import importlib.util
import io
import os
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdistill.data.image_modes import to_rgb
from kdistill.data.transforms import ImageTransform
from kdistill.utils import unknown_name_error

DECODERS = ("auto", "pil", "simplejpeg", "torchvision", "gpu")
JPEG_MAGIC = b"\xff\xd8"


def decode_threads() -> int:
    """Threads for parallel decoding in one process (the decoders release the GIL): the usable cores."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


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
                reduce: bool, params: Tensor | None = None) -> tuple[Tensor, Tensor]:
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        if params is None:
            params = transform.params(*size, train, rng)
        if reduce and im.format == "JPEG":
            im.draft("RGB", transform.reduced_size(*size, params))
        im = to_rgb(im)  # 16-bit, float, palette, CMYK, alpha: faithful 8-bit RGB (data/image_modes.py)
        return transform.apply(im, params, size), params


def _decode_simplejpeg(data: bytes, transform: ImageTransform, train: bool, rng: random.Random | None,
                       reduce: bool) -> tuple[Tensor, Tensor]:
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return _decode_pil(data, transform, train, rng, reduce)
    if colorspace not in ("YCbCr", "Gray"):  # CMYK, YCCK: Pillow's conversion, as everywhere else
        return _decode_pil(data, transform, train, rng, reduce)
    params = transform.params(width, height, train, rng)
    min_w, min_h = transform.reduced_size(width, height, params) if reduce else (width, height)
    # only the exact halvings (factor >= 2): libjpeg-turbo's other n/8 scales are slower than a full decode
    factor = min(width / max(min_w, 1), height / max(min_h, 1))
    try:
        if factor >= 2:
            array = simplejpeg.decode_jpeg(data, "rgb", min_width=min_w, min_height=min_h, min_factor=2)
        else:
            array = simplejpeg.decode_jpeg(data, "rgb")
    except ValueError:  # data libjpeg-turbo refuses: Pillow's verdict, with the same crop
        return _decode_pil(data, transform, train, rng, reduce, params)
    return transform.apply(array, params, (width, height)), params


def _decode_torchvision(data: bytes, transform: ImageTransform, train: bool, rng: random.Random | None,
                        reduce: bool) -> tuple[Tensor, Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    params = transform.params(chw.shape[2], chw.shape[1], train, rng)
    # height×width×3 memory: the layout torch's fast uint8 resize needs
    return transform.apply(chw.permute(1, 2, 0).contiguous().numpy(), params), params


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


def gpu_device() -> torch.device:
    """Where ``gpu`` decoding runs: this process's current CUDA device, else the CPU (the fallback)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def decode_batch(files: Sequence[bytes | Tensor], params: Tensor, transform: ImageTransform,
                 device: str | torch.device = "cpu") -> Tensor:
    """Decode ``files`` with torchvision (JPEGs batched through nvjpeg on a CUDA ``device``; torchvision's CPU decoder
    otherwise, and for other formats) and cut each crop ``params[i]`` (``CROP_FIELDS``, source pixels) at the output
    size: uint8 ``N×3×S×S`` on ``device``.

    Crops are resized on ``device`` in float (bilinear, antialiased, rounded back to uint8): within a level or two of
    the CPU decoders' pixels, not identical, so train and evaluate with the same decoder."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    raw = [f if isinstance(f, Tensor) else torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    jpeg = [i for i, r in enumerate(raw) if len(r) > 1 and r[0] == 0xFF and r[1] == 0xD8]
    decoded: list[Tensor | None] = [None] * len(raw)
    if device.type == "cuda" and jpeg:
        for i, image in zip(jpeg, decode_jpeg([raw[i] for i in jpeg], mode=ImageReadMode.RGB, device=device),
                            strict=True):
            decoded[i] = image
    for i, r in enumerate(raw):
        if decoded[i] is None:
            decoded[i] = decode_image(r, mode=ImageReadMode.RGB).to(device)
    out = []
    for image, p in zip(decoded, params.tolist(), strict=True):
        top, left, h, w, flip = p
        out_h, out_w = transform.output_size(image.shape[2], image.shape[1])
        if all(abs(v - round(v)) < 1e-6 for v in (top, left, h, w)):
            t, lf = round(top), round(left)
            crop = image[:, t : t + round(h), lf : lf + round(w)].unsqueeze(0).float()
            crop = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
        else:  # a fractional box (evaluation's centre crop): resize the whole image, then cut
            full_h, full_w = round(image.shape[1] * out_h / h), round(image.shape[2] * out_w / w)
            t, lf = min(round(top * out_h / h), full_h - out_h), min(round(left * out_w / w), full_w - out_w)
            crop = F.interpolate(image.unsqueeze(0).float(), size=(full_h, full_w), mode="bilinear", antialias=True,
                                 align_corners=False)[:, :, t : t + out_h, lf : lf + out_w]
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
        out.append(crop.flip(2) if flip else crop)
    return torch.stack(out)
