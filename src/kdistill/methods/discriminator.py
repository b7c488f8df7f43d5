"""MEAL's block discriminator (docs/methods/meal.md): a small fully connected teacher-vs-student classifier."""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.utils import ConfigError


def discriminator_widths(in_dim: int, reduction: int = 2, depth: int = 2, outputs: int = 2) -> list[int]:
    """Layer widths ``[d, ⌊d/K⌋, ⌊d/K²⌋, ..., outputs]`` with ``depth`` hidden layers.

    ``d=10, K=2`` → ``[10, 5, 2, 2]``; ``d=1000, K=8`` → ``[1000, 125, 15, 2]`` (MEAL V2).
    """
    if in_dim < 1 or reduction < 1 or depth < 0 or outputs not in (1, 2):
        raise ConfigError(
            f"discriminator needs in_dim >= 1, reduction >= 1, depth >= 0 and 1 or 2 outputs; "
            f"got in_dim={in_dim}, reduction={reduction}, depth={depth}, outputs={outputs}"
        )
    widths = [in_dim]
    for _ in range(depth):
        widths.append(widths[-1] // reduction)
    if min(widths) < 1:
        raise ConfigError(
            f"discriminator widths {widths} reach 0 for input width {in_dim} with reduction {reduction} and "
            f"depth {depth}; use a smaller disc_reduction or disc_depth"
        )
    return [*widths, outputs]


class Discriminator(nn.Module):
    """Fully connected layers ``d → ⌊d/K⌋ → ⌊d/K²⌋ → 2`` with bias, ReLU between layers.

    The reference uses 1×1 convolutions on a ``(2B, d, 1, 1)`` view, the same map and parameter count
    as these linear layers. ``final_relu=True`` reproduces the reference's ReLU on the output logits
    (a loss floor of ½·ln 2); it is off by default. No normalisation, so scoring the student
    and teacher rows in one stacked batch or separately gives the same outputs.
    """

    def __init__(self, in_dim: int, reduction: int = 2, depth: int = 2, outputs: int = 2, final_relu: bool = False):
        super().__init__()
        self.widths = discriminator_widths(in_dim, reduction, depth, outputs)
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(self.widths) - 2 or final_relu:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.reshape(x.shape[0], -1))
