"""Data sets by name (``synthetic``, ``cifar10``, ``cifar100``, ``imagefolder``) as in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdistill.data.folders import load_cifar, load_image_folder
from kdistill.data.synthetic import make_synthetic
from kdistill.data.tensors import BatchAugment, BatchSampler, ImageTensors, make_loader
from kdistill.utils import ConfigError, unknown_name_error

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")
# Channel statistics of the official training splits (for CIFAR-100 those of the RepDistiller and
# mdistiller benchmark code).
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


@dataclass
class DataBundle:
    """Train and validation tensors with the class names and the normalisation to use."""

    train: ImageTensors
    val: ImageTensors
    classes: list[str]
    mean: list[float]
    std: list[float]
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def build_data(
    name: str,
    root: str | None = None,
    num_classes: int = 10,
    image_size: int | None = None,
    train_size: int = 5000,
    val_size: int = 1000,
    train_per_class: int | None = None,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | None = None,
    on_bad_image: str = "skip",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataBundle:
    """Load a data set by name. Normalisation: given, the official one, or the train split's own."""
    if name not in DATASETS:
        raise unknown_name_error("data set", name, DATASETS)
    skipped = 0
    if name == "synthetic":
        size = image_size or 32
        train = make_synthetic(num_classes, train_size, size, seed=seed, split_seed=0)
        val = make_synthetic(num_classes, val_size, size, seed=seed, split_seed=1)
        classes = [f"class{i:03d}" for i in range(num_classes)]
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ConfigError(f"data.root is required for {name} (torchvision's CIFAR folder)")
        tr = load_cifar(name, root, True, download)
        train, val, classes = tr.tensors, load_cifar(name, root, False, download).tensors, tr.classes
    else:
        if root is None:
            raise ConfigError("data.root is required for imagefolder (a folder with train/ and val/ or test/)")
        base = Path(root)
        if not base.is_dir():
            raise ConfigError(f"data.root {root!r} is not a folder")
        val_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
        if val_dir is None:
            raise ConfigError(f"{root!r} needs a val/ or test/ folder beside train/")
        tr = load_image_folder(base / "train", image_size, cache_dir, on_bad_image)
        va = load_image_folder(val_dir, image_size, cache_dir, on_bad_image, classes=tr.classes)
        train, val, classes = tr.tensors, va.tensors, tr.classes
        skipped = len(tr.skipped) + len(va.skipped)
    if mean is None or std is None:
        # statistics of the whole train split, also when training on a subset of it: that is what
        # a teacher trained on the split was normalised with
        if name in KNOWN_STATS:
            mean, std = (list(v) for v in KNOWN_STATS[name])
        else:
            mean, std = train.channel_stats()
    if train_per_class:
        train = train.subset_per_class(train_per_class, seed)
    return DataBundle(train, val, classes, list(mean), list(std), skipped)


__all__ = [
    "DATASETS",
    "BatchAugment",
    "BatchSampler",
    "DataBundle",
    "ImageTensors",
    "build_data",
    "make_loader",
    "make_synthetic",
]
