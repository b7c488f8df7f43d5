"""Mutual contrastive learning for online distillation.

* In-batch MCL (Yang et al., AAAI 2022): every network has an embedding head; a
  supervised contrastive loss over the batch is applied within each network (VCL) and across
  each pair of networks (ICL), plus their soft versions, which match one network's similarity
  distribution to another's detached one.
* MCL-OKD (Yang, An & Xu, ICASSP 2021): peer branches each keep a memory bank of their
  embeddings; every ordered pair of branches contrasts one's embeddings against the other's
  bank with CRD's binary NCE, the normaliser recomputed on every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdistill.losses._common import float32_loss
from kdistill.losses.crd import crd_nce_loss
from kdistill.losses.kd import kd_loss
from kdistill.losses.memory import MemoryBank


@float32_loss
def supcon_matrix_loss(similarity: Tensor, targets: Tensor, diagonal_positive: bool = False) -> Tensor:
    """Supervised contrastive loss of a B×B similarity matrix ``S`` (already divided by τ).

    ``C(S) = -1/B Σ_a Σ_b P_ab (S_ab - log Σ_{b'≠a} exp S_ab') / Σ_b P_ab`` with positives
    ``P_ab = [y_a = y_b][a ≠ b]``. With ``diagonal_positive`` (for a cross-network matrix, where
    the diagonal pairs a sample with itself in the other network) the diagonal becomes a positive
    and joins the denominator. Anchors without any positive are left out of the mean.
    """
    b = similarity.shape[0]
    if similarity.shape != (b, b) or targets.shape != (b,):
        raise ValueError(f"need a B×B similarity and B targets, got {tuple(similarity.shape)} and {tuple(targets.shape)}")
    s = similarity.float()
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    positives = targets[:, None] == targets[None, :]
    if diagonal_positive:
        denominator = s
    else:
        positives = positives & ~eye
        denominator = s.masked_fill(eye, float("-inf"))
    log_prob = s - torch.logsumexp(denominator, dim=1, keepdim=True)
    count = positives.sum(1)
    has = count > 0
    if not has.any():
        return s.sum() * 0.0
    per_anchor = (log_prob * positives).sum(1)[has] / count[has]
    return -per_anchor.mean()


@float32_loss
def mcl_losses(
    embeddings: Sequence[Tensor],
    targets: Tensor,
    temperature: float = 0.1,
    kd_temperature: float = 3.0,
    icl_same_instance_positive: bool = False,
) -> dict[str, Tensor]:
    """The four unweighted contrastive terms of in-batch MCL for n networks' unit embeddings.

    ``vcl = Σ_i C(S^ii)``, ``soft_vcl = Σ_{i≠j} KL_T(sg S^jj ‖ S^ii)``, ``icl = Σ_{i<j} C(S^ij) + C(S^ji)``,
    ``soft_icl = Σ_{i<j} KL_T(sg S^ji ‖ S^ij) + KL_T(sg S^ij ‖ S^ji)``, with ``S^ij = E_i E_jᵀ/τ``;
    the soft terms are row-wise softmax KL at ``kd_temperature`` with the T² factor, averaged over rows.
    """
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"MCL needs at least 2 networks, got {n}")
    sims = [[embeddings[i].float() @ embeddings[j].float().t() / temperature for j in range(n)] for i in range(n)]
    vcl = sum(supcon_matrix_loss(sims[i][i], targets) for i in range(n))
    soft_vcl = sum(kd_loss(sims[i][i], sims[j][j], kd_temperature) for i in range(n) for j in range(n) if i != j)
    icl = targets.new_zeros((), dtype=torch.float32)
    soft_icl = targets.new_zeros((), dtype=torch.float32)
    for i in range(n):
        for j in range(i + 1, n):
            icl = icl + supcon_matrix_loss(sims[i][j], targets, icl_same_instance_positive)
            icl = icl + supcon_matrix_loss(sims[j][i], targets, icl_same_instance_positive)
            soft_icl = soft_icl + kd_loss(sims[i][j], sims[j][i], kd_temperature)
            soft_icl = soft_icl + kd_loss(sims[j][i], sims[i][j], kd_temperature)
    return {"vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl}


@float32_loss
def mcl_okd_nce(
    embeddings: Sequence[Tensor], memory: MemoryBank, contrast_index: Tensor, temperature: float = 0.1
) -> Tensor:
    """MCL-OKD's contrastive term: CRD's binary NCE summed over all ordered pairs of branches.

    For every pair ``i ≠ j`` the embeddings of branch ``j`` (B×D, unit norm) are scored against
    rows ``contrast_index`` (B×(K+1), column 0 the positive) of branch ``i``'s bank
    (``memory.bank_names[i]``): ``exp(<M_i[idx], v_j>/τ)``, normalised by ``Z = mean(scores)·N``
    computed from this batch (detached) rather than frozen after the first batch as CRD does.
    The banks are not updated here: call ``memory.update`` after the step.
    """
    n = len(embeddings)
    if n < 2 or len(memory.bank_names) != n:
        raise ValueError(f"need >= 2 branches and one bank per branch, got {n} embeddings and banks {list(memory.bank_names)}")
    idx = contrast_index.to(memory.bank(memory.bank_names[0]).device, torch.long)
    total = embeddings[0].new_zeros((), dtype=torch.float32)
    for i in range(n):
        bank = memory.bank(memory.bank_names[i]).float()
        for j in range(n):
            if i == j:
                continue
            scores = torch.exp(memory.dot(bank, idx, embeddings[j].float()) / temperature)
            z = scores.mean().detach() * memory.num_data
            total = total + crd_nce_loss(scores / z, memory.num_data)
    return total
