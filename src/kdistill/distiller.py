"""One training step's forward: student with taps, chosen teachers frozen, then the method.

Teachers are kept in eval mode whatever ``train()`` is called, run under inference mode, never
receive gradients and are excluded from ``trainable_parameters``; each may have its own input
normalisation (``Normalization``), applied to the student-normalised batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kdistill.features import FeatureRecorder
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo
from kdistill.utils import ConfigError

if TYPE_CHECKING:
    from kdistill.engine.compile import CompiledPasses


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
        self._student_taps = method.student_taps(student)
        self._teacher_taps = [method.teacher_taps(t) for t in self.teachers]
        self.teacher_precision = "32"
        self.teacher_channels_last = False
        self.student_channels_last = False
        self.compiled: CompiledPasses | None = None  # set by kdistill.engine.compile.compile_distiller

    def configure_teachers(self, precision: str = "32", channels_last: bool = False) -> None:
        """How the teacher pass runs: ``precision`` ``"32"``, ``"bf16"`` or ``"16"`` (autocast to bfloat16
        or float16 around the teachers; outputs are returned as float32), and the channels-last memory
        format.

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
        return any(self._teacher_taps)

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
        taps = self._teacher_taps[index]
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
        if not self._student_taps:
            return ModelOutput(self.student(images))
        with FeatureRecorder(self.student, self._student_taps) as rec:
            logits = self.student(images)
        return ModelOutput(logits, rec.features)

    def forward_train(
        self,
        batch: Batch,
        info: StepInfo,
        teacher_outputs: Sequence[ModelOutput] | None = None,
        own_step: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the step; ``teacher_outputs`` (from a cache) replaces the teacher passes when given.

        ``own_step`` (e.g. ``OwnOptimizerStep.separate_step``) receives the method's
        ``own_step_losses`` on the detached student outputs, when the method asks for a separate
        step, before the method's losses are computed (the own optimizer protocol in ``Method``).
        """
        if teacher_outputs is None:
            selected = self.method.select_teachers(info)
            teacher_outputs = [self._clone_out(self.teacher_forward(i, batch.images)) for i in selected]
        student = self.student_forward(batch.images)
        if own_step is not None:
            detached = ModelOutput(student.logits.detach(), {k: v.detach() for k, v in student.features.items()})
            own_losses = self.method.own_step_losses(batch, detached, teacher_outputs, info)
            if own_losses is not None:
                own_step(own_losses)
        losses = (self.compiled.method if self.compiled is not None else self.method)(batch, student, teacher_outputs, info)
        return student.logits, losses

    @staticmethod
    def _clone_out(out: ModelOutput) -> ModelOutput:
        # inference-mode tensors cannot enter autograd graphs; a plain view-free copy can. Half
        # precision outputs (teacher.precision=bf16) are returned as float32 for the losses.
        def copy(t: Tensor) -> Tensor:
            return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t.clone()

        return ModelOutput(copy(out.logits), {k: copy(v) for k, v in out.features.items()})

    def forward(self, images: Tensor) -> Tensor:
        """Inference: the student alone."""
        if self.student_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and not self.student.training:
            return self.compiled.evaluate(images)
        return self.student(images)
