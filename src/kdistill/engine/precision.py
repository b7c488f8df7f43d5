"""Mixed precision for the whole distillation step (``trainer.precision=bf16-mixed`` / ``16-mixed``).

Lightning runs the step's forward under autocast (bfloat16, or float16 with loss scaling); the
backward and the optimizer steps stay outside it. What kdistill adds:

* the teachers follow the trainer (``teacher.precision=auto``, the default): bf16 autocast under
  ``bf16-mixed``, float16 under ``16-mixed``, float32 otherwise; their outputs reach the losses as
  float32;
* every classifier (the student's and each teacher's last ``nn.Linear``) runs in float32 on the
  float32 pooled features: bf16 logits keep 8 mantissa bits, enough to flip near-ties, for a
  negligible share of the step;
* the losses run outside autocast on float32 inputs (``kdistill.losses._common.float32_loss``):
  softmax and KL at temperature, DKD's log-sum-exps and masks, HCL's poolings, CRD's normalisation
  and scores, the relational losses' matrix products. The networks' and the method's modules'
  convolutions and linear layers (ABFs, embeddings, discriminators) run in reduced precision.
"""

from __future__ import annotations

import torch
from torch import nn

from kdistill.models.cohort import Cohort
from kdistill.step import _fp32_linear_forward, classifier_head
from kdistill.utils import ConfigError

MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TEACHER_PRECISIONS = ("auto", "32", "bf16", "16")


def resolve_teacher_precision(teacher_precision: str, trainer_precision: str, accelerator: str = "auto") -> str:
    """The teacher pass's precision (``"32"``, ``"bf16"`` or ``"16"``); ``auto`` follows the trainer
    (Lightning runs ``16-mixed`` as ``bf16-mixed`` on a CPU, and so do the teachers)."""
    if teacher_precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"teacher.precision must be one of {TEACHER_PRECISIONS}, got {teacher_precision!r}")
    if teacher_precision != "auto":
        return teacher_precision
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if trainer_precision == "16-mixed" and on_cpu:
        return "bf16"
    return {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "16"}.get(trainer_precision, "32")


def float32_classifier(model: nn.Module, enabled: bool = True) -> None:
    """Run ``model``'s classifier (``classifier_head``) in float32 under autocast, or undo it; for a
    cohort of networks (online methods), every member's classifier.

    The replacement is an instance attribute of the layer: parameters, state dict and exports are
    unchanged, and without autocast the layer computes exactly what ``nn.Linear`` does.
    """
    for net in model.members if isinstance(model, Cohort) else [model]:
        head = classifier_head(net)
        if head is None:
            continue
        if enabled:
            head.forward = _fp32_linear_forward.__get__(head)
        elif "forward" in head.__dict__:
            del head.forward
