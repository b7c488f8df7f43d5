"""Class predictions for image files from a student export, with the preprocessing its card states:
RGB, resized to the card's input size (bilinear, as image folders are read for training), scaled to
[0, 1] and normalised with the card's mean and std."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill.utils import ConfigError


def preprocessing(card: dict[str, Any]) -> dict[str, Any]:
    """The input contract of an export: what an image must go through before the network sees it."""
    _, h, w = card["input_size"]
    return {"color": "RGB", "resize": [h, w], "interpolation": "bilinear", "scale": "divide uint8 by 255",
            "mean": card["mean"], "std": card["std"], "layout": "N x 3 x H x W float32"}


def load_images(paths: Sequence[str | Path], card: dict[str, Any]) -> torch.Tensor:
    """uint8 ``N×3×H×W`` images resized to the card's input size."""
    from PIL import Image, UnidentifiedImageError

    _, h, w = card["input_size"]
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                out.append(data.view(h, w, 3).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read image {str(path)!r}: {exc}") from exc
    return torch.stack(out)


@torch.no_grad()
def predict(export: str | Path, images: Sequence[str | Path], top: int = 1) -> list[list[tuple[str, float]]]:
    """For each image, the ``top`` classes (names from the card) with their probabilities."""
    from kdistill.engine.run import load_from_run

    if not images:
        raise ConfigError("kdistill predict: name at least one image file")
    model, card = load_from_run(export)
    x = load_images(images, card).float().div_(255)
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    probs = model.eval()((x - mean) / std).softmax(1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    classes = card.get("classes") or [str(i) for i in range(probs.shape[1])]
    return [[(classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist(), strict=True)]
            for vs, ix in zip(values, indices, strict=True)]
