"""Cutting a given crop instead of drawing one: the stored views of the teacher cache of random resized crops."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdistill.data.transforms import ImageTransform


class FixedCrop:
    """A transform whose crop ``(top, left, height, width, flip)`` is given instead of drawn; decoding (with DCT
    scaling), resizing and flipping are the wrapped ``ImageTransform``'s, so the pixels equal those the same crop
    gives when it is drawn."""

    def __init__(self, transform: ImageTransform, params: Tensor):
        self.transform, self.fixed = transform, params

    def params(self, width: int, height: int, train: bool, rng: Any = None) -> Tensor:
        """The given crop, whatever the image size and generator."""
        return self.fixed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transform, name)
