"""Helpers shared by the feature losses: precision and spatial alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool two B×C×H×W maps to (min H, min W).

    The reference code pools the larger map to the smaller one assuming square maps; taking the
    minimum per axis is identical for square maps and also handles rectangular ones.
    """
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"expected B×C×H×W feature maps, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if a.shape[2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def check_batch(name: str, a: Tensor, b: Tensor) -> None:
    """Student and teacher tensors must describe the same batch."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name}: student and teacher batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
