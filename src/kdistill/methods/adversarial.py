"""Gradient reversal for adversarial losses (MEAL's ``grl`` mode, Ganin & Lempitsky 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-coeff`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Gradient-reversal layer: ``x`` forward, ``-coeff · grad`` backward (MEAL, mode ``grl``).

    A static autograd function with a float coefficient, replacing MEAL v1's legacy instance-style
    function (which fails on PyTorch ≥ 1.5).
    """
    return _GradientReversal.apply(x, float(coeff))
