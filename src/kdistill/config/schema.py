"""The schema of a recipe: one dataclass per section, with the type and default of every key.

Building a ``Config`` from a mapping (``Config.from_dict``) checks the types and rejects unknown
keys (``kdistill.typed``); the names and ranges a type cannot express are checked in
``kdistill.config.checks``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kdistill.typed import build_dataclass


@dataclass
class DataConfig:
    """Which data set and how to batch it (``kdistill.data.build_data``)."""

    name: str = "synthetic"
    root: str | None = None
    num_classes: int = 10
    image_size: int | None = None
    train_size: int = 5000
    val_size: int = 1000
    train_per_class: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    download: bool = False
    cache_dir: str | None = None
    on_bad_image: str = "skip"
    augment: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    seed: int = 0


@dataclass
class ModelConfig:
    """A network by registry name, optional initial weights, optional taps by module name."""

    model: str = "cifar.resnet20"
    checkpoint: str | None = None
    taps: dict[str, str] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """The distillation method by name and its options (validated against its signature)."""

    name: str = "ce"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """SGD with warm-up and a multistep, cosine or constant schedule (stepped per iteration)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    """Passed through to ``lightning.Trainer`` (so one recipe runs on CPU, GPU or DDP)."""

    max_epochs: int = 240
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 20
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float | None = None
    compile: bool = False
    progress_bar: bool = True


@dataclass
class TeacherRunConfig:
    """How teachers run: the precision of their inference pass (``32``, or ``bf16`` autocast), their
    memory format, and an optional teacher-output cache folder (``kdistill cache-teacher``)."""

    precision: str = "32"
    channels_last: bool = False
    cache: str | None = None


@dataclass
class Config:
    """A whole recipe."""

    description: str = ""
    published: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    output: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[ModelConfig] = field(default_factory=list)
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """A ``Config`` from a mapping such as ``to_dict()`` wrote (types checked, names not validated)."""
        return build_dataclass(cls, raw)


# Fields of a teacher entry: ``teacher.<field>=...`` overrides address the first teacher.
TEACHER_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
