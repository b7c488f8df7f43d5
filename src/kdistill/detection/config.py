"""Detection recipes (``task: detection``): typed sections, validated before anything is built.

Same conventions as classification recipes: YAML read with ``yaml.safe_load``, ``key=value``
overrides, unknown keys and names raise ``ConfigError`` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from kdistill.config import load_raw, parse_override
from kdistill.typed import build_dataclass
from kdistill.utils import ConfigError, unknown_name_error

DATA_NAMES = ("synthetic", "coco")
METHODS = ("ce", "reviewkd")
REVIEW_OPTIONS = ("loss_weight", "mid_channels", "level_map", "teacher_mean", "teacher_std", "teacher_grad_mode",
                  "loss_key", "hcl_levels", "fusion", "loss", "probe_size")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


@dataclass
class DetectionDataConfig:
    """``synthetic`` (the shapes set) or ``coco`` (a COCO-format folder)."""

    name: str = "synthetic"
    root: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    num_classes: int | None = None
    train_size: int = 64
    val_size: int = 16
    image_size: list[int] = field(default_factory=lambda: [128, 128])
    synthetic_classes: int = 3
    max_objects: int = 4
    mask_format: str = "polygon"
    flip: float = 0.5
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 0
    seed: int = 0


@dataclass
class DetectorConfig:
    """A detector by name (``kdistill.detection.build_detector``) and its local weights."""

    model: str | None = None
    checkpoint: str | None = None
    backbone_weights: str | None = None
    trainable_layers: int | None = None
    norm: str = "frozen"
    zero_init_residual: bool = False
    p6p7_from: str = "c5"
    slim: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetectionMethodConfig:
    """``ce`` (the detector's own losses) or ``reviewkd`` with its options."""

    name: str = "ce"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetectionOptimConfig:
    """SGD, linear warm-up over iterations from ``warmup_factor``, then ×``gamma`` at epoch milestones."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001


@dataclass
class DetectionTrainerConfig:
    """Passed through to ``lightning.Trainer``."""

    max_epochs: int = 12
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float | None = None
    progress_bar: bool = True


@dataclass
class DetectionConfig:
    """A whole detection recipe."""

    task: str = "detection"
    description: str = ""
    published: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    output: str = "runs/detection"
    # COCO AP scorer: auto = faster-coco-eval when installed (same numbers, faster), else pycocotools
    eval_backend: str = "auto"
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    student: DetectorConfig = field(default_factory=DetectorConfig)
    teacher: DetectorConfig = field(default_factory=DetectorConfig)
    method: DetectionMethodConfig = field(default_factory=DetectionMethodConfig)
    optim: DetectionOptimConfig = field(default_factory=DetectionOptimConfig)
    trainer: DetectionTrainerConfig = field(default_factory=DetectionTrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def wants_detection(recipe: str | None, overrides: list[str]) -> bool:
    """True when the recipe or an override says ``task=detection``."""
    for text in overrides:
        if text.partition("=")[0].strip() == "task":
            return parse_override(text)[1] == "detection"
    if recipe is None or "=" in recipe:
        return False
    try:
        return load_raw(recipe).get("task") == "detection"
    except ConfigError:
        return False


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts == ["model"]:
        parts = ["student", "model"]
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build_detection_config(recipe: str | None = None, overrides: list[str] | None = None,
                           base: dict[str, Any] | None = None) -> DetectionConfig:
    """Resolve a detection recipe + ``key=value`` overrides into a validated config."""
    tree: dict[str, Any] = dict(base or {})
    tree.update(load_raw(recipe))
    for text in overrides or []:
        key, value = parse_override(text)
        _set(tree, key, value)
    cfg = build_dataclass(DetectionConfig, tree)
    validate_detection(cfg)
    return cfg


def validate_detection(cfg: DetectionConfig) -> None:
    """Names and ranges a dataclass type cannot express."""
    from kdistill.detection.models import NORMS, detector_kind

    if cfg.task != "detection":
        raise ConfigError(f"task must be 'detection' here, got {cfg.task!r}")
    if cfg.data.name not in DATA_NAMES:
        raise unknown_name_error("value for data.name", cfg.data.name, DATA_NAMES)
    if cfg.data.name == "coco" and not cfg.data.root:
        raise ConfigError("data.root is required for data.name=coco (a folder with <split>/ images and "
                          "annotations/instances_<split>.json)")
    if cfg.data.mask_format not in ("polygon", "rle"):
        raise unknown_name_error("value for data.mask_format", cfg.data.mask_format, ("polygon", "rle"))
    if len(cfg.data.image_size) != 2 or min(cfg.data.image_size) < 32:
        raise ConfigError(f"data.image_size must be [height, width] with both >= 32, got {cfg.data.image_size}")
    if not 0 <= cfg.data.flip <= 1:
        raise ConfigError(f"data.flip must be in [0, 1], got {cfg.data.flip}")
    for key in ("batch_size", "eval_batch_size", "train_size", "val_size", "max_objects"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(cfg.data, key)}")
    if cfg.data.num_classes is not None and cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes must be >= 2 (background included) or null, got {cfg.data.num_classes}")
    from kdistill.detection.evaluate import BACKENDS

    if cfg.eval_backend not in BACKENDS:
        raise unknown_name_error("value for eval_backend", cfg.eval_backend, BACKENDS)
    if cfg.eval_backend == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        raise ConfigError("eval_backend=faster_coco_eval needs the faster-coco-eval package (pip install "
                          "faster-coco-eval); 'auto' uses it when installed, else pycocotools")
    if cfg.method.name not in METHODS:
        raise unknown_name_error("value for method.name", cfg.method.name, METHODS)
    if cfg.student.model is None:
        raise ConfigError("student.model is required, e.g. student.model=fasterrcnn_resnet18_fpn")
    roles = [("student", cfg.student)] + ([("teacher", cfg.teacher)] if cfg.method.name == "reviewkd" else [])
    for role, det in roles:
        if det.model is None:
            raise ConfigError(f"method reviewkd needs {role}.model (and {role}.checkpoint for a trained teacher)")
        detector_kind(det.model)
        if det.norm not in NORMS:
            raise unknown_name_error(f"value for {role}.norm", det.norm, NORMS)
        if det.p6p7_from not in ("c5", "p5"):
            raise unknown_name_error(f"value for {role}.p6p7_from", det.p6p7_from, ("c5", "p5"))
    if cfg.method.name == "reviewkd":
        if detector_kind(cfg.student.model) != detector_kind(cfg.teacher.model):
            raise ConfigError(f"student {cfg.student.model!r} and teacher {cfg.teacher.model!r} must be the same "
                              "detector family (their FPN levels are paired)")
        for key in cfg.method.options:
            if key not in REVIEW_OPTIONS:
                raise unknown_name_error(f"option of method 'reviewkd' (method.options.{key})", key, REVIEW_OPTIONS)
    elif cfg.method.options:
        raise ConfigError(f"method ce takes no options, got {sorted(cfg.method.options)}")
    if cfg.trainer.precision not in PRECISIONS:
        raise unknown_name_error("value for trainer.precision", cfg.trainer.precision, PRECISIONS)
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be >= 1, got {cfg.trainer.max_epochs}")
    for key in ("lr", "momentum", "weight_decay", "norm_weight_decay", "warmup_iters"):
        if getattr(cfg.optim, key) < 0:
            raise ConfigError(f"optim.{key} must be >= 0, got {getattr(cfg.optim, key)}")
    if not 0 < cfg.optim.warmup_factor <= 1 or not 0 < cfg.optim.gamma <= 1:
        raise ConfigError("optim.warmup_factor and optim.gamma must be in (0, 1]")
