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

    name: str = "synthetic"  # data set: synthetic, cifar10, cifar100 or imagefolder
    root: str | None = None  # folder of the data (imagefolder: train/ and val/ or test/ with one folder per class)
    num_classes: int = 10  # classes of the synthetic set (other sets count their own; config.json records the data's)
    image_size: int | None = None  # resize images to this side in pixels (folders; synthetic: its size, default 32)
    train_size: int = 5000  # synthetic training images
    val_size: int = 1000  # synthetic validation images
    train_per_class: int | None = None  # train on this many images of every class (chosen by data.seed)
    val_per_class: int | None = None  # validate on at most this many images of every class (chosen by data.seed)
    batch_size: int = 64  # training batch size per device
    samples_per_class: int | None = None  # training batches of this many images of each of their classes (m-per-class sampling; in-batch MCL: 2); must divide batch_size
    eval_batch_size: int = 256  # validation batch size
    num_workers: int = 0  # data loader worker processes
    download: bool = False  # download CIFAR into data.root when missing
    cache_dir: str | None = None  # where decoded image folders are cached (default $KDISTILL_CACHE or ~/.cache/kdistill)
    on_bad_image: str = "skip"  # an undecodable image: skip (counted in the card) or error
    augment: bool = True  # random crop (padding 4) and horizontal flip during training
    mean: list[float] | None = None  # per-channel normalisation mean (default: the data set's own)
    std: list[float] | None = None  # per-channel normalisation standard deviation (default: the data set's own)
    seed: int = 0  # seed of the synthetic data and of per-class subsets
    transform: str = "cifar"  # image transform: cifar (whole image, pad-crop + flip on the device) or imagenet (docs/data.md)
    in_memory: str | bool = "auto"  # image folders: auto (in memory when the decoded splits fit the budget), true or false
    decoder: str = "auto"  # auto, pil, simplejpeg, torchvision or gpu (docs/data.md)
    memory_budget_gb: float | None = None  # the budget of in_memory=auto (default: half the memory available)


@dataclass
class ModelConfig:
    """A network by registry name, optional initial weights, optional taps by module name.

    ``checkpoint`` is a file of this very network (same class count); ``pretrained`` is a torchvision or
    timm state dict saved locally, whose classifier is replaced when the class count differs."""

    model: str = "cifar.resnet20"  # registry name: cifar.*, imagenet.*, torchvision.<name> or timm.<name>
    checkpoint: str | None = None  # weights of this very network (same class count): a .pth, .safetensors or a run's export
    pretrained: str | None = None  # local torchvision/timm state dict to start from; its classifier is replaced for another class count
    taps: dict[str, str] = field(default_factory=dict)  # features by name: {feature: module name} (default: the family's stage presets)
    mean: list[float] | None = None  # this network's own input normalisation mean (teachers trained with other statistics)
    std: list[float] | None = None  # this network's own input normalisation standard deviation
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model constructor


@dataclass
class MethodConfig:
    """The distillation method by name and its options (validated against its signature)."""

    name: str = "ce"  # method: ce (no teacher) or a distillation method (docs/methods/)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (listed below and in docs/methods/<method>.md); unset ones get defaults


@dataclass
class OptimConfig:
    """SGD with warm-up and a multistep, cosine or constant schedule (stepped per iteration)."""

    lr: float = 0.05  # initial learning rate of SGD
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    nesterov: bool = False  # Nesterov momentum
    schedule: str = "multistep"  # learning-rate schedule: multistep, cosine or constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # epochs at which multistep multiplies the learning rate by gamma
    gamma: float = 0.1  # multistep factor, in (0, 1]
    warmup_epochs: float = 0.0  # linear learning-rate warm-up, in epochs (fractions allowed)
    min_lr: float = 0.0  # final learning rate of the cosine schedule


@dataclass
class TrainerConfig:
    """Passed through to ``lightning.Trainer`` (so one recipe runs on CPU, GPU or DDP)."""

    max_epochs: int = 240  # training epochs
    accelerator: str = "auto"  # cpu, gpu, auto, ... (Lightning)
    devices: Any = 1  # number or list of devices (Lightning)
    num_nodes: int = 1  # machines for distributed training
    strategy: str = "auto"  # auto, ddp, ... (Lightning)
    precision: str = "32-true"  # 32-true, bf16-mixed, 16-mixed, ... (Lightning)
    log_every_n_steps: int = 20  # steps between logged training values
    limit_train_batches: float | None = None  # train on this many batches (int) or fraction (float) per epoch
    limit_val_batches: float | None = None  # validate on the first batches only (prefer data.val_per_class)
    check_val_every_n_epoch: int = 1  # validate every n epochs
    gradient_clip_val: float | None = None  # clip the gradient norm to this value
    compile: bool = False  # torch.compile the student with its taps, the teachers and the method
    compile_mode: str = "default"  # default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    channels_last: bool = False  # channels-last memory format for student, method modules and teachers
    progress_bar: bool = True  # show Lightning's progress bar (the per-epoch line is printed either way)
    checkpoint_every_n_steps: int | None = None  # also write last.ckpt every N steps (resume mid-epoch)
    threads: int = 0  # intra-op CPU threads of the run (0: PyTorch's default, which follows OMP_NUM_THREADS)


@dataclass
class TeacherRunConfig:
    """How teachers run: the precision of their inference pass (``auto`` follows ``trainer.precision``;
    ``32``, ``bf16`` or ``16`` autocast), their
    memory format, an optional teacher-output cache folder (``kdistill cache-teacher``), and whether a
    teacher without trained weights (no checkpoint, no pretrained file) is allowed (tests, smoke runs);
    ``evaluate``: measure each teacher's validation accuracy before distilling (cached per weights file)."""

    precision: str = "auto"  # teachers' inference precision: auto (follows trainer.precision), 32, bf16 or 16
    channels_last: bool = False  # run teachers in channels_last memory format
    cache: str | None = None  # folder of cached teacher outputs (`kdistill cache-teacher`)
    allow_untrained: bool = False  # allow a teacher without checkpoint or pretrained weights (tests, smoke runs)
    evaluate: bool = True  # measure each teacher's validation accuracy before distilling (cached per weights file)


@dataclass
class Config:
    """A whole recipe."""

    description: str = ""  # one line shown by `kdistill recipes`
    published: dict[str, Any] = field(default_factory=dict)  # the published result this recipe reproduces (top1, top5, source)
    seed: int = 0  # seed of model initialisation, augmentation and batch order
    output: str = "runs/default"  # run folder: checkpoints, logs, metrics.json, student.safetensors
    data: DataConfig = field(default_factory=DataConfig)  # the data section (data.*)
    student: ModelConfig = field(default_factory=ModelConfig)  # the student network (student.*; `model=` is short for student.model)
    teachers: list[ModelConfig] = field(default_factory=list)  # teacher networks, each with the student.* keys; teacher.<key> addresses the first
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)  # how teachers run (teacher.*)
    method: MethodConfig = field(default_factory=MethodConfig)  # the distillation method (method.*)
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer and schedule (optim.*)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # Lightning trainer settings (trainer.*)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """A ``Config`` from a mapping such as ``to_dict()`` wrote (types checked, names not validated)."""
        return build_dataclass(cls, raw)


# Fields of a teacher entry: ``teacher.<field>=...`` overrides address the first teacher.
TEACHER_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
