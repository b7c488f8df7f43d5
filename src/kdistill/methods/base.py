"""The method interface (mdistiller style: one small class per method, one file each).

A ``Method`` owns only what it trains (adapters, ABFs, discriminators). The ``Distiller`` runs
the student with taps, the chosen teachers in eval and inference mode with taps, and calls the
method, which returns a dict of *weighted* named losses; the engine sums and logs the dict.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdistill.features import probe_shapes, stage_taps
from kdistill.utils import ConfigError, unknown_name_error


@dataclass
class Batch:
    """One training batch: images normalised for the student, targets, dataset indices, and the crops
    ``(top, left, height, width, flip)`` the images were cut with when the data loader cut them per sample."""

    images: Tensor
    targets: Tensor
    index: Tensor | None = None
    crops: Tensor | None = None


@dataclass
class ModelOutput:
    """Logits and the tapped features (keyed as in the method's ``*_features``) of one model."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Where training is: 0-indexed ``epoch`` and global ``step``, and the epoch budget."""

    epoch: int = 0
    step: int = 0
    max_epochs: int = 1


class Method(nn.Module):
    """Base class of all distillation methods.

    Subclasses set, in ``__init__``, which features they need by stage-preset key
    (``"stem"``, ``"stage1"``..., ``"pooled"``) or by custom key given through ``*_taps``:

    * ``self.student_features`` / ``self.teacher_features``: keys to record;
    * ``self.student_preact`` / ``self.teacher_preact``: pre-ReLU variants of the presets.

    and implement ``forward(batch, student, teachers, info) -> dict[str, Tensor]``.

    **Own optimizer protocol** (for modules that must not follow the student's optimizer, such as
    MEAL's discriminators; every method that does not override it trains everything with the student):

    * ``own_parameters()``: parameters excluded from the main optimizer (``Distiller.trainable_parameters``
      leaves them out); default none.
    * ``configure_own_optimizer()``: the optimizer over exactly those parameters (built once per run by
      whoever drives training); default ``None``.
    * ``own_lr(main_lr, main_base_lr)``: the learning rate for every group of the own optimizer given
      the main optimizer's current and initial lr; called before each step; ``None`` leaves it alone.
      The student's schedule never writes the own optimizer's lr; only this hook does.
    * ``own_step_losses(batch, student, teachers, info)``: with ``student`` detached; a dict of losses
      means "separate step": the driver minimises their sum with the own optimizer *before* the method's
      ``forward`` (so the main losses see the updated modules). ``None`` (default) means "joint step":
      the own optimizer steps on the gradients the main loss's backward left on its parameters, right
      when the main optimizer steps. Either way the driver zeroes the own gradients after its step.

    ``kdistill.methods.adversarial.OwnOptimizerStep`` implements the driver side and ``train_step``
    is the framework-free reference loop; ``Distiller.forward_train(..., own_step=...)`` runs the
    separate step between the student forward and the method.
    """

    name: ClassVar[str] = ""
    uses_teacher_logits: ClassVar[bool] = True

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        input_size: tuple[int, int, int] = (3, 32, 32),
        student_taps: dict[str, str] | None = None,
        teacher_taps: dict[str, str] | Sequence[dict[str, str] | None] | None = None,
    ):
        super().__init__()
        self.input_size = tuple(input_size)
        self.num_teachers = len(teachers)
        self.student_features: list[str] = []
        self.teacher_features: list[str] = []
        self.student_preact = False
        self.teacher_preact = False
        self._student_taps_override = dict(student_taps or {})
        # one tap override per teacher: a dict applies to every teacher, a list gives each its own
        # (a pool of different architectures names its features differently)
        if isinstance(teacher_taps, Sequence) and not isinstance(teacher_taps, str | dict):
            if len(teacher_taps) != len(teachers):
                raise ConfigError(f"teacher_taps lists {len(teacher_taps)} entries for {len(teachers)} teachers")
            per_teacher = [dict(t or {}) for t in teacher_taps]
        else:
            per_teacher = [dict(teacher_taps or {}) for _ in teachers]
        self._teacher_overrides = per_teacher
        self._teacher_index = {id(t): i for i, t in enumerate(teachers)}

    def require_one_teacher(self, teachers: Sequence[nn.Module]) -> None:
        """Methods that compare one student with one teacher reject pools (ConfigError)."""
        if len(teachers) != 1:
            raise ConfigError(f"{self.name} needs exactly one teacher, got {len(teachers)}")

    def pair_all_stages(self, student: nn.Module, teacher: nn.Module) -> None:
        """Record every stage of both networks, paired shallow to deep (AT, NST); ConfigError if the counts differ."""
        self.student_features = self.available_stages(student, teacher=False)
        self.teacher_features = self.available_stages(teacher, teacher=True)
        if not self.student_features or len(self.student_features) != len(self.teacher_features):
            raise ConfigError(
                f"{self.name} pairs stages one to one, but the student has {self.student_features} and the teacher "
                f"{self.teacher_features}; give matching student_taps/teacher_taps"
            )

    # --- features ---------------------------------------------------------------------------
    def _taps_for(self, model: nn.Module, keys: Sequence[str], preact: bool, override: dict[str, str]) -> dict[str, str]:
        if not keys:
            return {}
        preset: dict[str, str] = {}
        if any(k not in override for k in keys):
            try:
                preset = dict(stage_taps(model, preact))
            except ConfigError:
                if not override:
                    raise
        merged = {**preset, **override}
        missing = [k for k in keys if k not in merged]
        if missing:
            raise ConfigError(f"{self.name}: features {missing} not available; known: {sorted(merged)}")
        return {k: merged[k] for k in keys}

    def student_taps(self, student: nn.Module) -> dict[str, str]:
        """Tap specs the student is recorded with."""
        return self._taps_for(student, self.student_features, self.student_preact, self._student_taps_override)

    def teacher_taps(self, teacher: nn.Module) -> dict[str, str]:
        """Tap specs each teacher is recorded with."""
        return self._taps_for(teacher, self.teacher_features, self.teacher_preact, self._teacher_override(teacher))

    def _teacher_override(self, teacher: nn.Module) -> dict[str, str]:
        """The ``teacher_taps`` override of this teacher (by identity; the first one's for other modules)."""
        if not self._teacher_overrides:
            return {}
        return self._teacher_overrides[self._teacher_index.get(id(teacher), 0)]

    def available_stages(self, model: nn.Module, teacher: bool, preact: bool = False) -> list[str]:
        """The ``stageK`` keys ``model`` offers (its preset merged with the ``*_taps`` override), shallow to deep."""
        override = self._teacher_override(model) if teacher else self._student_taps_override
        try:
            preset = dict(stage_taps(model, preact))
        except ConfigError:
            if not override:
                raise
            preset = {}
        keys = [k for k in {**preset, **override} if k.startswith("stage")]
        return sorted(keys, key=lambda k: (0, int(k[5:])) if k[5:].isdigit() else (1, k))

    def probe(self, model: nn.Module, keys: Sequence[str], preact: bool, teacher: bool) -> dict[str, torch.Size]:
        """Shapes of ``keys`` on ``model`` from a dry run (to size adapters and fusion modules)."""
        override = self._teacher_override(model) if teacher else self._student_taps_override
        return probe_shapes(model, self._taps_for(model, keys, preact, override), self.input_size)

    # --- training ---------------------------------------------------------------------------
    def select_teachers(self, info: StepInfo) -> list[int]:
        """Indices of the teachers to run this step (all by default; MEAL v1 picks one)."""
        return list(range(self.num_teachers))

    # --- own optimizer protocol (see the class docstring) -------------------------------------
    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by ``configure_own_optimizer`` instead of the main optimizer."""
        return []

    def configure_own_optimizer(self) -> torch.optim.Optimizer | None:
        """A new optimizer over ``own_parameters()``, or ``None`` when there are none."""
        return None

    def own_lr(self, main_lr: float, main_base_lr: float) -> float | None:
        """The own optimizer's learning rate now, given the main optimizer's current and initial lr."""
        return None

    def own_step_losses(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor] | None:
        """Losses of a separate own step before the student step (``student`` detached), or ``None``."""
        return None

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        raise NotImplementedError


MethodFactory = Callable[..., Method]
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` buildable by ``build_method(cls.name, ...)``."""
    if not cls.name or cls.name in _METHODS:
        raise RuntimeError(f"method name {cls.name!r} missing or registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; a ConfigError lists the allowed names."""
    if name not in _METHODS:
        raise unknown_name_error("method", name, _METHODS)
    return _METHODS[name]


def method_options(name: str) -> dict[str, Any]:
    """The keyword options of a method and their defaults (used to validate recipes)."""
    sig = inspect.signature(method_class(name).__init__)
    skip = {"self", "student", "teachers", "input_size", "student_taps", "teacher_taps"}
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.name not in skip and p.kind is p.KEYWORD_ONLY
    }


def build_method(
    name: str, student: nn.Module, teachers: Sequence[nn.Module] = (), **options: Any
) -> Method:
    """Build a method by name, e.g. ``build_method("kd", student=s, teachers=[t], temperature=4)``."""
    cls = method_class(name)
    allowed = method_options(name)
    common = {"input_size", "student_taps", "teacher_taps"}
    for key in options:
        if key not in allowed and key not in common:
            raise unknown_name_error(f"option of method {name!r}", key, [*allowed, *common])
    return cls(student, list(teachers), **options)


def check_weight(name: str, value: float) -> float:
    """Loss weights and temperatures must be finite and non-negative."""
    if not (value >= 0 and value != float("inf")):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)
