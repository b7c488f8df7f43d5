"""A procedurally generated, image-like classification set that needs no download.

Each class owns a few small coloured motifs (smooth random patches). An image is a textured
background, its class's motifs pasted at random positions, motifs of *other* classes as
distractors, a random global colour cast and pixel noise. Recognising a class means detecting
several local patterns anywhere in the image among distractors, so depth and width pay off:
a deeper teacher clearly beats a shallow student. Deterministic by seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.data.tensors import ImageTensors


def _smooth_noise(n: int, channels: int, size: int, cells: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)


def make_synthetic(
    num_classes: int = 10,
    size: int = 1000,
    image_size: int = 32,
    seed: int = 0,
    split_seed: int = 0,
    motifs_per_class: int = 2,
    distractors: int = 1,
    motif_size: int | None = None,
    noise: float = 0.08,
) -> ImageTensors:
    """``size`` images of ``num_classes`` classes (balanced). ``seed`` fixes the classes (their
    motifs); ``split_seed`` draws the samples, so train and val share classes but not images."""
    if not 2 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in [2, 1000], got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    m = motif_size or max(4, (image_size * 7) // 16)
    g_cls = torch.Generator().manual_seed(seed)
    motifs = _smooth_noise(num_classes * motifs_per_class, 4, m, 3, g_cls)  # RGB + alpha
    motifs[:, 3] = (motifs[:, 3] > 0.45).float()  # hard-edged shapes
    motifs = motifs.view(num_classes, motifs_per_class, 4, m, m)

    g = torch.Generator().manual_seed(10_007 * (split_seed + 1) + seed)
    targets = torch.arange(size) % num_classes
    targets = targets[torch.randperm(size, generator=g)]
    canvas = _smooth_noise(size, 3, image_size, 4, g) * 0.6 + 0.2
    slots = motifs_per_class + distractors
    pos = torch.randint(0, image_size - m + 1, (size, slots, 2), generator=g)
    other = (targets.view(-1, 1) + torch.randint(1, num_classes, (size, distractors), generator=g)) % num_classes
    which_d = torch.randint(0, motifs_per_class, (size, distractors), generator=g)
    order = torch.argsort(torch.rand(size, slots, generator=g), dim=1)  # paste order
    for i in range(size):
        for s in order[i].tolist():
            if s < motifs_per_class:
                patch = motifs[targets[i], s]
            else:
                patch = motifs[other[i, s - motifs_per_class], which_d[i, s - motifs_per_class]]
            y, x = pos[i, s].tolist()
            region = canvas[i, :, y : y + m, x : x + m]
            alpha = patch[3:4]
            region.mul_(1 - alpha).add_(patch[:3] * alpha)
    cast = 0.8 + 0.4 * torch.rand(size, 3, 1, 1, generator=g)
    canvas = canvas * cast + noise * torch.randn(canvas.shape, generator=g)
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageTensors(images, targets.long())
