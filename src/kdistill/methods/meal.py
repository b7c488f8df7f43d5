"""MEAL v1 (Shen et al., AAAI 2019, arXiv 1812.02425) and MEAL V2 (Shen & Savvides, arXiv 2009.08453).

A pool of frozen teachers, a per-batch teacher selection, block-wise similarity losses between
aligned student and teacher vectors, and one discriminator per block (docs/methods/meal.md):

    L = Σ_j γ_j ℓ(v_S,j, target_j) + β Σ_j η_j L_D,j  (+ w_ce · CE(z_S, y), off by default)

* **Teachers** may be any number of different models. Each teacher's own input normalisation is the
  ``Distiller``'s job (``teacher_inputs``, ``Renormalize``; recipes give ``mean``/``std`` per teacher);
  a teacher needing another resolution needs a resizing ``teacher_inputs`` module.
* **Selection** (``teacher_selection``): ``random`` (MEAL v1: one teacher per batch, uniformly, and
  only that teacher runs), ``weighted`` (one teacher per batch drawn with ``teacher_weights``),
  ``average`` (MEAL V2: all teachers; target = (weighted) mean of probabilities, the discriminator
  sees the mean logits), ``mean_logits`` (all teachers; target = softmax of the mean logits).
  Draws use a seeded generator whose state is part of the ``state_dict``.
* **Blocks** (``blocks``): ``"logits"`` or feature keys (stage-preset keys such as ``"stage2"``, or
  keys given through ``student_taps``/``teacher_taps``). ``align="meal_v1"`` turns a feature map into
  the channel-reduced, length-``dims[j]`` resampled vector of MEAL v1's code (no parameters, any widths);
  ``align="gap_linear"`` global-average-pools and maps the student width to the teacher width with a
  linear layer sized by probing (identity when equal; trained with the student).
* **Discriminators**, one per block, are registered modules (checkpointed) and are the
  method's *own parameters*: they are trained by their own SGD (``d_lr``, ``d_momentum``,
  ``d_weight_decay``) through the own-optimizer protocol of ``Method``; ``d_lr_schedule`` says how
  their lr moves: ``scaled`` (``d_lr`` times the student's schedule factor, MEAL v1 code),
  ``constant``, or ``student`` (equal to the student's lr, MEAL V2's code overwrote it).
* **Adversarial modes**: ``cooperative`` (code default; student and discriminators both
  minimise L_D in one step), ``grl`` (gradient reversal on the student rows: the student maximises
  L_D), ``alternating`` (a discriminator step on detached inputs, then a student step on the
  non-saturating fooling loss with the discriminators frozen), ``off``.
* Hard labels are unused by default (``hard_label_weight=0``). MEAL V2 starts the student from
  pretrained weights: give them as the recipe's ``student.checkpoint``.

Not implemented: the paper's ``minimax`` mode, per-sample random selection, train-mode teacher
BatchNorm (the ``Distiller`` always keeps teachers in eval mode) and cached region labels (FKD).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kdistill.features import TappedModel
from kdistill.losses.meal import (
    SIMILARITIES,
    SOFT_SIMILARITIES,
    discriminator_loss,
    fooling_loss,
    meal_align,
    similarity_loss,
)
from kdistill.methods.adversarial import grad_reverse
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    RunFacts,
    StepInfo,
    check_choice,
    check_weight,
    register_method,
)
from kdistill.methods.discriminator import Discriminator
from kdistill.utils import ConfigError

SELECTIONS = ("random", "weighted", "average", "mean_logits")
SELECTION_ALIASES = {"mean_probs": "average", "weighted_random": "weighted"}  # other names for the same modes
MODES = ("cooperative", "grl", "alternating", "off")
ALIGNS = ("meal_v1", "gap_linear")
DISC_INPUTS = ("mean_logits", "mean_probs")
D_LR_SCHEDULES = ("scaled", "constant", "student")
DISC_WARN_PARAMS = 10_000_000


@dataclass
class BlockVectors:
    """One block's tensors for a step: the student vector, the similarity target, the D inputs."""

    student: Tensor
    target: Tensor
    disc_student: Tensor
    disc_teacher: Tensor


def _per_block(name: str, values: Sequence[Any] | None, blocks: Sequence[str], default: Any) -> list[Any]:
    if values is None:
        return [default] * len(blocks)
    values = list(values)
    if len(values) != len(blocks):
        raise ConfigError(f"{name} has {len(values)} entries but blocks {list(blocks)} has {len(blocks)}; give one per block")
    return values


@torch.no_grad()
def _logit_width(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Number of outputs of ``model`` from a dry run in eval mode (training mode restored)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return int(model(torch.zeros(2, *input_size, device=device)).shape[-1])
    finally:
        model.train(was_training)


def _gap(feature: Tensor) -> Tensor:
    return feature.float().flatten(2).mean(dim=2) if feature.dim() > 2 else feature.float()


@dataclass
class MEALOptions(MethodOptions):
    """MEAL v1's options and defaults (the CIFAR-10 code's); see the module docstring."""

    teacher_selection: str = "random"
    teacher_weights: list[float] | None = None
    seed: int = 0
    blocks: tuple[str, ...] = ("logits",)
    dims: list[int | None] | None = None
    sim_weights: list[float] | None = None
    adv_weights: list[float] | None = None
    align: str = "meal_v1"
    pool: str = "avg"
    similarity: str = "soft_ce"
    temperature: float = 1.0
    hard_label_weight: float = 0.0
    adversarial_mode: str = "cooperative"
    adv_weight: float = 1.0
    grl_lambda: float = 1.0
    disc_teacher_input: str = "mean_logits"
    disc_reduction: int = 2
    disc_depth: int = 2
    disc_outputs: int = 2
    final_relu: bool = False
    d_lr: float = 1e-3
    d_momentum: float = 0.9
    d_weight_decay: float = 5e-4
    d_lr_schedule: str = "scaled"

    def check(self) -> None:
        check_choice("teacher_selection", self.teacher_selection, [*SELECTIONS, *SELECTION_ALIASES])
        check_choice("adversarial_mode", self.adversarial_mode, MODES)
        check_choice("align", self.align, ALIGNS)
        check_choice("pool", self.pool, ("avg", "max"))
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("disc_teacher_input", self.disc_teacher_input, DISC_INPUTS)
        check_choice("d_lr_schedule", self.d_lr_schedule, D_LR_SCHEDULES)
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("hard_label_weight", "adv_weight", "grl_lambda", "d_lr", "d_momentum", "d_weight_decay"):
            check_weight(name, getattr(self, name))
        for name in ("disc_depth", "disc_outputs", "disc_reduction"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


@register_method
class MEAL(Method):
    """MEAL v1 (Shen et al., AAAI 2019): random teacher, K=2 discriminators."""

    name = "meal_v1"
    Options = MEALOptions
    options: MEALOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        o = self.options
        if not teachers:
            raise ConfigError(f"{self.name} needs at least one teacher")
        self.selection = SELECTION_ALIASES.get(o.teacher_selection, o.teacher_selection)
        self.mode = o.adversarial_mode
        self.align = o.align
        self.pool = o.pool
        self.similarity = o.similarity
        self.disc_teacher_input = o.disc_teacher_input
        self.d_lr_schedule = o.d_lr_schedule
        self.temperature = float(o.temperature)
        self.hard_label_weight = float(o.hard_label_weight)
        self.adv_weight = float(o.adv_weight)
        self.grl_lambda = float(o.grl_lambda)
        self.d_lr = float(o.d_lr)
        self.d_momentum = float(o.d_momentum)
        self.d_weight_decay = float(o.d_weight_decay)
        self.register_buffer("_weights", self._teacher_weights(o.teacher_weights), persistent=False)

        self.blocks = [str(b) for b in o.blocks]
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ConfigError(f"blocks must be a non-empty list of distinct names, got {self.blocks}")
        self.sim_weights = [check_weight(f"sim_weights[{j}]", w) for j, w in enumerate(_per_block("sim_weights", o.sim_weights, self.blocks, 1.0))]
        self.adv_weights = [check_weight(f"adv_weights[{j}]", w) for j, w in enumerate(_per_block("adv_weights", o.adv_weights, self.blocks, 1.0))]
        features = [b for b in self.blocks if b != "logits"]
        self.student_features = list(features)
        self.teacher_features = list(features)
        self.student_taps()  # unknown feature keys fail here, listing the known ones
        for i in range(self.num_teachers):
            self.teacher_taps(i)
        self.dims, align_layers = self._size_blocks(student, teachers, _per_block("dims", o.dims, self.blocks, None))
        self.align_layers = nn.ModuleList(align_layers)

        self.discriminators = nn.ModuleList()
        if self.mode != "off":
            self.discriminators.extend(
                Discriminator(d, o.disc_reduction, o.disc_depth, o.disc_outputs, o.final_relu) for d in self.dims
            )
            total = sum(p.numel() for p in self.discriminators.parameters())
            if total > DISC_WARN_PARAMS:
                warnings.warn(f"{self.name}: the discriminators have {total:,} parameters (dims {self.dims})", stacklevel=2)

        self._generator = torch.Generator().manual_seed(int(o.seed))
        self._selected = list(range(self.num_teachers)) if self.selection in ("average", "mean_logits") else [0]
        self.register_buffer("selection_counts", torch.zeros(self.num_teachers, dtype=torch.long))

    # --- construction helpers ---------------------------------------------------------------
    def _teacher_weights(self, weights: list[float] | None) -> Tensor:
        if weights is None:
            if self.selection == "weighted":
                raise ConfigError("teacher_selection='weighted' needs teacher_weights (one per teacher)")
            return torch.full((self.num_teachers,), 1.0 / self.num_teachers)
        if self.selection == "random":
            raise ConfigError("teacher_weights is not used by teacher_selection='random'; use 'weighted'")
        w = torch.tensor([float(v) for v in weights])
        if len(w) != self.num_teachers or (w < 0).any() or not w.sum() > 0 or not torch.isfinite(w).all():
            raise ConfigError(
                f"teacher_weights must be {self.num_teachers} finite numbers >= 0 with a positive sum, got {weights}"
            )
        return w / w.sum()

    def _size_blocks(
        self, student: TappedModel, teachers: Sequence[TappedModel], dims: list[int | None]
    ) -> tuple[list[int], list[nn.Module]]:
        """Each block's vector length (validated here; MEAL v1 fails late on a mismatch) and its student
        alignment layer."""
        sizes: list[int] = []
        layers: list[nn.Module] = []
        if "logits" in self.blocks:
            classes = _logit_width(student.model, self.input_size)
            for i, teacher in enumerate(teachers):
                t_classes = _logit_width(teacher.model, self.input_size)
                if t_classes != classes:
                    raise ConfigError(f"teacher {i} outputs {t_classes} classes but the student outputs {classes}")
        if self.align == "gap_linear":
            keys = [b for b in self.blocks if b != "logits"]
            s_shapes = self.probe(student, keys, self.student_preact)
            t_shapes = [self.probe(t, keys, self.teacher_preact) for t in teachers]
        for block, dim in zip(self.blocks, dims, strict=True):
            if block == "logits":
                if dim is not None and dim != classes:
                    raise ConfigError(f"dims entry for block 'logits' must be the number of classes {classes}, got {dim}")
                sizes.append(classes)
                layers.append(nn.Identity())
            elif self.align == "meal_v1":
                if not (isinstance(dim, int) and dim >= 1):
                    raise ConfigError(f"align='meal_v1' needs a length >= 1 in dims for block {block!r}, got {dim}")
                sizes.append(dim)
                layers.append(nn.Identity())
            else:
                widths = {int(shapes[block][0]) for shapes in t_shapes}
                if len(widths) != 1:
                    raise ConfigError(
                        f"align='gap_linear': teachers have different widths {sorted(widths)} at block {block!r}; "
                        "use align='meal_v1'"
                    )
                (width,) = widths
                if dim is not None and dim != width:
                    raise ConfigError(f"align='gap_linear': dims entry for block {block!r} must be the teacher width {width} or null")
                s_width = int(s_shapes[block][0])
                sizes.append(width)
                layers.append(nn.Identity() if s_width == width else nn.Linear(s_width, width))
        return sizes, layers

    # --- teacher selection ------------------------------------------------------------------
    def select_teachers(self, info: StepInfo) -> list[int]:
        """``random``/``weighted``: one seeded draw per batch (MEAL v1); else all teachers."""
        if self.selection == "random":
            self._selected = [int(torch.randint(self.num_teachers, (1,), generator=self._generator))]
        elif self.selection == "weighted":
            self._selected = [int(torch.multinomial(self._weights.cpu(), 1, generator=self._generator))]
        else:
            self._selected = list(range(self.num_teachers))
        for i in self._selected:
            self.selection_counts[i] += 1
        return list(self._selected)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "selected": torch.tensor(self._selected)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())
        self._selected = [int(i) for i in state["selected"]]

    def _chosen(self, teachers: Sequence[ModelOutput]) -> tuple[list[ModelOutput], Tensor]:
        """The teacher outputs this step uses and their weights (summing to 1)."""
        if self.selection in ("random", "weighted"):
            if len(teachers) == self.num_teachers and self.num_teachers > 1:
                teachers = [teachers[i] for i in self._selected]  # all teachers given (e.g. from a cache)
            if len(teachers) != 1:
                raise ValueError(f"{self.name}: expected the output of the 1 selected teacher, got {len(teachers)}")
            return list(teachers), torch.ones(1)
        if len(teachers) != self.num_teachers:
            raise ValueError(f"{self.name}: expected outputs of all {self.num_teachers} teachers, got {len(teachers)}")
        return list(teachers), self._weights

    # --- block vectors ----------------------------------------------------------------------
    def _vector(self, j: int, out: ModelOutput, student: bool) -> Tensor:
        block = self.blocks[j]
        if block == "logits":
            return out.logits.float()
        feature = out.features[block]
        if self.align == "meal_v1":
            return meal_align(feature, self.dims[j], self.pool)
        pooled = _gap(feature)
        return self.align_layers[j](pooled) if student else pooled

    def block_vectors(self, student: ModelOutput, teachers: Sequence[ModelOutput]) -> list[BlockVectors]:
        """Per block: student vector, similarity target, and the discriminator's student/teacher inputs."""
        chosen, weights = self._chosen(teachers)
        soft = self.similarity in SOFT_SIMILARITIES
        T = self.temperature
        result = []
        for j in range(len(self.blocks)):
            s = self._vector(j, student, student=True)
            vecs = torch.stack([self._vector(j, t, student=False) for t in chosen])  # M×B×d
            w = weights.to(vecs).view(-1, 1, 1)
            mean_vec = (w * vecs).sum(0)
            mean_probs = (w * F.softmax(vecs / T, dim=2)).sum(0)
            if not soft:
                target = mean_vec
            elif self.selection == "mean_logits":
                target = F.softmax(mean_vec / T, dim=1)
            else:
                target = mean_probs
            if self.disc_teacher_input == "mean_logits":
                result.append(BlockVectors(s, target, s, mean_vec))
            else:
                result.append(BlockVectors(s, target, F.softmax(s / T, dim=1), mean_probs))
        return result

    # --- losses -----------------------------------------------------------------------------
    def _frozen_disc(self, j: int, x: Tensor) -> Tensor:
        disc = self.discriminators[j]
        params = {name: p.detach() for name, p in disc.named_parameters()}
        return functional_call(disc, params, (x,))

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for j, (block, vec) in enumerate(zip(self.blocks, self.block_vectors(student, teachers), strict=True)):
            if self.sim_weights[j] > 0:
                losses[f"sim_{block}"] = self.sim_weights[j] * similarity_loss(
                    vec.student, vec.target, self.similarity, self.temperature
                )
            eta = self.adv_weight * self.adv_weights[j]
            if self.mode == "off" or eta == 0:
                continue
            if self.mode == "alternating":
                # the discriminator is frozen here; it learns in own_step_losses
                losses[f"adv_{block}"] = eta * fooling_loss(self._frozen_disc(j, vec.disc_student))
                continue
            rows_s = grad_reverse(vec.disc_student, self.grl_lambda) if self.mode == "grl" else vec.disc_student
            out = self.discriminators[j](torch.cat([rows_s, vec.disc_teacher]))
            n = len(rows_s)
            losses[f"adv_{block}"] = eta * discriminator_loss(out[:n], out[n:])
        if self.hard_label_weight > 0:
            losses["ce"] = self.hard_label_weight * F.cross_entropy(student.logits, batch.targets)
        return losses

    # --- own optimizer protocol (Method docstring) -------------------------------------------
    def own_parameters(self) -> list[nn.Parameter]:
        """Exactly the discriminators' parameters."""
        return list(self.discriminators.parameters())

    def configure_own_optimizer(self) -> torch.optim.Optimizer | None:
        """SGD over the discriminators with ``d_lr``, ``d_momentum``, ``d_weight_decay``."""
        params = self.own_parameters()
        if not params:
            return None
        return torch.optim.SGD(params, lr=self.d_lr, momentum=self.d_momentum, weight_decay=self.d_weight_decay)

    def own_lr(self, main_lr: float, main_base_lr: float) -> float | None:
        """``scaled``: ``d_lr · main_lr / main_base_lr``; ``constant``: ``d_lr``; ``student``: ``main_lr``."""
        if self.d_lr_schedule == "student":
            return main_lr
        if self.d_lr_schedule == "constant" or main_base_lr <= 0:
            return self.d_lr
        return self.d_lr * main_lr / main_base_lr

    def own_step_losses(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor] | None:
        """``alternating`` only: ``η_j L_D,j`` on detached student and teacher rows."""
        if self.mode != "alternating":
            return None
        with torch.no_grad():
            vectors = self.block_vectors(student, teachers)
        losses = {}
        for j, (block, vec) in enumerate(zip(self.blocks, vectors, strict=True)):
            if self.adv_weights[j] > 0:
                out = self.discriminators[j](torch.cat([vec.disc_student, vec.disc_teacher]))
                n = len(vec.disc_student)
                losses[f"disc_{block}"] = self.adv_weights[j] * discriminator_loss(out[:n], out[n:])
        return losses or None


@dataclass
class MEALV2Options(MEALOptions):
    """MEAL V2's defaults (its ImageNet code): all teachers averaged, the
    discriminator (K=8) on student vs mean teacher logits, discriminator lr 1e-4 without weight decay."""

    teacher_selection: str = "average"
    disc_teacher_input: str = "mean_logits"
    disc_reduction: int = 8
    d_lr: float = 1e-4
    d_weight_decay: float = 0.0

    def fit_to_run(self, given: set[str], facts: RunFacts) -> list[str]:
        """K=8 is for ImageNet's 1000 logits (1000 → 125 → 15); with few classes the widths would reach 0,
        so an unset ``disc_reduction`` becomes the largest K whose narrowest hidden layer keeps 2 units."""
        notes = super().fit_to_run(given, facts)
        n = facts.num_classes
        if "disc_reduction" in given or n is None or "logits" not in self.blocks:
            return notes
        default = self.disc_reduction
        if n // default ** self.disc_depth >= 1:  # the narrowest hidden width is n // K**depth
            return notes
        fits = [k for k in range(default, 0, -1) if n // k ** self.disc_depth >= 2] or [1]
        self.disc_reduction = fits[0]
        notes.append(f"disc_reduction={fits[0]} (default {default} is for 1000 classes; the logit discriminator's "
                     f"widths would reach 0 with {n}; set it to override)")
        self.check()
        return notes


@register_method
class MEALV2(MEAL):
    """MEAL V2 (Shen & Savvides, 2020): all teachers averaged, logits only,
    soft CE on the mean probabilities, the discriminator (K=8) on student vs mean teacher logits,
    cooperative, discriminator weight decay 0. Same options as ``meal_v1``, other defaults.
    """

    name = "meal_v2"
    Options = MEALV2Options
    options: MEALV2Options
