"""Holistic knowledge distillation (Zhou et al., ICCV 2021).

Student and teacher embeddings are contrasted two ways against memory banks of both networks
(InfoNCE): individually (each sample's embedding against the other network's stored embedding of
the same sample) and holistically, after a one-hop graph convolution over a k-nearest-neighbour
graph built within the batch from each network's predictions.

The graph has B nodes (the batch), so it is a dense B×B matrix here: a kNN pick is one ``topk``
over a B×B distance matrix and the graph convolution two small matrix products. A sparse graph
library (DGL, as the reference, or torch-geometric) would add a dependency and scatter kernels
whose launch costs exceed the dense products at batch sizes of 64–256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._common import float32_loss, upcast
from kdistill.losses.memory import MemoryBank


@float32_loss
def knn_graph(logits: Tensor, k: int = 8) -> Tensor:
    """Adjacency ``A`` (B×B, float 0/1): ``A[i, j] = 1`` when ``j`` is among the ``k`` nearest
    neighbours of ``i`` by cosine distance between the softmax outputs; each node is its own
    neighbour (its distance is set to −1 before the pick). ``logits`` are detached."""
    b = logits.shape[0]
    if not 1 <= k <= b:
        raise ValueError(f"k must be in [1, batch size {b}], got {k}")
    probs = F.normalize(torch.softmax(logits.detach().float(), dim=1), dim=1)
    distance = 1 - probs @ probs.t()
    distance.fill_diagonal_(-1.0)
    neighbours = distance.topk(k, dim=1, largest=False).indices
    return torch.zeros(b, b, device=logits.device).scatter_(1, neighbours, 1.0)


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``D`` the number of neighbours of each node (rows of ``A``)."""
    d = adjacency.sum(1).clamp_min(1).rsqrt()
    return d[:, None] * adjacency * d[None, :]


class GraphConv1Hop(nn.Module):
    """One-hop topology-adaptive graph convolution (TAGConv, K=1): ``normalise(Θ0 h + Θ1 Â h + b)``."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear = nn.Linear(2 * dim, out_dim or dim)

    def forward(self, h: Tensor, adjacency: Tensor) -> Tensor:
        propagated = normalized_adjacency(adjacency).to(h.dtype) @ h
        z = self.linear(torch.cat([h, propagated], dim=1))
        with torch.autocast(z.device.type, enabled=False):  # the normalisation in float32 under mixed precision
            return F.normalize(upcast(z), dim=1)


@float32_loss
def memory_infonce(anchor: Tensor, positive: Tensor, bank: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE with the positive first: ``-1/B Σ_b log e^{a·p/τ} / (e^{a·p/τ} + Σ_k e^{a·bank[n_bk]/τ})``.

    ``anchor``, ``positive`` B×D; ``bank`` N×D; ``negatives`` B×K row indices of ``bank``.
    """
    a = anchor.float()
    pos = (a * positive.float()).sum(1, keepdim=True)
    neg = MemoryBank.dot(bank.float(), negatives, a)  # B×N scores then a gather when cheaper than B×K×D rows
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


@float32_loss
def hkd_losses(
    emb_student: Tensor,
    emb_teacher: Tensor,
    graph_student: Tensor | None,
    graph_teacher: Tensor | None,
    memory_student: Tensor,
    memory_teacher: Tensor,
    index: Tensor,
    negatives: Tensor,
    temperature: float = 0.07,
    mix: float = 0.75,
) -> dict[str, Tensor]:
    """HKD's individual and holistic InfoNCE terms (unweighted).

    ``individual``: anchor ``h^S_b``, positive ``M^T[i_b]``, negatives ``M^S[n]``; plus the mirror
    (anchor ``h^T_b``, positive ``M^S[i_b]``, negatives ``M^T[n]``). ``holistic`` (when the graph
    embeddings are given): anchor ``g^S_b``, positive ``sg normalise(mix·M^T[i_b] + (1-mix)·g^T_b)``,
    negatives ``M^S[n]``; plus its mirror. Banks are read, not updated.
    """
    pos_t, pos_s = memory_teacher[index].float(), memory_student[index].float()
    losses = {
        "individual": memory_infonce(emb_student, pos_t, memory_student, negatives, temperature)
        + memory_infonce(emb_teacher, pos_s, memory_teacher, negatives, temperature)
    }
    if graph_student is not None and graph_teacher is not None:
        target_s = F.normalize(mix * pos_t + (1 - mix) * upcast(graph_teacher), dim=1).detach()
        target_t = F.normalize(mix * pos_s + (1 - mix) * upcast(graph_student), dim=1).detach()
        losses["holistic"] = memory_infonce(graph_student, target_s, memory_student, negatives, temperature) + memory_infonce(
            graph_teacher, target_t, memory_teacher, negatives, temperature
        )
    return losses
