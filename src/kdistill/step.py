"""The training step, in one place: the networks' passes, the teacher outputs, the method's losses,
and the optimizers of a step (plain PyTorch; the Lightning engine and your own loop both use it).

* ``Distiller``: student + frozen teachers + method. It records the features the method declared on
  each network (student with gradients, each teacher with its own taps) and returns
  ``(student logits, weighted losses)`` from ``forward_train``. Teachers are kept in eval mode
  whatever ``train()`` is called, run under inference mode, never receive gradients and are excluded
  from ``trainable_parameters``; each may have its own input normalisation (``Renormalize``).
* Teacher sources: ``forward_train`` asks the method which teachers it needs this step
  (``Method.select_teachers``) and takes their outputs from a ``TeacherSource``: the live pass
  (``LiveTeachers``, the default), a cache (``kdistill.engine.teacher_cache.CachedTeachers``) or
  fixed outputs (``FixedTeachers``).
* ``OwnOptimizerStep``: the driver of a method's own optimizer (MEAL's discriminators, the protocol in
  ``Method``); ``train_step``: the reference training step without a framework.

Lightning integration (``kdistill.engine.module``)::

    own = OwnOptimizerStep(distiller.method)                 # once, after the model is on its device
    # training_step:
    own.sync_lr(main_optimizer)
    logits, losses = distiller.forward_train(batch, info, teachers=source, own_step=own.separate_step)
    # on_before_optimizer_step (after the main backward, once per main optimizer step):
    own.after_main_backward()
    # checkpoint hooks: own.state_dict() / own.load_state_dict(...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from kdistill.features import FeatureRecorder, TappedModel
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo
from kdistill.utils import ConfigError

if TYPE_CHECKING:
    from kdistill.engine.compile import CompiledPasses


class TeacherSource(Protocol):
    """Where a step's teacher outputs come from: ``source(batch, selected)`` returns the batch the
    student trains on (a cache may choose its augmentation) and the outputs of teachers ``selected``
    (indices into the run's teachers, as ``Method.select_teachers`` returns them), in that order."""

    def __call__(self, batch: Batch, selected: Sequence[int]) -> tuple[Batch, list[ModelOutput]]: ...


class FixedTeachers:
    """Given teacher outputs, whatever the selection (e.g. precomputed by your own code)."""

    def __init__(self, outputs: Sequence[ModelOutput]):
        self.outputs = list(outputs)

    def __call__(self, batch: Batch, selected: Sequence[int]) -> tuple[Batch, list[ModelOutput]]:
        return batch, list(self.outputs)


class Renormalize(nn.Module):
    """Map images normalised with (mean_s, std_s) to a teacher's (mean_t, std_t)."""

    def __init__(self, src_mean: Sequence[float], src_std: Sequence[float], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        s_m, s_s, t_m, t_s = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (src_mean, src_std, mean, std))
        self.register_buffer("scale", s_s / t_s, persistent=False)
        self.register_buffer("shift", (s_m - t_m) / t_s, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def _fp32_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """A classifier layer run outside autocast, in float32 (see ``Distiller.configure_teachers``)."""
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.linear(x.float(), self.weight, self.bias)


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The model's last ``nn.Linear`` in registration order: its classifier in every zoo model,
    torchvision and timm classification network (``fc``, ``classifier``, ``head``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class Distiller(nn.Module):
    """Student + frozen teachers + method. ``forward_train`` returns ``(logits, losses)``."""

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        method: Method,
        teacher_inputs: Sequence[nn.Module | None] | None = None,
    ):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.method = method
        self.teacher_inputs = nn.ModuleList([m or nn.Identity() for m in (teacher_inputs or [None] * len(teachers))])
        for teacher in self.teachers:
            teacher.requires_grad_(False)
            teacher.eval()
        if len(method.teacher_nets) != len(self.teachers):
            raise ConfigError(
                f"method {method.name!r} was built for {len(method.teacher_nets)} teachers, the distiller has "
                f"{len(self.teachers)}"
            )
        # the features the method declared, resolved on each network with that network's own named
        # taps (teacher i: the taps the method was built with for teacher i)
        self.student_taps = TappedModel(student, method.student_net.taps).tap_specs(
            method.student_features, method.student_preact, who=method.name
        )
        self.teacher_taps = [
            TappedModel(t, net.taps).tap_specs(method.teacher_features, method.teacher_preact, who=method.name)
            for t, net in zip(self.teachers, method.teacher_nets, strict=True)
        ]
        self.teacher_precision = "32"
        self.teacher_channels_last = False
        self.student_channels_last = False
        self.compiled: CompiledPasses | None = None  # set by kdistill.engine.compile.compile_distiller

    def configure_teachers(self, precision: str = "32", channels_last: bool = False) -> None:
        """How the teacher pass runs: ``precision`` ``"32"``, ``"bf16"`` or ``"16"`` (autocast to bfloat16
        or float16 around the teachers; outputs are returned as float32), and the channels-last memory
        format (docs/speed.md).

        Under reduced precision the teacher's classifier (its last ``nn.Linear``) runs in float32 on the
        float32-cast pooled features: bf16 logits keep 8 mantissa bits (a step of 0.06 at a logit of
        10), which turns near-ties into flipped predictions, while the layer costs a negligible share
        of the pass. The convolutions, where the time is, stay in bf16.
        """
        if precision not in ("32", "bf16", "16"):
            raise ConfigError(f"teacher precision must be '32', 'bf16' or '16', got {precision!r}")
        self.teacher_precision = precision
        self.teacher_channels_last = bool(channels_last)
        for teacher in self.teachers:
            teacher.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            head = classifier_head(teacher)
            if head is None:
                continue
            if precision != "32":
                head.forward = _fp32_linear_forward.__get__(head)  # instance attribute; state_dict unchanged
            elif "forward" in head.__dict__:
                del head.forward

    def configure_student(self, channels_last: bool = False) -> None:
        """The student's and the method's modules' memory format (``trainer.channels_last``): channels-last
        weights (every 4-D parameter, so also ReviewKD's ABF and FitNet's adapter convolutions) and
        input; values equal the default format's within float rounding."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.student_channels_last = bool(channels_last)
        self.student.to(memory_format=fmt)
        self.method.to(memory_format=fmt)

    @property
    def needs_teacher_features(self) -> bool:
        """Whether the method reads teacher features (then a logit cache cannot replace the teachers)."""
        return any(self.teacher_taps)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and method parameters: what the optimizer updates (never a teacher's).

        The method's ``own_parameters()`` (e.g. MEAL's discriminators) are left out: they have their
        own optimizer (``Method.configure_own_optimizer``).
        """
        own = {id(p) for p in self.method.own_parameters()}
        params = (*self.student.parameters(), *self.method.parameters())
        return [p for p in params if p.requires_grad and id(p) not in own]

    @torch.inference_mode()
    def teacher_forward(self, index: int, images: Tensor) -> ModelOutput:
        """One inference pass of teacher ``index`` with its taps (features detached)."""
        teacher = self.teachers[index]
        x = self.teacher_inputs[index](images)
        if self.teacher_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        taps = self.teacher_taps[index]
        dtype = torch.float16 if self.teacher_precision == "16" else torch.bfloat16
        with torch.autocast(x.device.type, dtype=dtype, enabled=self.teacher_precision != "32"):
            if self.compiled is not None:
                return self.compiled.teacher(index, x)
            if not taps:
                return ModelOutput(teacher(x))
            with FeatureRecorder(teacher, taps, detach=True) as rec:
                logits = teacher(x)
        return ModelOutput(logits, rec.features)

    def student_forward(self, images: Tensor) -> ModelOutput:
        """Student forward, recording the method's student features (with gradients)."""
        if self.student_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None:
            return self.compiled.student(images)
        if not self.student_taps:
            return ModelOutput(self.student(images))
        with FeatureRecorder(self.student, self.student_taps) as rec:
            logits = self.student(images)
        return ModelOutput(logits, rec.features)

    def teacher_outputs(self, images: Tensor, selected: Sequence[int]) -> list[ModelOutput]:
        """Outputs of teachers ``selected`` as plain float32 tensors that may enter autograd graphs
        (the inference-mode outputs of ``teacher_forward`` copied; bf16 ones cast to float32)."""
        return [_autograd_copy(self.teacher_forward(i, images)) for i in selected]

    def live_teachers(self, batch: Batch, selected: Sequence[int]) -> tuple[Batch, list[ModelOutput]]:
        """The default ``TeacherSource``: a live pass of the selected teachers on ``batch``."""
        return batch, self.teacher_outputs(batch.images, selected)

    def forward_train(
        self,
        batch: Batch,
        info: StepInfo,
        teachers: TeacherSource | None = None,
        own_step: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's forward: ``(student logits, the method's weighted losses)``.

        The method selects the teachers it needs; ``teachers`` (default ``live_teachers``) supplies
        their outputs and the batch the student trains on. ``own_step`` (e.g.
        ``OwnOptimizerStep.separate_step``) receives the method's ``own_step_losses`` on the detached
        student outputs, when the method asks for a separate step, before the method's losses are
        computed (the own optimizer protocol in ``Method``).
        """
        selected = self.method.select_teachers(info)
        batch, teacher_outputs = (teachers or self.live_teachers)(batch, selected)
        student = self.student_forward(batch.images)
        if own_step is not None:
            detached = ModelOutput(student.logits.detach(), {k: v.detach() for k, v in student.features.items()})
            own_losses = self.method.own_step_losses(batch, detached, teacher_outputs, info)
            if own_losses is not None:
                own_step(own_losses)
        method = self.compiled.method if self.compiled is not None else self.method
        losses = method(batch, student, teacher_outputs, info)
        return student.logits, losses

    def forward(self, images: Tensor) -> Tensor:
        """Inference: the student alone (its compiled evaluation pass under ``trainer.compile``)."""
        if self.student_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and not self.student.training:
            return self.compiled.evaluate(images)
        return self.student(images)


def _autograd_copy(out: ModelOutput) -> ModelOutput:
    # inference-mode tensors cannot enter autograd graphs; a plain view-free copy can. Half
    # precision outputs (teacher.precision=bf16) are returned as float32 for the losses.
    def copy(t: Tensor) -> Tensor:
        return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t.clone()

    return ModelOutput(copy(out.logits), {k: copy(v) for k, v in out.features.items()})


def sum_losses(losses: dict[str, Tensor]) -> Tensor:
    """The total loss of a step: the sum of the method's weighted terms, in float32."""
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
            sum_losses(losses).backward()
            self.optimizer.step()
        else:
            self.grad_scaler.scale(sum_losses(losses)).backward()
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
    teachers: TeacherSource | None = None,
) -> dict[str, float]:
    """One reference training step under the own-optimizer protocol; returns the loss terms.

    Order: lr sync; teacher outputs (``teachers``, default the live pass) and student forward; the separate own step when the method asks for one
    (on detached student outputs); the method's losses; one backward of their sum; the own optimizer's
    joint step (if no separate step happened); the main optimizer's step.
    """
    own.sync_lr(main_optimizer)
    main_optimizer.zero_grad(set_to_none=True)
    own.zero_grad()
    _, losses = distiller.forward_train(batch, info, teachers=teachers, own_step=own.separate_step)
    sum_losses(losses).backward()
    own.after_main_backward()
    main_optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}
