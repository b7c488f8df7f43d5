"""Tools for methods with their own optimizer (MEAL's discriminators): gradient reversal, the driver
of the own-optimizer protocol of ``Method``, and a framework-free reference training step.

Engine integration (Lightning, automatic optimization over ``Distiller.trainable_parameters()``)::

    own = OwnOptimizerStep(distiller.method)                 # once, after the model is on its device
    # training_step:
    own.sync_lr(main_optimizer)
    logits, losses = distiller.forward_train(batch, info, own_step=own.separate_step)
    # on_before_optimizer_step (after the main backward, once per main optimizer step):
    own.after_main_backward()
    # checkpoint hooks: own.state_dict() / own.load_state_dict(...)

``train_step`` below does exactly this without a framework; tests use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdistill.methods.base import Batch, Method, StepInfo

if TYPE_CHECKING:  # distiller.py imports the methods package; avoid the cycle at run time
    from kdistill.distiller import Distiller


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
    """Gradient-reversal layer: ``x`` forward, ``-coeff · grad`` backward (meal.md §1.6, mode ``grl``).

    A static autograd function with a float coefficient, replacing MEAL v1's legacy instance-style
    function (meal.md §4 defect 3).
    """
    return _GradientReversal.apply(x, float(coeff))


def _sum(losses: dict[str, Tensor]) -> Tensor:
    return torch.stack([v.float() for v in losses.values()]).sum()


class OwnOptimizerStep:
    """The driver side of the own-optimizer protocol (``Method`` docstring) for one training run.

    Holds the method's own optimizer (``None`` when the method has no own parameters, in which case
    every call is a no-op), sets its learning rate from the main optimizer and steps it either
    separately (``separate_step``) or after the main backward (``after_main_backward``).
    """

    def __init__(self, method: Method, grad_scaler: torch.amp.GradScaler | None = None):
        self.method = method
        self.optimizer = method.configure_own_optimizer()
        # float16 mixed precision: scales the separate step's loss so that small gradients survive
        self.grad_scaler = grad_scaler if self.optimizer is not None else None
        self._stepped_separately = False

    def sync_lr(self, main_optimizer: torch.optim.Optimizer) -> None:
        """Give the own optimizer the lr ``method.own_lr`` asks for, from the main lr (call every step)."""
        if self.optimizer is None:
            return
        group = main_optimizer.param_groups[0]
        lr = self.method.own_lr(float(group["lr"]), float(group.get("initial_lr", group["lr"])))
        if lr is not None:
            for own_group in self.optimizer.param_groups:
                own_group["lr"] = lr

    def zero_grad(self) -> None:
        """Clear the own parameters' gradients."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def separate_step(self, losses: dict[str, Tensor]) -> None:
        """Minimise ``losses`` with the own optimizer now (pass as ``own_step`` to ``forward_train``)."""
        if self.optimizer is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            _sum(losses).backward()
            self.optimizer.step()
        else:
            self.grad_scaler.scale(_sum(losses)).backward()
            self.grad_scaler.step(self.optimizer)  # unscales; skipped when a gradient is not finite
            self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._stepped_separately = True

    def after_main_backward(self, main_loss_scale: float | None = None) -> None:
        """Joint step on the main loss's gradients unless this step already had a separate one.

        ``main_loss_scale``: the factor the main loss was multiplied by before its backward (float16
        loss scaling, which unscales only the main optimizer's gradients); the own gradients are
        divided by it, and the step is skipped when one of them is not finite, as the main one is.
        """
        if self.optimizer is None:
            return
        if not self._stepped_separately:
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = True
            if main_loss_scale is not None and main_loss_scale != 1.0 and grads:
                torch._foreach_div_(grads, main_loss_scale)
                finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stepped_separately = False

    def state_dict(self) -> dict[str, Any]:
        """The own optimizer's state (momentum buffers) and, under float16, its loss scaler's; checkpoint
        it next to the main optimizer's."""
        if self.optimizer is None:
            return {}
        state = self.optimizer.state_dict()
        return state if self.grad_scaler is None else {**state, "grad_scaler": self.grad_scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""
        if self.optimizer is not None and state:
            state = dict(state)
            scaler = state.pop("grad_scaler", None)
            self.optimizer.load_state_dict(state)
            if scaler is not None and self.grad_scaler is not None:
                self.grad_scaler.load_state_dict(scaler)


def train_step(
    distiller: Distiller,
    batch: Batch,
    info: StepInfo,
    main_optimizer: torch.optim.Optimizer,
    own: OwnOptimizerStep,
) -> dict[str, float]:
    """One reference training step under the own-optimizer protocol; returns the loss terms.

    Order: lr sync; teachers and student forward; the separate own step when the method asks for one
    (on detached student outputs); the method's losses; one backward of their sum; the own optimizer's
    joint step (if no separate step happened); the main optimizer's step.
    """
    own.sync_lr(main_optimizer)
    main_optimizer.zero_grad(set_to_none=True)
    own.zero_grad()
    _, losses = distiller.forward_train(batch, info, own_step=own.separate_step)
    _sum(losses).backward()
    own.after_main_backward()
    main_optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}
