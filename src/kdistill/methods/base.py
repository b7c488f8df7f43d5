"""The method interface (mdistiller style: one small class per method, one file each).

A method is three things, all declared in its own file:

* ``Options``: a dataclass of its typed options with their defaults (``MethodOptions``); the
  configuration coerces ``method.options`` into it before anything is built, and ``check()``
  rejects out-of-range values. A variant with other defaults is a subclass with other defaults.
* ``build(student, teachers)``: runs once; declares the features the method needs
  (``student_features`` / ``teacher_features`` keys, ``*_preact``), sizes its own modules (adapters,
  ABFs, discriminators) by probing the networks, and reads what the run knows from ``self.facts``
  (``RunFacts``: input size, number of training samples, classes, epochs).
* ``forward(batch, student, teachers, info) -> dict[str, Tensor]``: the *weighted* named losses of
  one step, from the student's and each teacher's ``ModelOutput`` (logits and the declared features).

A method owns only what it trains. It never runs a network, resolves a tap or steps an optimizer:
the training step (``kdistill.step``) records each network's features, picks the teacher outputs
from a source (live pass or cache) and drives the optimizers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdistill.features import TappedModel
from kdistill.optim import ParamGroup
from kdistill.typed import build_dataclass
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


@dataclass(frozen=True)
class RunFacts:
    """What the run knows before training that a method may need to size itself.

    ``input_size`` C×H×W of one image; ``num_samples`` training-set size (CRD's memory bank has one
    row per sample); ``num_classes``; ``max_epochs``; ``train_targets`` the class of every training
    sample, by dataset index (contrastive methods draw negatives of other classes). ``None`` means
    unknown (e.g. your own loop).
    """

    input_size: tuple[int, int, int] = (3, 32, 32)
    num_samples: int | None = None
    num_classes: int | None = None
    max_epochs: int | None = None
    train_targets: Tensor | None = field(default=None, repr=False, compare=False)


def check_weight(name: str, value: float) -> float:
    """Loss weights and temperatures must be finite and non-negative."""
    if not (value >= 0 and value != float("inf")):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    """Temperatures and similar: strictly positive."""
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return float(value)


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """One of ``allowed``; a ConfigError lists them with close matches."""
    if value not in allowed:
        raise unknown_name_error(name, value, allowed)
    return value


def check_bank_options(method: str, options: Any) -> None:
    """The options every memory-bank method shares (CRD, HKD, MCL-OKD): ``num_samples`` (``None``: the
    training set's size), ``num_negatives``, the contrast ``temperature``, the bank ``momentum``,
    ``feat_dim`` of the embeddings, the negative ``sampling`` mode and the logit ``kd_temperature``."""
    from kdistill.losses.memory import SAMPLING_MODES

    if options.num_samples is not None and int(options.num_samples) < 2:
        raise ConfigError(f"{method}: num_samples must be >= 2, got {options.num_samples}")
    if int(options.num_negatives) < 1:
        raise ConfigError(f"{method}: num_negatives must be >= 1, got {options.num_negatives}")
    check_positive("temperature", options.temperature)
    if not 0 <= options.momentum < 1:
        raise ConfigError(f"{method}: momentum must be in [0, 1), got {options.momentum}")
    if int(options.feat_dim) < 1:
        raise ConfigError(f"{method}: feat_dim must be >= 1, got {options.feat_dim}")
    check_choice("sampling", options.sampling, SAMPLING_MODES)
    check_positive("kd_temperature", options.kd_temperature)


@dataclass
class MethodOptions:
    """Base of every method's options: a dataclass whose fields are the options and their defaults.

    ``check()`` runs on construction and rejects out-of-range values of single options (checks that
    need the networks belong in ``Method.build``).
    """

    def __post_init__(self) -> None:
        self.check()

    # options counted in epochs whose default was chosen for a schedule of that many epochs; when the user
    # does not set them, ``fit_to_run`` scales them to the run's length
    EPOCH_DEFAULTS: ClassVar[dict[str, int]] = {}

    def check(self) -> None:
        """Raise ConfigError for an out-of-range option (override in a method's options)."""

    def fit_to_run(self, given: set[str], facts: RunFacts) -> list[str]:
        """Adapt the defaults the user did not set (not in ``given``) to the run: every epoch-counted option
        is scaled to ``facts.max_epochs`` (rounded, e.g. a 20-epoch warm-up of a 240-epoch schedule is 2
        epochs of a 24-epoch run). Returns one note per changed option, saying what changed and why."""
        notes = []
        max_epochs = facts.max_epochs
        for key, schedule in self.EPOCH_DEFAULTS.items():
            default = getattr(self, key)
            if key in given or max_epochs is None or max_epochs == schedule:
                continue
            scaled = int(round(default * max_epochs / schedule))
            if scaled != default:
                setattr(self, key, scaled)
                notes.append(f"{key}={scaled} (default {default} is for {schedule} epochs; scaled to this run's "
                             f"{max_epochs}; set it to override)")
        self.check()
        return notes

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (for config.json and the printed start of a run)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, method: str, where: str = "") -> MethodOptions:
        """Coerce ``values`` (YAML or keyword values) into these options; ``where`` is the config path
        (``method.options``) used in error messages. Unknown keys list the allowed ones."""

        def unknown(key: str, allowed: Sequence[str]) -> ConfigError:
            at = f" ({where}.{key})" if where else ""
            return unknown_name_error(f"option of method {method!r}{at}", key, allowed)

        try:
            return build_dataclass(cls, dict(values or {}), where, unknown=unknown)
        except ConfigError as exc:  # a range check of check(): say where the option lives
            if not where or where in str(exc):
                raise
            raise ConfigError(f"{where} of method {method!r}: {exc}") from exc

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option with its default."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(cls)}


class Method(nn.Module):
    """Base class of all distillation methods (see the module docstring).

    **Own optimizer protocol** (for modules that must not follow the student's optimizer, such as
    MEAL's discriminators; every method that does not override it trains everything with the student):

    * ``own_parameters()``: parameters excluded from the main optimizer; default none.
    * ``configure_own_optimizer()``: the optimizer over exactly those parameters; default ``None``.
    * ``own_lr(main_lr, main_base_lr)``: the learning rate for every group of the own optimizer given
      the main optimizer's current and initial lr; called before each step; ``None`` leaves it alone.
    * ``own_step_losses(batch, student, teachers, info)``: with ``student`` detached; a dict of losses
      means "separate step": the step minimises their sum with the own optimizer *before* the method's
      ``forward`` (so the main losses see the updated modules). ``None`` (default) means "joint step":
      the own optimizer steps on the gradients the main loss's backward left on its parameters.

    ``kdistill.step.OwnOptimizerStep`` drives this protocol and ``kdistill.step.train_step`` is the
    framework-free reference training step.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_teacher: ClassVar[bool] = True  # False: trains from the labels alone or online (``kdistill train``)

    def __init__(
        self,
        student: TappedModel | nn.Module,
        teachers: Sequence[TappedModel | nn.Module] = (),
        options: MethodOptions | None = None,
        facts: RunFacts | None = None,
    ):
        super().__init__()
        options = self.Options() if options is None else options
        if type(options) is not self.Options:
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.facts = facts or RunFacts()
        self.student_net = student if isinstance(student, TappedModel) else TappedModel(student)
        self.teacher_nets = [t if isinstance(t, TappedModel) else TappedModel(t) for t in teachers]
        self.num_teachers = len(self.teacher_nets)
        self.student_features: list[str] = []
        self.teacher_features: list[str] = []
        self.student_preact = False
        self.teacher_preact = False
        self.build(self.student_net, self.teacher_nets)

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        """Declare features and create the method's modules (``self.options`` and ``self.facts`` are set)."""

    # --- helpers for build() ------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int]:
        """C×H×W of one input image (``self.facts.input_size``)."""
        return tuple(self.facts.input_size)  # type: ignore[return-value]

    def require_one_teacher(self) -> None:
        """Methods that compare one student with one teacher reject pools (ConfigError)."""
        if self.num_teachers != 1:
            raise ConfigError(f"{self.name} needs exactly one teacher, got {self.num_teachers}")

    def pair_all_stages(self) -> None:
        """Record every stage of both networks, paired shallow to deep (AT, NST); ConfigError if the counts differ."""
        self.student_features = self.student_net.stages()
        self.teacher_features = self.teacher_nets[0].stages()
        if not self.student_features or len(self.student_features) != len(self.teacher_features):
            raise ConfigError(
                f"{self.name} pairs stages one to one, but the student has {self.student_features} and the teacher "
                f"{self.teacher_features}; give matching student_taps/teacher_taps"
            )

    def bank_rows_and_negatives(self, other_classes: bool) -> tuple[int, int]:
        """Memory-bank methods (CRD, HKD, MCL-OKD): the bank's rows (``options.num_samples``, else the run's
        training-set size) and the negatives per anchor (``options.num_negatives``), capped with a warning at
        the candidates: every other sample, or with ``other_classes`` and the training labels known, the
        samples outside the largest class."""
        o = self.options
        rows = o.num_samples if o.num_samples is not None else self.facts.num_samples  # type: ignore[attr-defined]
        if rows is None:
            raise ConfigError(f"{self.name} needs num_samples, the training-set size (its memory bank has one row "
                              "per sample); the kdistill engine fills it from the data set")
        rows = int(rows)
        if rows < 2:
            raise ConfigError(f"{self.name}: num_samples must be >= 2, got {rows}")
        labels = self.facts.train_targets
        pool = rows - 1 if labels is None or not other_classes else rows - int(torch.bincount(labels).max())
        k = int(o.num_negatives)  # type: ignore[attr-defined]
        if k > pool:
            warnings.warn(f"{self.name}: num_negatives={k} exceeds the {pool} candidates; using {pool}", stacklevel=3)
            k = pool
        return rows, k

    def probe(self, net: TappedModel, keys: Sequence[str], preact: bool = False) -> dict[str, torch.Size]:
        """Shapes of ``keys`` on ``net`` from a dry run (to size adapters and fusion modules)."""
        return net.probe(keys, preact, self.input_size, who=self.name)

    # --- what the step records ----------------------------------------------------------------
    def student_taps(self) -> dict[str, str]:
        """Tap specs of the declared student features."""
        return self.student_net.tap_specs(self.student_features, self.student_preact, who=self.name)

    def teacher_taps(self, index: int) -> dict[str, str]:
        """Tap specs of the declared teacher features on teacher ``index`` (its own taps and preset)."""
        return self.teacher_nets[index].tap_specs(self.teacher_features, self.teacher_preact, who=self.name)

    # --- training ---------------------------------------------------------------------------
    def select_teachers(self, info: StepInfo) -> list[int]:
        """Indices of the teachers this step needs (all by default; MEAL v1 picks one, CE none)."""
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

    # --- several trainable networks (online methods) -------------------------------------------
    def param_groups(self) -> list[ParamGroup] | None:
        """One optimizer per group (a network, or some of the method's modules), or ``None``.

        ``None`` (default): one optimizer over the student and the method's modules. A list: the step
        builds one optimizer per ``ParamGroup`` (``kdistill.optim``), all on the run's schedule, and steps
        them in list order after the backward pass of the summed losses. The groups must cover every
        trained parameter exactly once (own-optimizer parameters excepted).
        """
        return None

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` buildable by ``build_method(cls.name, ...)``."""
    if not cls.name or cls.name in _METHODS:
        raise RuntimeError(f"method name {cls.name!r} missing or registered twice")
    if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, MethodOptions)):
        raise RuntimeError(f"method {cls.name!r}: Options must be a dataclass deriving from MethodOptions")
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
    """The options of a method and their defaults."""
    return method_class(name).Options.defaults()


def parse_method_options(name: str, values: Mapping[str, Any] | None, where: str = "") -> MethodOptions:
    """The typed options of method ``name`` from a mapping: the one check of option names, types and
    ranges, used by the configuration (``where="method.options"``) and by ``build_method``."""
    return method_class(name).Options.from_mapping(values, name, where)


def tapped_networks(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    student_taps: Mapping[str, str] | None = None,
    teacher_taps: Mapping[str, str] | Sequence[Mapping[str, str] | None] | None = None,
) -> tuple[TappedModel, list[TappedModel]]:
    """The student and each teacher with its own named taps: a mapping applies to every teacher, a
    list gives each its own (a pool of different architectures names its features differently)."""
    if isinstance(teacher_taps, Sequence) and not isinstance(teacher_taps, str):
        if len(teacher_taps) != len(teachers):
            raise ConfigError(f"teacher_taps lists {len(teacher_taps)} entries for {len(teachers)} teachers")
        per_teacher = list(teacher_taps)
    else:
        per_teacher = [teacher_taps] * len(teachers)
    return TappedModel(student, student_taps), [TappedModel(t, o) for t, o in zip(teachers, per_teacher, strict=True)]


def build_method(
    name: str,
    student: nn.Module,
    teachers: Sequence[nn.Module] = (),
    *,
    input_size: tuple[int, int, int] | None = None,
    facts: RunFacts | None = None,
    student_taps: Mapping[str, str] | None = None,
    teacher_taps: Mapping[str, str] | Sequence[Mapping[str, str] | None] | None = None,
    options: MethodOptions | None = None,
    **values: Any,
) -> Method:
    """Build a method by name, e.g. ``build_method("kd", student=s, teachers=[t], temperature=4)``.

    Options are keyword values (coerced and checked by the method's ``Options``) or a ready
    ``options`` instance; ``input_size`` is a shortcut for ``facts=RunFacts(input_size=...)``.
    """
    cls = method_class(name)
    if options is not None and values:
        raise ConfigError(f"build_method({name!r}): give options either as an Options instance or as keywords")
    if options is None:
        options = parse_method_options(name, values)
    if facts is None:
        facts = RunFacts() if input_size is None else RunFacts(input_size=tuple(input_size))  # type: ignore[arg-type]
    elif input_size is not None:
        facts = dataclasses.replace(facts, input_size=tuple(input_size))
    s_net, t_nets = tapped_networks(student, list(teachers), student_taps, teacher_taps)
    return cls(s_net, t_nets, options, facts)
