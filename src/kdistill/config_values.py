"""Ranges and allowed values of every configuration key, checked before anything is built.

The dataclass types in ``kdistill.config`` check types; this module checks what a type cannot say:
ranges, non-empty names, lengths of normalisation lists, and the settings passed through to
Lightning (accelerator, devices, strategy) and to model constructors (``student.kwargs``). Every
leaf key of the schema has a rule in ``RULES`` (a test enforces it), so a new key cannot go unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kdistill.safe_yaml import short_repr
from kdistill.utils import ConfigError, unknown_name_error

Rule = Callable[[str, Any], None]


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} must be {allowed}, got {short_repr(value)}")


def free(key: str, value: Any) -> None:
    """Any value of the declared type (descriptions, free-form notes)."""


def integer(lo: int, hi: int) -> Rule:
    def check(key: str, value: Any) -> None:
        if value is not None and not lo <= value <= hi:
            raise _fail(key, value, f"an integer in [{lo}, {hi}]")
    return check


def number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def check(key: str, value: Any) -> None:
        if value is None:
            return
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise _fail(key, value, f"a finite number in {left}{lo}, {hi}{right}")
    return check


def name(key: str, value: Any) -> None:
    """A non-empty string without surrounding spaces (names, paths)."""
    if value is not None and (not value or value != value.strip()):
        raise _fail(key, value, "a non-empty name or path")


def choices(*allowed: str) -> Rule:
    def check(key: str, value: Any) -> None:
        if value not in allowed:
            raise unknown_name_error(f"value for {key}", str(value), allowed)
    return check


def in_memory(key: str, value: Any) -> None:
    """``auto``, ``true`` or ``false`` (YAML's booleans too)."""
    choices("auto", "true", "false")(key, str(value).lower())


def channel_stats(positive: bool) -> Rule:
    """Per-channel normalisation: 1 or 3 finite numbers (std: each > 0, or every input becomes inf)."""
    def check(key: str, value: Any) -> None:
        if value is None:
            return
        if len(value) not in (1, 3):
            raise _fail(key, value, "a list of 1 or 3 numbers (one per channel)")
        for i, v in enumerate(value):
            if not math.isfinite(v) or (positive and v <= 0):
                raise _fail(f"{key}[{i}]", v, "a finite number > 0 (a zero std divides by zero)" if positive
                            else "a finite number")
    return check


def milestones(key: str, value: Any) -> None:
    for i, v in enumerate(value):
        if not 0 <= v <= 1_000_000:
            raise _fail(f"{key}[{i}]", v, "an epoch in [0, 1000000]")


def batch_limit(key: str, value: Any) -> None:
    """Lightning's ``limit_*_batches``: a fraction in (0, 1] or a whole number of batches >= 1."""
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (value > 1 and value != int(value)):
        raise _fail(key, value, "a fraction in (0, 1] or a whole number of batches >= 1")


def taps(key: str, value: Any) -> None:
    for tap, module in value.items():
        if not isinstance(tap, str) or not tap or not isinstance(module, str) or not module:
            raise _fail(f"{key}.{tap}", module, "a module name such as 'layer2' or 'layer3.8:input'")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook",
              "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false",
              "ddp_spawn_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
              "fsdp", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload")


def accelerator(key: str, value: Any) -> None:
    choices(*ACCELERATORS)(key, value)
    import torch

    if value in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={value} but this machine has no usable GPU (torch.cuda.is_available() is "
                          "False); use trainer.accelerator=cpu or auto")
    if value == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}=mps but the MPS backend is not available here; use cpu or auto")
    if value == "tpu":
        raise ConfigError(f"{key}=tpu is not supported by kdistill; use cpu, gpu or auto")


def devices(key: str, value: Any) -> None:
    """``trainer.devices``: a count >= 1, -1 or "auto" (all), or a list of device indices."""
    allowed = "a number of devices >= 1, -1 or 'auto' for all, or a list of device indices such as [0, 1]"
    if value == "auto" or value == -1:
        return
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise _fail(key, value, allowed)
        return
    if isinstance(value, bool):
        raise _fail(key, value, allowed)
    if isinstance(value, int):
        if not 1 <= value <= 4096:
            raise _fail(key, value, allowed)
        return
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 4096
                                                 for v in value) and len(set(value)) == len(value):
        return
    raise _fail(key, value, allowed)


def strategy(key: str, value: Any) -> None:
    choices(*STRATEGIES)(key, value)
    if value.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"{key}={value} needs the deepspeed package (pip install deepspeed)") from exc


MODEL_RULES: dict[str, Rule] = {
    "model": name, "checkpoint": name, "pretrained": name, "taps": taps, "mean": channel_stats(False), "std": channel_stats(True),
    "kwargs": free,  # checked against the model's constructor (check_model_kwargs)
}

RULES: dict[str, Rule] = {
    "description": free,
    "published": free,
    "seed": integer(0, 2**32 - 1),
    "output": name,
    "data.name": name,
    "data.root": name,
    "data.num_classes": integer(1, 1_000_000),
    "data.image_size": integer(4, 4096),
    "data.train_size": integer(1, 100_000_000),
    "data.val_size": integer(1, 100_000_000),
    "data.train_per_class": integer(1, 100_000_000),
    "data.val_per_class": integer(1, 100_000_000),
    "data.batch_size": integer(1, 1_000_000),
    "data.samples_per_class": integer(1, 1_000_000),
    "data.eval_batch_size": integer(1, 1_000_000),
    "data.num_workers": integer(0, 1024),
    "data.download": free,
    "data.cache_dir": name,
    "data.on_bad_image": choices("skip", "error"),
    "data.augment": free,
    "data.mean": channel_stats(False),
    "data.std": channel_stats(True),
    "data.seed": integer(0, 2**32 - 1),
    "data.transform": choices("cifar", "imagenet"),
    "data.in_memory": in_memory,
    "data.decoder": choices("auto", "pil", "simplejpeg", "torchvision", "gpu"),
    "data.memory_budget_gb": number(0, 1_000_000),
    **{f"student.{k}": rule for k, rule in MODEL_RULES.items()},
    **{f"teachers.*.{k}": rule for k, rule in MODEL_RULES.items()},
    "teacher.precision": choices("auto", "32", "bf16", "16"),
    "teacher.channels_last": free,
    "teacher.allow_untrained": free,
    "teacher.evaluate": free,
    "teacher.cache": name,
    "method.name": name,
    "method.options": free,  # each method checks its own options (names, types, ranges)
    "optim.lr": number(0, 1000),
    "optim.momentum": number(0, 1, hi_open=True),
    "optim.weight_decay": number(0, 1),
    "optim.nesterov": free,
    "optim.schedule": choices("multistep", "cosine", "constant"),
    "optim.milestones": milestones,
    "optim.gamma": number(0, 1, lo_open=True),
    "optim.warmup_epochs": number(0, 1_000_000),
    "optim.min_lr": number(0, 1000),
    "trainer.max_epochs": integer(1, 1_000_000),
    "trainer.accelerator": accelerator,
    "trainer.devices": devices,
    "trainer.num_nodes": integer(1, 100_000),
    "trainer.strategy": strategy,
    "trainer.precision": choices("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
    "trainer.log_every_n_steps": integer(1, 100_000_000),
    "trainer.limit_train_batches": batch_limit,
    "trainer.limit_val_batches": batch_limit,
    "trainer.check_val_every_n_epoch": integer(1, 1_000_000),
    "trainer.gradient_clip_val": number(0),
    "trainer.compile": free,
    "trainer.compile_mode": choices("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "trainer.channels_last": free,
    "trainer.progress_bar": free,
    "trainer.checkpoint_every_n_steps": integer(1, 100_000_000),
    "trainer.threads": integer(0, 4096),
}


def schema_leaves(cls: type | None = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the configuration schema with its annotation (``teachers.*.<field>`` for the list)."""
    import dataclasses
    import typing

    from kdistill.config import Config, ModelConfig

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(schema_leaves(tp, f"{key}."))
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (ModelConfig,):
            out.update(schema_leaves(ModelConfig, f"{key}.*."))
        else:
            out[key] = tp
    return out


def _values(cfg: Any) -> dict[str, Any]:
    """The value of every rule's key in ``cfg`` (``teachers.*`` expanded to each teacher)."""
    out: dict[str, Any] = {}
    for key in RULES:
        parts = key.split(".")
        if parts[0] == "teachers":
            for i, teacher in enumerate(cfg.teachers):
                out[f"teachers.{i}.{parts[2]}"] = (RULES[key], getattr(teacher, parts[2]))
            continue
        node = cfg
        for part in parts:
            node = getattr(node, part)
        out[key] = (RULES[key], node)
    return out


def check_values(cfg: Any) -> None:
    """Apply every rule to ``cfg``; the first violation is a ConfigError naming the key."""
    for key, (rule, value) in _values(cfg).items():
        rule(key, value)
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr ({cfg.optim.min_lr}) must not exceed optim.lr ({cfg.optim.lr})")
    if cfg.trainer.accelerator in ("gpu", "cuda") and isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0:
        import torch

        if cfg.trainer.devices > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={cfg.trainer.devices} but only {torch.cuda.device_count()} GPU(s) "
                              "are visible")
    for key, mc in [("student", cfg.student)] + [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)]:
        check_model_kwargs(key, mc.model, mc.kwargs, cfg.data.num_classes)


def check_model_kwargs(key: str, model: str, kwargs: dict[str, Any], num_classes: int) -> None:
    """Build the model on the meta device (no memory, no weights) to check ``kwargs`` against its
    constructor: an unknown or ill-typed option is a ConfigError naming ``<key>.kwargs``."""
    if not kwargs:
        return
    import torch

    from kdistill.models import create_model

    if "num_classes" in kwargs:
        raise ConfigError(f"{key}.kwargs.num_classes: the number of classes comes from the data (data.num_classes)")
    for weights in ("weights", "pretrained"):
        if weights in kwargs:
            raise ConfigError(f"{key}.kwargs.{weights}: weights are not downloaded; save them once and name the file "
                              f"with {key}.pretrained=<path> (the classifier is replaced for your class count)")
    try:
        with torch.device("meta"):
            create_model(model, num_classes=num_classes, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError, NotImplementedError) as exc:
        names = ", ".join(f"{key}.kwargs.{k}" for k in kwargs)
        raise ConfigError(f"{names}: model {model!r} does not accept these options ({type(exc).__name__}: "
                          f"{short_repr(str(exc), 200)})") from exc
