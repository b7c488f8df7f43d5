"""Build everything a run needs from a validated ``Config``: data, models, method, distiller."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from kdistill.checkpoint import load_pretrained, load_weights
from kdistill.config import Config, ModelConfig
from kdistill.data import BatchAugment, DataBundle, ImageTensors, build_data
from kdistill.engine.crop_cache import CropCache, is_crop_cache, load_crop_cache
from kdistill.engine.precision import MIXED_PRECISION, float32_classifier, resolve_teacher_precision
from kdistill.engine.teacher_cache import TeacherCache, load_teacher_cache
from kdistill.methods import RunFacts, build_method, parse_method_options
from kdistill.models import create_model
from kdistill.step import Distiller, Renormalize
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Built:
    """The pieces of a run."""

    data: DataBundle
    distiller: Distiller
    augment: BatchAugment
    teacher_cache: TeacherCache | CropCache | None = None
    method_options: dict = field(default_factory=dict)  # as the method runs them (defaults filled in)
    option_notes: list[str] = field(default_factory=list)  # defaults adapted to this run, and why


def load_data(cfg: Config) -> DataBundle:
    """The data set of the recipe."""
    d = cfg.data
    data = build_data(
        d.name,
        root=d.root,
        num_classes=d.num_classes,
        image_size=d.image_size,
        train_size=d.train_size,
        val_size=d.val_size,
        train_per_class=d.train_per_class,
        seed=d.seed,
        download=d.download,
        cache_dir=d.cache_dir,
        on_bad_image=d.on_bad_image,
        mean=d.mean,
        std=d.std,
        transform=d.transform,
        in_memory=d.in_memory,
        decoder=d.decoder,
        memory_budget_gb=d.memory_budget_gb,
    )
    if d.val_per_class:
        data.val = balanced_subset(data.val, d.val_per_class, d.seed)
    return data


def balanced_subset(split: ImageTensors, per_class: int, seed: int) -> ImageTensors:
    """At most ``per_class`` samples of every class, chosen by ``seed`` (a quick validation set that,
    unlike the first batches of a class-sorted split, sees every class alike)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(split.targets).tolist():
        rows = torch.nonzero(split.targets == c).flatten()
        keep.append(rows[torch.randperm(len(rows), generator=g)[:per_class]])
    rows = torch.cat(keep).sort().values
    return ImageTensors(split.images[rows].clone(), split.targets[rows].clone())


def build_model(mc: ModelConfig, num_classes: int, role: str, allow_new_head: bool = True) -> nn.Module:
    """A model by name with optional weights: a ``checkpoint`` of this network, or a ``pretrained`` file whose
    classifier is replaced when the class count differs (both checked strictly against keys and shapes).
    A teacher (``allow_new_head=False``) must not get a fresh classifier: it would distil noise."""
    where = "student" if role == "student" else f"teachers.{role.split()[-1]}"
    if mc.checkpoint and mc.pretrained:
        raise ConfigError(f"{where}: set checkpoint (this network, trained) or pretrained (features to start "
                          "from), not both")
    try:
        model = create_model(mc.model, num_classes=num_classes, **mc.kwargs)
    except TypeError as exc:  # an option the constructor does not take
        raise ConfigError(f"{role} model {mc.model!r} does not accept kwargs {sorted(mc.kwargs)}: {exc}") from exc
    if mc.pretrained:
        replaced = load_pretrained(model, mc.pretrained)
        if replaced and not allow_new_head:
            raise ConfigError(
                f"{where}.pretrained: {mc.pretrained!r} has another class count, so this teacher's classifier would "
                f"be untrained. Fine-tune it first (kdistill train student.model={mc.model} "
                f"student.pretrained={mc.pretrained}) and name that run's student.safetensors as {where}.checkpoint, "
                "or set teacher.allow_untrained=true")
        log.info("%s %s: pretrained weights from %s%s", role, mc.model, mc.pretrained,
                 f" (classifier {', '.join(replaced)} initialised for {num_classes} classes)" if replaced else "")
    if mc.checkpoint:
        load_weights(model, mc.checkpoint)
        log.info("%s %s: loaded %s", role, mc.model, mc.checkpoint)
    return model


def check_classes(model: nn.Module, num_classes: int, role: str, input_size: tuple[int, ...]) -> None:
    """A teacher or student must output one logit per class of the data set."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *input_size))
    model.train(was)
    if out.shape[-1] != num_classes:
        raise ConfigError(f"{role} outputs {out.shape[-1]} classes but the data set has {num_classes}")


def build_run(cfg: Config, data: DataBundle | None = None) -> Built:
    """Data, student, teachers (frozen, each with its own normalisation), method and distiller."""
    data = data or load_data(cfg)
    n = data.num_classes
    student = build_model(cfg.student, n, "student")
    check_classes(student, n, "student", data.input_size)
    teachers, teacher_inputs = [], []
    for i, tc in enumerate(cfg.teachers):
        if not (tc.checkpoint or tc.pretrained) and not cfg.teacher.allow_untrained:
            raise ConfigError(
                f"teachers.{i} ({tc.model}) has no trained weights: set teachers.{i}.checkpoint=<file> (a trained "
                f"teacher) or teachers.{i}.pretrained=<file> (pretrained weights), or teacher.allow_untrained=true "
                "to distil from an untrained network on purpose")
        teacher = build_model(tc, n, f"teacher {i}", allow_new_head=cfg.teacher.allow_untrained)
        if not (tc.checkpoint or tc.pretrained):
            log.warning("teacher %d (%s) has no checkpoint: it is untrained", i, tc.model)
        check_classes(teacher, n, f"teacher {i} ({tc.model})", data.input_size)
        teachers.append(teacher)
        needs = tc.mean is not None and (tc.mean != data.mean or tc.std != data.std)
        teacher_inputs.append(Renormalize(data.mean, data.std, tc.mean, tc.std or data.std) if needs else None)
    facts = RunFacts(input_size=data.input_size, num_samples=len(data.train), num_classes=n,
                     max_epochs=cfg.trainer.max_epochs,
                     train_targets=getattr(data.train, "targets", None))  # streamed shards: labels unknown
    options = parse_method_options(cfg.method.name, cfg.method.options, "method.options")
    notes = options.fit_to_run(set(cfg.method.options), facts)
    method = build_method(
        cfg.method.name,
        student=student,
        teachers=teachers,
        facts=facts,
        student_taps=cfg.student.taps or None,
        teacher_taps=[tc.taps or None for tc in cfg.teachers],
        options=options,
    )
    distiller = Distiller(student, teachers, method, teacher_inputs)
    # per-sample transforms (imagenet) crop and flip while decoding; the device only normalises
    on_device = cfg.data.augment and data.batch_augment
    augment = BatchAugment(data.mean, data.std, padding=4 if on_device else 0, flip=on_device)
    distiller.configure_teachers(resolve_teacher_precision(cfg.teacher.precision, cfg.trainer.precision, cfg.trainer.accelerator),
                                 cfg.teacher.channels_last or cfg.trainer.channels_last)
    distiller.configure_student(channels_last=cfg.trainer.channels_last)
    float32_classifier(distiller.student, cfg.trainer.precision in MIXED_PRECISION)
    return Built(data, distiller, augment, load_cache(cfg, distiller, data, augment), options.to_dict(), notes)


def load_cache(cfg: Config, distiller: Distiller, data: DataBundle, augment: BatchAugment) -> TeacherCache | CropCache | None:
    """The run's teacher cache (``teacher.cache``): stored views of in-memory images, or stored random resized crops
    of images cut per sample, which the training split is then set to cut."""
    if not cfg.teacher.cache:
        return None
    if is_crop_cache(cfg.teacher.cache):
        if isinstance(data.train, ImageTensors):
            raise ConfigError(f"teacher.cache={cfg.teacher.cache!r} stores random resized crops; this run holds "
                              "fixed-size images in memory (data.transform=cifar): build a view cache for it instead")
        cache = load_crop_cache(cfg.teacher.cache, distiller, data.train, augment)
        data.train.views = cache.crop_views()
        return cache
    if not isinstance(data.train, ImageTensors):
        raise ConfigError("teacher.cache holds views of fixed-size in-memory images (data.transform=cifar, "
                          "data.in_memory=true or auto); this run cuts crops per sample: build its cache with "
                          "kdistill cache-teacher on this recipe (random resized crops)")
    return load_teacher_cache(cfg.teacher.cache, distiller, data.train, augment)
