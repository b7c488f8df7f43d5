"""ReviewKD on FPN levels: "Distilling Knowledge via Knowledge Review" (Chen et al., CVPR 2021,
arXiv 2104.09044), applied to torchvision detectors as the paper applies it to Detectron2 ones.

Per training forward the student runs unchanged; two temporary hooks capture its padded input
batch (the output of ``student.transform``) and its FPN levels (the output of
``student.backbone``, the very tensors its heads consume). The frozen teacher's backbone+FPN runs
on that same batch, re-normalised with the teacher's statistics. One ABF per level, from the
coarsest level (no fusion) to the finest (each fuses the residual of the next-coarser ABF, resized
to its own size), produces the maps compared with the teacher's by the hierarchical context loss:

    loss_reviewkd = λ · Σ_levels HCL(ABF_l, T_l)

added to the detector's loss dict under one extra key (paper Sec. 3.3-3.4, Eq. 5-6). The heads
never see the ABF outputs, and the ABFs do not exist at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.losses.hcl import hcl_loss
from kdistill.methods.reviewkd import ABF, FUSIONS
from kdistill.utils import ConfigError

GRAD_MODES = ("no_grad", "inference")
LOSSES = ("hcl", "mse")


def _stats(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[Tensor, Tensor]:
    transform = getattr(model, "transform", None)
    if mean is None:
        mean = getattr(transform, "image_mean", None)
    if std is None:
        std = getattr(transform, "image_std", None)
    if mean is None or std is None:
        raise ConfigError("the teacher has no transform with image_mean/image_std: pass teacher_mean and teacher_std")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


class ReviewKDDetection(nn.Module):
    """A torchvision detector (student) distilled from a frozen teacher's FPN with ReviewKD.

    ``forward(images, targets)`` in train mode returns the student's loss dict plus ``loss_key``;
    in eval mode the student's predictions (the teacher and the ABFs do not run). The teacher is
    held outside the module tree: it is not in ``state_dict()``, ``parameters()`` or DDP, stays in
    eval mode and without gradients, and follows ``.to()``.

    Options: ``loss_weight`` λ (paper values per pair: 1.2 R101→R18, 1.0 R101→R50, 2.0 R50→MobileNetV2
    for Faster R-CNN); ``mid_channels`` (256); ``level_map``: explicit ``(student_key, teacher_key)``
    pairs, finest first (default: both backbones' levels in order); ``teacher_mean``/``teacher_std``
    (default: the teacher's transform's); ``teacher_input_fn`` maps the un-normalised RGB [0, 1]
    batch to the teacher's convention (e.g. BGR) before its normalisation; ``teacher_grad_mode``
    ``"no_grad"`` or ``"inference"``; ``hcl_levels`` (4, 2, 1); ``fusion`` ``"attention"``/``"sum"``
    and ``loss`` ``"hcl"``/``"mse"`` (the paper's ablations); ``probe_size`` of the dry run that
    sizes the ABFs.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        loss_weight: float = 1.0,
        mid_channels: int = 256,
        level_map: Sequence[Sequence[str]] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        teacher_input_fn: Callable[[Tensor], Tensor] | None = None,
        teacher_grad_mode: str = "no_grad",
        loss_key: str = "loss_reviewkd",
        hcl_levels: Sequence[int] = (4, 2, 1),
        fusion: str = "attention",
        loss: str = "hcl",
        probe_size: Sequence[int] = (256, 256),
    ):
        super().__init__()
        if not loss_weight >= 0:
            raise ConfigError(f"loss_weight must be >= 0, got {loss_weight}")
        if teacher_grad_mode not in GRAD_MODES:
            raise ConfigError(f"teacher_grad_mode must be one of {GRAD_MODES}, got {teacher_grad_mode!r}")
        if fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        if int(mid_channels) != mid_channels or mid_channels < 1:
            raise ConfigError(f"mid_channels must be a positive integer, got {mid_channels}")
        for part in ("transform", "backbone"):
            if not isinstance(getattr(student, part, None), nn.Module):
                raise ConfigError(f"the student must be a torchvision detector with a {part!r} module")
        if not isinstance(getattr(teacher, "backbone", None), nn.Module):
            raise ConfigError("the teacher must be a torchvision detector with a 'backbone' module")
        self.student = student
        self.loss_weight = float(loss_weight)
        self.loss_key = loss_key
        self.teacher_grad_mode = teacher_grad_mode
        self.hcl_levels = tuple(int(v) for v in hcl_levels) if loss == "hcl" else ()
        self.teacher_input_fn = teacher_input_fn
        teacher.eval().requires_grad_(False)
        self._teacher = [teacher]  # a list keeps it out of the module tree, state_dict and DDP

        s_mean, s_std = _stats(student, None, None)
        t_mean, t_std = _stats(teacher, teacher_mean, teacher_std)
        self.identity_input = teacher_input_fn is None and torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)
        self.register_buffer("_s_mean", s_mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_s_std", s_std.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_t_mean", t_mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_t_std", t_std.view(1, -1, 1, 1), persistent=False)

        s_shapes = self._probe(student.backbone, probe_size)
        t_shapes = self._probe(teacher.backbone, probe_size)
        self.levels = self._match(s_shapes, t_shapes, level_map)
        # abfs[0] is the coarsest level's (non-fusing) ABF, abfs[-1] the finest's
        self.abfs = nn.ModuleList(
            ABF(c_in, int(mid_channels), c_out, fuse=i > 0, fusion=fusion)
            for i, (_, _, c_in, c_out) in enumerate(reversed(self.levels))
        )

    # --- construction -------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _probe(backbone: nn.Module, size: Sequence[int]) -> dict[str, tuple[int, int, int]]:
        """C×H×W of every level the backbone returns for a zero batch (modes restored afterwards)."""
        modes = {m: m.training for m in backbone.modules()}
        backbone.eval()
        try:
            out = backbone(torch.zeros(1, 3, int(size[0]), int(size[1]), device=next(backbone.parameters()).device))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not isinstance(out, dict):
            raise ConfigError(f"the detector backbone must return a dict of feature maps, got {type(out).__name__}")
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in out.items()}

    @staticmethod
    def _match(
        s_shapes: dict[str, tuple[int, int, int]],
        t_shapes: dict[str, tuple[int, int, int]],
        level_map: Sequence[Sequence[str]] | None,
    ) -> list[tuple[str, str, int, int]]:
        listing = "student [" + ", ".join(f"{k} {_fmt(v)}" for k, v in s_shapes.items()) + "], teacher [" + \
            ", ".join(f"{k} {_fmt(v)}" for k, v in t_shapes.items()) + "]"
        if level_map is None:
            if len(s_shapes) != len(t_shapes):
                raise ConfigError(f"reviewkd detection: the student has {len(s_shapes)} FPN levels and the teacher "
                                  f"{len(t_shapes)} ({listing}); give level_map=[[student_key, teacher_key], ...] "
                                  "finest first, or use backbones with matching pyramids")
            pairs = list(zip(s_shapes, t_shapes, strict=True))
        else:
            pairs = [(str(p[0]), str(p[1])) for p in level_map]
            for s_key, t_key in pairs:
                if s_key not in s_shapes or t_key not in t_shapes:
                    raise ConfigError(f"reviewkd detection: level_map pair ({s_key!r}, {t_key!r}) names a level "
                                      f"that does not exist ({listing})")
        if not pairs:
            raise ConfigError("reviewkd detection: no levels to distil")
        bad = [f"{s} {_fmt(s_shapes[s][1:])} vs {t} {_fmt(t_shapes[t][1:])}" for s, t in pairs
               if s_shapes[s][1:] != t_shapes[t][1:]]
        if bad:
            raise ConfigError("reviewkd detection: paired levels must have the same height and width: "
                              + "; ".join(bad) + f" ({listing})")
        return [(s, t, s_shapes[s][0], t_shapes[t][0]) for s, t in pairs]

    # --- parameters and modes ------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher detector (only its backbone runs)."""
        return self._teacher[0]

    def train(self, mode: bool = True) -> ReviewKDDetection:
        """Student and ABFs follow ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> ReviewKDDetection:  # type: ignore[override]
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters with ``requires_grad`` and the ABF parameters (never the teacher's)."""
        yield from (p for p in self.student.parameters() if p.requires_grad)
        yield from self.abfs.parameters()

    def extra_parameters(self) -> int:
        """Number of ABF parameters (training only; not part of the exported student)."""
        return sum(p.numel() for p in self.abfs.parameters())

    # --- forward -------------------------------------------------------------------------------------
    def teacher_input(self, tensors: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """The teacher's view of the student's padded batch: un-normalise, optional
        ``teacher_input_fn``, normalise with the teacher's statistics, zero the padding."""
        if self.identity_input:
            return tensors
        x = tensors * self._s_std + self._s_mean
        if self.teacher_input_fn is not None:
            x = self.teacher_input_fn(x)
        x = (x - self._t_mean) / self._t_std
        valid = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
        for i, (h, w) in enumerate(image_sizes):
            valid[i, :, :h, :w] = 1
        return x * valid

    def teacher_features(self, tensors: Tensor, image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """The teacher backbone's FPN maps for the student's batch, frozen and without history."""
        if self.teacher_grad_mode == "inference":
            with torch.inference_mode():
                out = self.teacher.backbone(self.teacher_input(tensors, image_sizes))
            return {k: v.clone() for k, v in out.items()}  # cloned outside inference mode: usable in autograd
        with torch.no_grad():
            return dict(self.teacher.backbone(self.teacher_input(tensors, image_sizes)))

    def review(self, features: Sequence[Tensor]) -> list[Tensor]:
        """ABF outputs finest first for student levels finest first (coarse-to-fine chain)."""
        out, residual = self.abfs[0](features[-1])
        outputs = [out]
        for abf, x in zip(self.abfs[1:], reversed(features[:-1]), strict=True):
            out, residual = abf(x, residual)
            outputs.insert(0, out)
        return outputs

    def review_loss(self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor]) -> Tensor:
        """λ · Σ_levels HCL(ABF output, teacher level); paired sizes are checked, never resized."""
        s_feats, t_feats = [], []
        for s_key, t_key, _, _ in self.levels:
            s, t = student_maps[s_key], teacher_maps[t_key]
            if s.shape[-2:] != t.shape[-2:]:
                raise RuntimeError(f"reviewkd detection: student level {s_key} is {_fmt(s.shape[-2:])} but teacher "
                                   f"level {t_key} is {_fmt(t.shape[-2:])} for the same batch; both detectors must "
                                   "pad to the same size_divisible and use the same pyramid")
            if self.training and s.shape[0] * s.shape[-2] * s.shape[-1] == 1:
                raise ValueError(f"reviewkd detection: level {s_key} is 1x1 with a batch of 1; the ABF BatchNorm needs "
                                 "more than one value per channel in training: use a per-device batch >= 2 or larger "
                                 "images")
            s_feats.append(s)
            t_feats.append(t)
        outputs = self.review(s_feats)
        return self.loss_weight * hcl_loss(outputs, t_feats, self.hcl_levels)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Train mode: the student's loss dict + ``loss_key``. Eval mode: the student's predictions."""
        if not self.training:
            return self.student(images, targets)
        captured: dict[str, Any] = {}
        hooks = [
            self.student.transform.register_forward_hook(lambda m, i, o: captured.__setitem__("batch", o[0])),
            self.student.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("maps", o)),
        ]
        try:
            losses = self.student(images, targets)
        finally:
            for hook in hooks:
                hook.remove()
        batch = captured["batch"]
        teacher_maps = self.teacher_features(batch.tensors, batch.image_sizes)
        losses = dict(losses)
        losses[self.loss_key] = self.review_loss(captured["maps"], teacher_maps)
        return losses
