"""Which tensor became NaN or Inf first, and why: the input batch, a teacher's output, the student's
output, or a loss term. Run once, when a loss term is found non-finite; the training state is not
changed by it (teachers and student are re-run without gradients on the same batch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.methods.base import ModelOutput


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _bad_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not _finite(p.detach())] + \
           [n for n, b in model.named_buffers() if b.is_floating_point() and not _finite(b)]


@torch.no_grad()
def diagnose(distiller: nn.Module, images: Tensor, augment: nn.Module | None, losses: dict[str, Tensor],
             teacher_outputs: Sequence[ModelOutput] | None = None) -> str:
    """Name the first non-finite tensor of a step, in the order data → teachers → student → loss, with
    the likely cause. ``images`` is the batch as the networks saw it (normalised)."""
    if not _finite(images):
        std = getattr(augment, "std", None)
        if std is not None and bool((std == 0).any()):
            channels = [i for i, s in enumerate(std.flatten().tolist()) if s == 0]
            return (f"the input batch is non-finite: the normalisation std is 0 for channel(s) {channels} (constant "
                    "images give a zero std; check the data, or set data.mean / data.std)")
        return "the input batch is non-finite: the images or the normalisation (data.mean / data.std) hold NaN or Inf"
    if teacher_outputs is not None:
        for j, out in enumerate(teacher_outputs):
            if not _finite(out.logits):
                return (f"cached teacher output {j} is non-finite: the teacher cache (teacher.cache) holds NaN or "
                        "Inf; rebuild it with kdistill cache-teacher")
    for i, teacher in enumerate([] if teacher_outputs is not None else distiller.teachers):
        if not _finite(distiller.teacher_forward(i, images).logits):
            bad = _bad_parameters(teacher)
            cause = (f"its weights hold NaN or Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): check "
                     "the teacher checkpoint" if bad else "its activations overflowed (teacher.precision=bf16? "
                     "inputs far outside the range it was trained on?)")
            return f"teacher {i}'s output is non-finite: {cause}"
    student = distiller.student
    was = student.training
    student.eval()
    try:
        logits = student(images)
    finally:
        student.train(was)
    if not _finite(logits):
        bad = _bad_parameters(student)
        cause = ("its weights became NaN or Inf: training diverged (lower optim.lr, or set trainer.gradient_clip_val)"
                 if bad else "its activations overflowed")
        return f"the student's output is non-finite: {cause}"
    names = [name for name, value in losses.items() if not _finite(value)]
    return (f"the inputs and network outputs are finite; loss term {names[0]!r} is not (a weight or temperature "
            "of the method out of range, or its features overflowed)") if names else "no non-finite tensor found"
