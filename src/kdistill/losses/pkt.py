"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, arXiv 1803.10837); docs/methods/pkt.md."""

from __future__ import annotations

import torch
from torch import Tensor

from kdistill.losses._common import check_batch, float32_loss, upcast

_EPS = 1e-7


def _conditional_probabilities(embedding: Tensor) -> Tensor:
    """q_ij = s_ij / Σ_k s_ik with s = (cos-similarity + 1) / 2 (PKT paper eqs. 8–9, cosine kernel)."""
    flat = embedding.flatten(1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + _EPS)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    sim = (unit @ unit.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


@float32_loss
def pkt_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """mean_{i,j} q^t_ij · log((q^t_ij + ε) / (q^s_ij + ε)), ε = 1e-7 (PKT paper eq. 10).

    A KL divergence between the teacher's and the student's conditional similarity
    distributions, averaged over all B² entries (hence the benchmark's weight 30000).
    Embedding widths may differ. ``teacher_embedding`` receives no gradient.
    """
    check_batch("pkt_loss", student_embedding, teacher_embedding)
    q_s = _conditional_probabilities(upcast(student_embedding))
    q_t = _conditional_probabilities(upcast(teacher_embedding.detach()))
    return (q_t * torch.log((q_t + _EPS) / (q_s + _EPS))).mean()
