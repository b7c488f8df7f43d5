"""Contrastive Representation Distillation (Tian et al., arXiv 1910.10699); docs/methods/crd.md.

Two linear embedding heads map the pooled student and teacher vectors to unit vectors of
``feat_dim``. Each embedding is scored against ``K`` negatives and one positive drawn from a memory
bank of the *other* model's embeddings (one row per training sample, addressed by dataset index),
and the two NCE losses are summed. The bank is updated with momentum after scoring.

Differences from the reference implementations (RepDistiller, mdistiller):

* head widths are arguments (the method infers them from the pooled widths);
* nothing is tied to CUDA: the banks are registered buffers, so ``.to(device)`` moves them,
  ``state_dict()`` saves them, and negatives are drawn on the banks' device;
* negatives come from a fast sampler by default (uniform *with* replacement over all other
  samples, drawn on the device); ``sampling="exact"`` draws them *without* replacement as the
  reference does. Neither mode excludes samples of the positive's class (the reference draws
  from other classes only, i.e. it also skips the ~1% same-class rows on CIFAR-100) unless the
  training labels are given (``labels=``), which makes both modes draw from other classes only;
* the normalisers ``Z`` are fixed by the first batch (faithful) and kept in buffers, so a
  resumed run keeps them.

Under ``torch.distributed`` (DDP) every process keeps a full copy of both banks: the update
all-gathers the batch indices and embeddings of all processes, so every copy receives the same
writes and the banks stay identical; ``Z`` is set from the mean over all processes' first batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._common import float32_loss, upcast
from kdistill.losses.memory import SAMPLING_MODES, ContrastSampler, MemoryBank, world_size

__all__ = ["SAMPLING_MODES", "CRDLoss", "ContrastMemory", "Embed", "crd_nce_loss"]


@float32_loss
def crd_nce_loss(probs: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of the CRD code on normalised scores ``probs`` (B×(K+1), column 0 positive).

    ``-1/B Σ_b [log P0/(P0 + K·Pn + ε) + Σ_k log K·Pn/(Pk + K·Pn + ε)]`` with ``Pn = 1/num_data``.
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be B×(K+1) with K >= 1, got shape {tuple(probs.shape)}")
    k = probs.shape[1] - 1
    noise = k / num_data
    positive = probs[:, 0]
    negatives = probs[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    log_d0 = torch.log(noise / (negatives + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


class ContrastMemory(MemoryBank):
    """Memory banks of student and teacher embeddings, one row per training sample.

    Buffers (saved in checkpoints, moved by ``.to``): ``memory_student`` (reference ``memory_v1``)
    and ``memory_teacher`` (``memory_v2``), each ``num_data × feat_dim``, initialised uniform in
    ``[-a, a]`` with ``a = 1/sqrt(feat_dim/3)``; ``z_student`` and ``z_teacher``, the normalisers,
    ``-1`` until the first forward sets them to ``mean(scores) · num_data``. The banks and the
    sampler are the shared ``kdistill.losses.memory`` ones; ``labels`` (optional, the training
    set's classes) restricts negatives to other classes.
    """

    def __init__(
        self,
        feat_dim: int,
        num_data: int,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        sampling: str = "fast",
        labels: Tensor | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(("memory_student", "memory_teacher"), num_data, feat_dim, momentum)
        self.sampler = ContrastSampler(num_data, num_negatives, sampling, "exact", labels)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.sampling = sampling
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._z_agreed = False  # under DDP: the first training forward averages Z's candidates

    def sample(self, index: Tensor) -> Tensor:
        """Indices B×(K+1): column 0 the positive ``index``, then K negatives never equal to it.

        ``fast``: uniform with replacement; ``exact``: without replacement within each row (with
        replacement only if K exceeds the ``num_data - 1`` candidates, as the reference).
        """
        return self.sampler(index.to(self.memory_student.device, torch.long))

    _dot = MemoryBank.dot

    def forward(
        self, emb_student: Tensor, emb_teacher: Tensor, index: Tensor, contrast_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Normalised scores ``(P_student_anchor, P_teacher_anchor)``, each B×(K+1); then the update.

        ``emb_*`` are unit-norm embeddings (B×feat_dim), ``index`` the batch's dataset rows;
        ``contrast_index`` (B×(K+1), column 0 the positive) replaces the sampler when given.
        In training mode the banks' rows ``index`` are updated after scoring.
        """
        bank_s, bank_t = self.memory_student, self.memory_teacher
        index = index.to(bank_s.device, torch.long)
        idx = self.sample(index) if contrast_index is None else contrast_index.to(bank_s.device, torch.long)
        # exp(<.,.>/0.07) reaches 1.6e6: keep the scores in float32 whatever autocast says
        dtype = torch.promote_types(bank_s.dtype, torch.float32)
        with torch.autocast(device_type=bank_s.device.type, enabled=False):
            emb_s, emb_t = emb_student.to(dtype), emb_teacher.to(dtype)
            bank_s, bank_t = bank_s.to(dtype), bank_t.to(dtype)
            scores_s = torch.exp(self.dot(bank_t, idx, emb_s) / self.temperature)
            scores_t = torch.exp(self.dot(bank_s, idx, emb_t) / self.temperature)
            with torch.no_grad():  # set once (still negative = unset), without a host sync
                means = torch.stack([scores_s.mean(), scores_t.mean()]).detach()
                if self.training and not self._z_agreed and world_size() > 1:
                    dist.all_reduce(means)  # every process reaches its first step together
                    means /= world_size()
                    self._z_agreed = True
                for z, mean in ((self.z_student, means[0]), (self.z_teacher, means[1])):
                    z.copy_(torch.where(z < 0, mean * self.num_data, z))
            # copies: autograd keeps Z for the backward, and the buffers are written in place
            probs_s = scores_s / self.z_student.clone()
            probs_t = scores_t / self.z_teacher.clone()
            if self.training:
                self.update(index, emb_s, emb_t)
        return probs_s, probs_t

    def update(self, index: Tensor, emb_student: Tensor, emb_teacher: Tensor) -> None:  # type: ignore[override]
        """``M[i] <- normalise(m·M[i] + (1-m)·g(f_i))`` for both banks."""
        super().update(index, {"memory_student": emb_student, "memory_teacher": emb_teacher})

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, feat_dim={self.feat_dim}, K={self.num_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}, sampling={self.sampling!r}"
        )


class Embed(nn.Module):
    """Linear map followed by L2 normalisation: ``g(f) = normalise(W f + b)``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(torch.flatten(x, 1))
        with torch.autocast(z.device.type, enabled=False):  # the normalisation in float32 under mixed precision
            return F.normalize(upcast(z), dim=1)


class CRDLoss(nn.Module):
    """CRD loss ``L_s + L_t`` on pooled vectors (B×C or B×C×1×1), docs/methods/crd.md.

    Both embedding heads are trainable (the teacher's too); the teacher features themselves are
    treated as constants. ``index`` holds the batch's dataset row indices in ``[0, num_data)``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_data: int,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        sampling: str = "fast",
        labels: Tensor | None = None,
    ):
        super().__init__()
        self.embed_student = Embed(student_dim, feat_dim)
        self.embed_teacher = Embed(teacher_dim, feat_dim)
        self.memory = ContrastMemory(feat_dim, num_data, num_negatives, temperature, momentum, sampling, labels)

    def forward(
        self, feat_student: Tensor, feat_teacher: Tensor, index: Tensor, contrast_index: Tensor | None = None
    ) -> Tensor:
        emb_s = self.embed_student(feat_student)
        emb_t = self.embed_teacher(feat_teacher.detach())
        probs_s, probs_t = self.memory(emb_s, emb_t, index, contrast_index)
        n = self.memory.num_data
        return crd_nce_loss(probs_s, n) + crd_nce_loss(probs_t, n)
