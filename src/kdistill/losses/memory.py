"""Memory banks of embeddings addressed by dataset index, and index-aware contrast sampling.

One implementation shared by every method that contrasts a batch against stored embeddings of
the whole training set: CRD (Tian et al., ICLR 2020), MCL-OKD (Yang et al., ICASSP 2021) and
HKD (Zhou et al., ICCV 2021).

* ``MemoryBank`` holds named banks (``num_data × feat_dim`` buffers, uniform in ``[-a, a]`` with
  ``a = 1/sqrt(feat_dim/3)``), scores anchors against chosen rows, and applies the momentum update
  ``M[i] <- normalise(m·M[i] + (1-m)·v_i)``. Buffers move with ``.to`` and are saved in
  ``state_dict``. Under ``torch.distributed`` every process keeps a full copy: the update
  all-gathers the indices and embeddings of all processes, so every copy receives the same writes.
* ``ContrastSampler`` turns a batch's dataset indices into contrast rows: a positive column
  (the sample itself, ``"exact"``; a random sample of its class, ``"relax"``; none, ``"none"``)
  followed by ``K`` negatives. Without labels negatives are any other sample; with the training
  set's labels, only samples of other classes (as the CRD and HKD reference loaders do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLING_MODES = ("fast", "exact")
POSITIVE_MODES = ("exact", "relax", "none")


def world_size() -> int:
    """Number of processes (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` from every process, concatenated in rank order (batch sizes may differ)."""
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(most, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n.item())] for part, n in zip(parts, sizes, strict=True)])


class ContrastSampler(nn.Module):
    """Contrast rows ``B × (P + K)`` for a batch of dataset indices (``P`` = 1, or 0 for ``"none"``).

    ``sampling``: ``"fast"`` draws negatives uniformly *with* replacement on the indices' device;
    ``"exact"`` draws them *without* replacement within each row (with replacement only if ``K``
    exceeds the candidates). ``labels`` (the training set's class of every row, optional) restricts
    negatives to other classes and enables ``positive="relax"``. Without labels a negative is never
    the anchor's own row. The labels are a non-persistent buffer: the data set supplies them again.
    """

    def __init__(
        self,
        num_data: int,
        num_negatives: int,
        sampling: str = "fast",
        positive: str = "exact",
        labels: Tensor | None = None,
    ):
        super().__init__()
        if num_data < 2:
            raise ValueError(f"num_data must be >= 2 (the training-set size), got {num_data}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if positive not in POSITIVE_MODES:
            raise ValueError(f"positive must be one of {POSITIVE_MODES}, got {positive!r}")
        if positive == "relax" and labels is None:
            raise ValueError("positive='relax' draws a sample of the anchor's class: give the training labels")
        self.num_data = int(num_data)
        self.num_negatives = int(num_negatives)
        self.sampling = sampling
        self.positive = positive
        self.class_aware = labels is not None
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if labels.numel() != num_data:
                raise ValueError(f"labels has {labels.numel()} entries for num_data={num_data}")
            if labels.min() < 0:
                raise ValueError("labels must be class indices >= 0")
            counts = torch.bincount(labels)
            if (counts == num_data).any():
                raise ValueError("labels hold a single class: there are no negatives of another class")
            # rows grouped by class: class c occupies order[start[c] : start[c] + count[c]]
            self.register_buffer("labels", labels, persistent=False)
            self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
            self.register_buffer("counts", counts, persistent=False)
            self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)

    def forward(self, index: Tensor) -> Tensor:
        """Contrast rows for ``index`` (B dataset indices), on ``index``'s device."""
        index = index.to(torch.long)
        negatives = self._other_class(index) if self.class_aware else self._other_row(index)
        if self.positive == "none":
            return negatives
        positive = index if self.positive == "exact" else self._same_class(index)
        return torch.cat([positive[:, None], negatives], dim=1)

    def _other_row(self, index: Tensor) -> Tensor:
        b, k, n = index.shape[0], self.num_negatives, self.num_data
        if self.sampling == "fast" or k > n - 1:
            # uniform over the n-1 other rows: draw from [0, n-1) and skip over the positive
            draws = torch.randint(0, n - 1, (b, k), device=index.device)
            return draws + (draws >= index[:, None]).long()
        weights = torch.ones(b, n, device=index.device)
        weights[torch.arange(b, device=index.device), index] = 0
        return torch.multinomial(weights, k, replacement=False)

    def _other_class(self, index: Tensor) -> Tensor:
        labels = self.labels.to(index.device)
        cls = labels[index]
        start, count = self.starts.to(index.device)[cls], self.counts.to(index.device)[cls]
        pool = self.num_data - count  # candidates per row
        b, k = index.shape[0], self.num_negatives
        if self.sampling == "fast" or k > int(pool.min()):
            # a uniform position in the pool, then skip over the anchor's class block
            draws = (torch.rand(b, k, device=index.device) * pool[:, None]).long().clamp_max(pool[:, None] - 1)
            draws = draws + (draws >= start[:, None]).long() * count[:, None]
            return self.order.to(index.device)[draws]
        weights = (labels[None, :] != cls[:, None]).float()
        return torch.multinomial(weights, k, replacement=False)

    def _same_class(self, index: Tensor) -> Tensor:
        cls = self.labels.to(index.device)[index]
        start, count = self.starts.to(index.device)[cls], self.counts.to(index.device)[cls]
        draws = (torch.rand(index.shape[0], device=index.device) * count).long().clamp_max(count - 1)
        return self.order.to(index.device)[start + draws]

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, K={self.num_negatives}, sampling={self.sampling!r}, "
            f"positive={self.positive!r}, class_aware={self.class_aware}"
        )


class MemoryBank(nn.Module):
    """Named banks of unit embeddings, one row per training sample, with momentum updates.

    ``names`` become the buffer names (what ``state_dict`` saves); each bank is
    ``num_data × feat_dim``, initialised uniform in ``[-a, a]``, ``a = 1/sqrt(feat_dim/3)``, in
    the order of ``names``.
    """

    def __init__(self, names: Sequence[str], num_data: int, feat_dim: int, momentum: float = 0.5):
        super().__init__()
        if num_data < 2:
            raise ValueError(f"num_data must be >= 2 (the training-set size), got {num_data}")
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct and non-empty, got {list(names)}")
        self.bank_names = tuple(names)
        self.feat_dim = int(feat_dim)
        self.num_data = int(num_data)
        self.momentum = float(momentum)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        for name in self.bank_names:
            self.register_buffer(name, torch.rand(num_data, feat_dim).mul_(2 * bound).sub_(bound))

    def bank(self, name: str) -> Tensor:
        """The bank ``name`` (``num_data × feat_dim``)."""
        if name not in self.bank_names:
            raise KeyError(f"no bank {name!r}; banks: {list(self.bank_names)}")
        return getattr(self, name)

    @staticmethod
    def dot(bank: Tensor, idx: Tensor, anchor: Tensor) -> Tensor:
        """``<bank[idx[b, k]], anchor[b]>`` without materialising B×(K+1)×D when N×B is smaller."""
        if bank.shape[0] <= idx.shape[1] * bank.shape[1]:
            return (anchor @ bank.t()).gather(1, idx)
        return torch.bmm(bank[idx], anchor.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def update(self, index: Tensor, embeddings: dict[str, Tensor]) -> None:
        """``M[i] <- normalise(m·M[i] + (1-m)·v_i)`` for each named bank and the batch's rows ``index``.

        Out of place: scores computed from the old banks keep them for their backward pass. Under
        DDP the rows of all processes are gathered first; a row sent by two processes (a padded
        shard) is written once, from the lowest rank.
        """
        names = list(embeddings)
        index = index.to(self.bank(names[0]).device, torch.long)
        if world_size() > 1:
            index, gathered = self._gather(index, [embeddings[n] for n in names])
            embeddings = dict(zip(names, gathered, strict=True))
        for name in names:
            bank = self.bank(name)
            rows = bank[index] * self.momentum + embeddings[name].detach().to(bank.dtype) * (1 - self.momentum)
            setattr(self, name, bank.index_copy(0, index, F.normalize(rows, dim=1)))

    @staticmethod
    def _gather(index: Tensor, embeddings: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """All processes' (index, embeddings), duplicates of an index dropped (first one kept)."""
        widths = [e.shape[1] for e in embeddings]
        packed = torch.cat([e.detach().to(embeddings[0].dtype) for e in embeddings], 1)
        index = all_gather_rows(index)
        packed = all_gather_rows(packed)
        order = torch.sort(index, stable=True).indices
        ordered = index[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        keep = order[first]
        return index[keep], list(packed[keep].split(widths, dim=1))

    def extra_repr(self) -> str:
        return f"banks={list(self.bank_names)}, num_data={self.num_data}, feat_dim={self.feat_dim}, momentum={self.momentum}"
