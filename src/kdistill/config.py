"""Recipes: typed configuration from YAML plus ``key=value`` overrides, validated before training.

Every section is a dataclass; unknown keys, wrong types and unknown names raise ``ConfigError``
with the key, the allowed values and close matches. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from kdistill.recipes import find_recipe, load_recipe, recipes_dir  # noqa: F401  (find_recipe, recipes_dir: API)
from kdistill.typed import build_dataclass
from kdistill.utils import ConfigError, unknown_name_error


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


CHOICES = {
    "data.on_bad_image": ("skip", "error"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "teacher.precision": ("32", "bf16"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
}
TEACHER_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``"a.b"``, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected key=value, for example optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key, value


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "teacher" and len(parts) > 1 and parts[1] in TEACHER_FIELDS:
        parts = ["teachers", "0", *parts[1:]]  # teacher.checkpoint=... means the first teacher
    if parts[0] == "model" and len(parts) == 1:
        parts = ["student", "model"]  # kdistill train model=cifar.resnet56
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {key!r}: index {part!r} is out of range for a list of {len(node)}")
            if int(part) == len(node):
                node.append({})
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"override {key!r}: index {last!r} is out of range for a list of {len(node)}")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])!r} is not a section")


def load_raw(recipe: str | None) -> dict[str, Any]:
    """The recipe as a dict with its ``base:`` recipes resolved (empty for no recipe)."""
    return {} if recipe is None else load_recipe(recipe)


def build_config(recipe: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Resolve a recipe + overrides into a validated ``Config`` (nothing is trained or loaded)."""
    tree = dict(base or {})
    tree.update(load_raw(recipe))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = Config.from_dict(tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Names and ranges that a dataclass type cannot express."""
    from kdistill.data import DATASETS
    from kdistill.methods import parse_method_options
    from kdistill.models import is_known_model, list_models

    flat = {
        "data.on_bad_image": cfg.data.on_bad_image,
        "optim.schedule": cfg.optim.schedule,
        "teacher.precision": cfg.teacher.precision,
        "trainer.precision": cfg.trainer.precision,
    }
    for key, value in flat.items():
        if value not in CHOICES[key]:
            raise unknown_name_error(f"value for {key}", value, CHOICES[key])
    if cfg.data.name not in DATASETS:
        raise unknown_name_error("value for data.name", cfg.data.name, DATASETS)
    for where, model in [("student.model", cfg.student.model)] + [
        (f"teachers.{i}.model", t.model) for i, t in enumerate(cfg.teachers)
    ]:
        if not is_known_model(model):
            raise unknown_name_error(f"model for {where}", model, [*list_models(), "torchvision.<name>", "timm.<name>"])
    parse_method_options(cfg.method.name, cfg.method.options, "method.options")  # names, types and ranges
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "data.num_classes": cfg.data.num_classes,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    non_negative = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.momentum": cfg.optim.momentum,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "data.num_workers": cfg.data.num_workers,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if not 0 < cfg.optim.gamma <= 1:
        raise ConfigError(f"optim.gamma must be in (0, 1], got {cfg.optim.gamma}")
