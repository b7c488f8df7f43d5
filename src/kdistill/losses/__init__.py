"""Loss functions usable in anyone's own training loop (each documented with its formula)."""

from kdistill.losses.kd import kd_loss

__all__ = ["kd_loss"]
