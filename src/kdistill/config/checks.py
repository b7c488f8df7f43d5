"""The checks of a recipe that its types cannot express: names (data sets, models, methods and their
options), choices and ranges. Every failure is a ``ConfigError`` naming the key, the allowed values
and close matches."""

from __future__ import annotations

from kdistill.config.schema import Config
from kdistill.config_values import check_values
from kdistill.utils import ConfigError, unknown_name_error

CHOICES = {
    "data.on_bad_image": ("skip", "error"),
    "data.transform": ("cifar", "imagenet"),
    "data.in_memory": ("auto", "true", "false"),
    "data.decoder": ("auto", "pil", "simplejpeg", "torchvision", "gpu"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "teacher.precision": ("auto", "32", "bf16", "16"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
}


def validate(cfg: Config) -> None:
    """Names and ranges that a dataclass type cannot express."""
    from kdistill.data import DATASETS
    from kdistill.methods import list_methods, parse_method_options
    from kdistill.models import is_known_model, list_models

    flat = {
        "data.on_bad_image": cfg.data.on_bad_image,
        "data.transform": cfg.data.transform,
        "data.in_memory": str(cfg.data.in_memory).lower(),
        "data.decoder": cfg.data.decoder,
        "optim.schedule": cfg.optim.schedule,
        "teacher.precision": cfg.teacher.precision,
        "trainer.precision": cfg.trainer.precision,
        "trainer.compile_mode": cfg.trainer.compile_mode,
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
    if cfg.method.name not in list_methods():
        raise ConfigError(f"method.name: {unknown_name_error('method', cfg.method.name, list_methods())}")
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
    if cfg.trainer.checkpoint_every_n_steps is not None and cfg.trainer.checkpoint_every_n_steps < 1:
        raise ConfigError(f"trainer.checkpoint_every_n_steps must be >= 1, got {cfg.trainer.checkpoint_every_n_steps}")
    if cfg.data.memory_budget_gb is not None and cfg.data.memory_budget_gb < 0:
        raise ConfigError(f"data.memory_budget_gb must be >= 0, got {cfg.data.memory_budget_gb}")
    if cfg.data.transform == "imagenet" and (cfg.data.name not in ("imagefolder", "shards") or cfg.data.image_size is None):
        raise ConfigError("data.transform=imagenet needs data.name=imagefolder or shards and data.image_size (the crop side, "
                          f"e.g. 224); got data.name={cfg.data.name}, data.image_size={cfg.data.image_size}")
    m = cfg.data.samples_per_class
    if m is not None and m >= 1 and cfg.data.batch_size % m:
        raise ConfigError(f"data.samples_per_class={m} must divide data.batch_size={cfg.data.batch_size} "
                          "(a batch is batch_size / samples_per_class groups of one class each)")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if not 0 < cfg.optim.gamma <= 1:
        raise ConfigError(f"optim.gamma must be in (0, 1], got {cfg.optim.gamma}")
    check_values(cfg)  # a rule for every key: ranges, names, Lightning and model settings
