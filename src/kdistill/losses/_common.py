"""Helpers shared by the losses: precision and spatial alignment."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

F_ = TypeVar("F_", bound=Callable[..., Any])


def _device_type(values: Any) -> str:
    for v in values:
        if isinstance(v, Tensor):
            return v.device.type
        if isinstance(v, list | tuple):
            found = _device_type(v)
            if found:
                return found
    return ""


def float32_loss(fn: F_) -> F_:
    """Run a loss outside autocast: under mixed precision (``trainer.precision=bf16-mixed`` /
    ``16-mixed``) its softmaxes at temperature, log-sum-exps, poolings, matrix products and
    normalisations run in float32 on inputs that the loss upcasts itself (``upcast``), whatever
    precision the networks and the method's modules ran in."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = _device_type((*args, *kwargs.values()))
        if not device:
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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
