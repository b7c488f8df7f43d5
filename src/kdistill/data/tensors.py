"""Small images held in memory as one uint8 tensor, batched without per-image transforms.

Decoding happens once; a batch is a single index operation, and augmentation (pad-4 random crop,
horizontal flip) runs on whole batches on the training device (``BatchAugment``). 32×32 data
therefore needs no worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ImageTensors:
    """``images`` uint8 N×C×H×W, ``targets`` int64 N; ``index`` of a sample is its row."""

    images: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        # index_select copies whole rows (30x faster than advanced indexing for a batch of 32×32 images)
        return self.images.index_select(0, idx), self.targets.index_select(0, idx), idx

    def subset_per_class(self, per_class: int, seed: int = 0) -> ImageTensors:
        """A class-balanced subset: ``per_class`` samples of every class, chosen by ``seed``."""
        g = torch.Generator().manual_seed(seed)
        keep = []
        for c in torch.unique(self.targets).tolist():
            rows = torch.nonzero(self.targets == c).flatten()
            if len(rows) < per_class:
                raise ValueError(f"class {c} has {len(rows)} samples, fewer than per_class={per_class}")
            keep.append(rows[torch.randperm(len(rows), generator=g)[:per_class]])
        rows = torch.cat(keep).sort().values
        return ImageTensors(self.images[rows].clone(), self.targets[rows].clone())

    def channel_stats(self, chunk: int = 4096) -> tuple[list[float], list[float]]:
        """Per-channel mean and (unbiased) standard deviation of the images scaled to [0, 1].

        Exact: per-channel histograms of the uint8 values give integer sums of x and x², so the only
        rounding is the final division, and memory stays at one chunk of images (a float64 copy of
        a 50,000-image split would take 1.2 GB, twice over with the transposed copy).
        """
        channels = self.images.shape[1]
        counts = torch.zeros(channels, 256, dtype=torch.int64)
        for block in self.images.split(chunk):
            for c in range(channels):
                counts[c] += torch.bincount(block[:, c].reshape(-1), minlength=256)
        values = list(range(256))
        means, stds = [], []
        for c in range(channels):
            hist = counts[c].tolist()
            n = sum(hist)
            s1 = sum(v * k for v, k in zip(values, hist, strict=True))  # Python ints: exact
            s2 = sum(v * v * k for v, k in zip(values, hist, strict=True))
            means.append(s1 / (255 * n))
            stds.append(math.sqrt((n * s2 - s1 * s1) / (n * (n - 1))) / 255 if n > 1 else float("nan"))
        return means, stds


class BatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled (or ordered) index batches, sharded across ``world_size`` processes.

    Each rank gets the same number of batches; ``set_epoch`` reseeds the shuffle (Lightning calls it).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` skip the batches a resumed run already trained on."""
        self.resume_at = (epoch, batches_done)

    def _per_rank(self) -> int:
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _rank_order(self) -> Tensor:
        """This rank's sample indices of the current epoch, in batch order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        n = self._per_rank()
        total = n * self.world_size
        if total > self.size:  # pad by wrapping so every rank has n samples
            order = torch.cat([order, order[: total - self.size]])
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._rank_order()
        n = len(mine)
        skip = 0
        if self.resume_at is not None:
            if self.resume_at[0] == self.epoch:
                skip = self.resume_at[1] * self.batch_size
            self.resume_at = None
        for start in range(skip, n, self.batch_size):
            chunk = mine[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                break
            yield chunk.tolist()


class ClassBalancedBatchSampler(BatchSampler):
    """Training batches of ``batch_size / m`` groups of ``m`` samples of one class each (``m`` =
    ``samples_per_class``), so every class present in a batch has at least ``m`` samples: the
    m-per-class sampling of supervised contrastive losses over the batch (in-batch MCL).

    Each epoch (seeded by ``seed + epoch``) every class's rows are shuffled and cut into groups of
    ``m``; a class whose size is not a multiple of ``m`` completes its last group with rows of its
    own drawn again. The groups are shuffled and dealt to the ranks in turn; a rank's last
    incomplete batch is dropped. ``resume`` skips batches as ``BatchSampler`` does.
    """

    def __init__(self, labels: Tensor, batch_size: int, samples_per_class: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        m = int(samples_per_class)
        if m < 1 or batch_size % m:
            raise ValueError(f"batch_size {batch_size} must be a multiple of samples_per_class {samples_per_class}")
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        super().__init__(len(self.labels), batch_size, shuffle=True, drop_last=True, seed=seed, rank=rank,
                         world_size=world_size)
        self.samples_per_class = m
        counts = torch.bincount(self.labels)
        self.num_groups = int(((counts + m - 1) // m).sum())
        # the rows of every class present, found once
        self.class_rows = [r for r in torch.argsort(self.labels, stable=True).split(counts.tolist()) if len(r)]
        if self.num_groups // world_size < batch_size // m:
            raise ValueError(f"{len(self.labels)} samples make {self.num_groups} groups of {m}: fewer than one batch "
                             f"of {batch_size} per process")

    def __len__(self) -> int:
        return (self.num_groups // self.world_size) // (self.batch_size // self.samples_per_class)

    def _rank_order(self) -> Tensor:
        m = self.samples_per_class
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        groups = []
        for rows in self.class_rows:
            rows = rows[torch.randperm(len(rows), generator=g)]
            short = -len(rows) % m
            if short:
                rows = torch.cat([rows, rows[torch.randint(len(rows), (short,), generator=g)]])
            groups.append(rows.view(-1, m))
        order = torch.cat(groups)
        order = order[torch.randperm(len(order), generator=g)]
        per_rank = len(order) // self.world_size
        return order[: per_rank * self.world_size][self.rank :: self.world_size].reshape(-1)


def make_loader(
    data: ImageTensors,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    loader_class: type[torch.utils.data.DataLoader] = torch.utils.data.DataLoader,
    samples_per_class: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader (``loader_class``) yielding ``(uint8 images, targets, indices)`` batches from ``data``;
    training batches of ``samples_per_class`` images per class (``ClassBalancedBatchSampler``) when given."""
    sampler: BatchSampler
    if train and samples_per_class:
        sampler = ClassBalancedBatchSampler(data.targets, batch_size, samples_per_class, seed, rank, world_size)
    else:
        sampler = BatchSampler(len(data), batch_size, shuffle=train, drop_last=train and len(data) >= batch_size,
                               seed=seed, rank=rank, world_size=world_size)
    # its own generator: creating an iterator then draws no number from the global RNG, so a resumed
    # run's augmentations (global RNG, restored from the checkpoint) match an uninterrupted run's
    return loader_class(data, batch_size=None, sampler=sampler, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))


class BatchAugment(nn.Module):
    """uint8 batch → float, pad-``padding`` random crop + horizontal flip (train), normalise.

    Crop offsets and flips are drawn per sample from ``generator`` (or the global RNG), so a run
    is reproducible from its seed. ``augment=False`` only converts and normalises.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 4, flip: bool = True):
        super().__init__()
        self.padding, self.flip = padding, flip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def sample_params(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample (dy, dx, flip) as an n×3 int tensor; dy, dx in [0, 2·padding]."""
        hi = 2 * self.padding + 1
        offsets = torch.randint(0, hi, (n, 2), generator=generator, device="cpu")
        flips = torch.randint(0, 2 if self.flip else 1, (n, 1), generator=generator, device="cpu")
        return torch.cat([offsets, flips], 1).to(device)

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """Crop and flip a uint8 or float batch with explicit per-sample ``params``."""
        n, c, h, w = images.shape
        p = self.padding
        if p:
            padded = torch.nn.functional.pad(images, (p, p, p, p))
            rows = (params[:, 0].view(n, 1) + torch.arange(h, device=images.device).view(1, h))  # n×h
            cols = (params[:, 1].view(n, 1) + torch.arange(w, device=images.device).view(1, w))  # n×w
            flip = params[:, 2].bool().view(n, 1)
            cols = torch.where(flip, cols.flip(1), cols)
            # one gather over each flattened padded plane (2-3x faster than a row then a column gather)
            flat = (rows.view(n, h, 1) * (w + 2 * p) + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
            return padded.reshape(n, c, -1).gather(2, flat).view(n, c, h, w)
        flip = params[:, 2].bool()
        out = images.clone()
        out[flip] = images[flip].flip(3)
        return out

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 → float in [0, 1] → (x - mean) / std, in place on one new float tensor.

        The same operations in the same order as the out-of-place form, so results are bit-identical
        to runs made before this change; only the two temporary batches are gone.
        """
        return images.to(torch.float32, copy=True).div_(255).sub_(self.mean).div_(self.std)

    def forward(self, images: Tensor, train: bool, generator: torch.Generator | None = None) -> Tensor:
        if train and (self.padding or self.flip):
            images = self.apply(images, self.sample_params(len(images), images.device, generator))
        return self.normalize(images)
