"""MEAL (Shen et al., AAAI 2019, arXiv 1812.02425) and MEAL V2 (arXiv 2009.08453): block alignment,
block similarity losses and the discriminator's binary cross-entropy (docs/methods/meal.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss

SIMILARITIES = ("soft_ce", "kl", "l1_prob", "l2_prob", "l1", "l2")
SOFT_SIMILARITIES = ("soft_ce", "kl", "l1_prob", "l2_prob")


def meal_align(feature: Tensor, dim: int, pool: str = "avg") -> Tensor:
    """MEAL v1 block vector (the authors' alignment): resample the spatial axis to length ``dim``, then reduce channels.

    ``B×C×H×W`` (or ``B×C``, one position) → ``B×C×L`` with ``L=HW`` → adaptive average (``pool="avg"``)
    or max (``"max"``) pooling along ``L`` to ``dim`` (repeats values when ``dim > L``) → mean (avg) or
    max (max) over channels → ``B×dim``. The batch axis is kept even when ``B=1`` (the reference squeezes it away).
    """
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    x = feature.float().reshape(feature.shape[0], feature.shape[1] if feature.dim() > 1 else 1, -1)
    if pool == "avg":
        return F.adaptive_avg_pool1d(x, dim).mean(dim=1)
    return F.adaptive_max_pool1d(x, dim).amax(dim=1)


@float32_loss
def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """``-1/B Σ_b Σ_i p_T[b,i] · log softmax(z_S/T)[b,i]`` (MEAL's ``ce`` similarity, MEAL V2's loss).

    Equals KL(p_T‖p_S) plus the teacher entropy, a constant for the student. No T² factor.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(target_probs.detach().float() * log_p_s).sum(dim=1).mean()


@float32_loss
def similarity_loss(student: Tensor, target: Tensor, kind: str = "soft_ce", temperature: float = 1.0) -> Tensor:
    """MEAL block similarity ``ℓ(v_S, target)``, ``student``/``target`` of shape ``B×d``.

    ``target`` holds teacher *probabilities* for the soft kinds (``soft_ce``, ``kl``, ``l1_prob``,
    ``l2_prob``; the student side is ``softmax(v_S/T)``) and raw teacher vectors for ``l1``/``l2``:

    * ``soft_ce``: ``-mean_b Σ_i p_T log p_S``;  ``kl``: ``mean_b Σ_i p_T (log p_T - log p_S)``;
    * ``l1_prob`` / ``l2_prob``: element mean of ``|p_S - p_T|`` / ``(p_S - p_T)²``;
    * ``l1`` / ``l2``: element mean of ``|v_S - v_T|`` / ``(v_S - v_T)²``.
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity {kind!r}; allowed: {', '.join(SIMILARITIES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = target.detach().float()
    if kind == "soft_ce":
        return soft_cross_entropy(student, target, temperature)
    if kind == "kl":
        log_p_s = F.log_softmax(student.float() / temperature, dim=1)
        return (torch.xlogy(target, target) - target * log_p_s).sum(dim=1).mean()
    if kind in ("l1_prob", "l2_prob"):
        diff = F.softmax(student.float() / temperature, dim=1) - target
    else:
        diff = student.float() - target
    return diff.abs().mean() if kind in ("l1_prob", "l1") else diff.pow(2).mean()


def _labels(rows: Tensor, teacher: bool) -> Tensor:
    """Two outputs: student ``[1, 0]``, teacher ``[0, 1]``; one output (``P(teacher)``): 0 / 1."""
    labels = torch.zeros_like(rows)
    if rows.shape[1] == 1:
        labels.fill_(1.0 if teacher else 0.0)
    else:
        labels[:, 1 if teacher else 0] = 1.0
    return labels


@float32_loss
def discriminator_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """The discriminator loss ``L_D``: BCE-with-logits over the stacked ``[student rows; teacher rows]``.

    With two outputs per row the targets are ``[1, 0]`` (student) and ``[0, 1]`` (teacher), averaged
    over all ``2B×2`` entries as the reference code does; with one output, 0 (student) and 1 (teacher).
    """
    if student_out.shape[1] != teacher_out.shape[1] or student_out.shape[1] not in (1, 2):
        raise ValueError(f"discriminator outputs must have 1 or 2 columns, got {student_out.shape} and {teacher_out.shape}")
    out = torch.cat([student_out, teacher_out]).float()
    labels = torch.cat([_labels(student_out, False), _labels(teacher_out, True)]).float()
    return F.binary_cross_entropy_with_logits(out, labels)


@float32_loss
def fooling_loss(student_out: Tensor) -> Tensor:
    """Non-saturating generator term ``BCE(D(v_S), teacher label)`` (mode ``alternating``)."""
    return F.binary_cross_entropy_with_logits(student_out.float(), _labels(student_out, True).float())
