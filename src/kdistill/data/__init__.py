"""Data sets by name (``synthetic``, ``cifar10``, ``cifar100``, ``imagefolder``): in-memory tensors, or image folders
streamed per sample when they do not fit the memory budget (``data.in_memory``; docs/data.md)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.data.folders import load_cifar, load_image_folder
from kdistill.data.streaming import (
    FolderFiles,
    MemoryFolder,
    StreamingFolder,
    StreamingLoader,
    decode_to_tensors,
    scan_folder,
)
from kdistill.data.synthetic import make_synthetic
from kdistill.data.tensors import BatchAugment, BatchSampler, ClassBalancedBatchSampler, ImageTensors
from kdistill.data.tensors import make_loader as make_tensor_loader
from kdistill.data.transforms import TRANSFORMS, ImageTransform, build_transform
from kdistill.utils import ConfigError, unknown_name_error

log = logging.getLogger(__name__)
DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder", "shards")
IN_MEMORY = ("auto", "true", "false")
# the decoded splits may take this share of the memory available when the data is loaded (data.memory_budget_gb
# overrides it): the rest stays for the models, the optimizer, the DataLoader workers and the page cache
MEMORY_SHARE = 0.5
STATS_SAMPLE = 2000  # images whose evaluation crops estimate the channel statistics of a streamed split
# Channel statistics of the official training splits (for CIFAR-100 those of the RepDistiller and
# mdistiller benchmark code).
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


@dataclass
class DataBundle:
    """Train and validation tensors with the class names and the normalisation to use."""

    train: ImageTensors | StreamingFolder
    val: ImageTensors | StreamingFolder
    classes: list[str]
    mean: list[float]
    std: list[float]
    skipped: int = 0
    transform: ImageTransform | None = None
    storage: dict[str, Any] | None = None  # how the splits are held: in memory or streamed, and why

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        if isinstance(self.val, ImageTensors):
            return tuple(self.val.images.shape[1:])  # type: ignore[return-value]
        return self.val.output_size

    @property
    def batch_augment(self) -> bool:
        """True when training augmentation runs on whole batches on the device (``cifar``'s pad-crop + flip);
        per-sample transforms (``imagenet``) crop and flip while decoding."""
        return self.transform is None or not self.transform.per_sample_augment


def available_memory() -> int:
    """Bytes of memory available to new allocations now (``MemAvailable`` of /proc/meminfo; elsewhere the
    physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(budget_gb: float | None = None) -> int:
    """The bytes decoded splits may take in memory: ``budget_gb`` when given, else ``MEMORY_SHARE`` of the
    memory available now."""
    return int(budget_gb * 2**30) if budget_gb is not None else int(MEMORY_SHARE * available_memory())


def estimate_stats(data: StreamingFolder, sample: int = STATS_SAMPLE, seed: int = 0) -> tuple[list[float], list[float]]:
    """Channel mean and standard deviation of the evaluation crops of up to ``sample`` images of a streamed split
    (chosen by ``seed``): a full decoding pass over a large split only for its statistics would cost an epoch."""
    rows = sorted(random.Random(seed).sample(range(len(data)), min(sample, len(data))))
    evaluation = StreamingFolder(FolderFiles([data.files.paths[i] for i in rows], data.targets[rows],
                                             data.files.sizes[rows], data.files.classes),
                                 data.transform, train=False, decoder=data.decoder)
    return decode_to_tensors(evaluation)[0].channel_stats()


def _image_folder(base: Path, image_size: int | None, transform: str, in_memory: str | bool, decoder: str,
                  cache_dir: str | None, on_bad_image: str, seed: int, budget_gb: float | None):
    """Train and val splits of an image folder, in memory or streamed (``data.in_memory``)."""
    val_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if val_dir is None:
        raise ConfigError(f"{str(base)!r} needs a val/ or test/ folder beside train/")
    mode = str(in_memory).lower()
    if mode not in IN_MEMORY:
        raise unknown_name_error("value for data.in_memory", mode, IN_MEMORY)
    tf = build_transform(transform, image_size)
    tr_files = scan_folder(base / "train", None, on_bad_image, cache_dir)
    va_files = scan_folder(val_dir, tr_files.classes, on_bad_image, cache_dir)
    need = tr_files.decoded_bytes(tf, True) + va_files.decoded_bytes(tf, False)
    budget = memory_budget(budget_gb)
    keep = mode == "true" or (mode == "auto" and need <= budget)
    storage = {"in_memory": keep, "setting": mode, "decoded_bytes": need, "budget_bytes": budget,
               "transform": tf.describe()}
    log.info("%s: %s (decoded splits %.2f GB, budget %.2f GB)", base, "in memory" if keep else "streamed",
             need / 2**30, budget / 2**30)
    skipped = len(tr_files.skipped) + len(va_files.skipped)
    if not keep:  # files that pass the header check but fail to decode are counted by the loader (bad_images)
        train = StreamingFolder(tr_files, tf, True, seed, decoder, on_bad_image=on_bad_image)
        val = StreamingFolder(va_files, tf, False, seed, decoder, on_bad_image=on_bad_image)
        return train, val, tr_files.classes, skipped, tf, storage
    decoder = "auto" if decoder == "gpu" else decoder  # decoded once: the CPU decoders
    if tf.per_sample_augment:
        train = MemoryFolder(tr_files, tf, True, seed, decoder, on_bad_image)
        val, bad = decode_to_tensors(StreamingFolder(va_files, tf, False, seed, decoder, on_bad_image=on_bad_image))
        skipped = len(train.files.skipped) + len(va_files.skipped) + len(bad)
        return train, val, tr_files.classes, skipped, tf, storage
    # the cifar transform: today's cached uint8 tensors (headers already checked: the same files are read)
    tr = load_image_folder(base / "train", image_size, cache_dir, on_bad_image, decoder=decoder)
    va = load_image_folder(val_dir, image_size, cache_dir, on_bad_image, classes=tr.classes, decoder=decoder)
    skipped = len(tr.skipped) + len(va.skipped)
    return tr.tensors, va.tensors, tr.classes, skipped, tf, storage


def _shards(root: str, image_size: int | None, transform: str, decoder: str, cache_dir: str | None, seed: int):
    """Train and val splits of packed shards (``kdistill pack``), streamed."""
    try:
        from kdistill.data.shards import open_shards
    except ImportError as exc:
        raise ConfigError("data.name=shards needs LitData: pip install 'kdistill[shards]' (or pip install litdata)") from exc
    tf = build_transform(transform, image_size)
    train, val, classes = open_shards(root, tf, seed, decoder, cache_dir)
    return train, val, classes, tf, {"in_memory": False, "shards": root, "transform": tf.describe()}


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
    transform: str = "cifar",
    in_memory: str | bool = "auto",
    decoder: str = "auto",
    memory_budget_gb: float | None = None,
) -> DataBundle:
    """Load a data set by name. Normalisation: given, the official one, or the train split's own.

    Image folders take a transform by name (``cifar``, ``imagenet``) and are held in memory when ``in_memory`` is
    ``true``, or ``auto`` and their decoded splits fit ``memory_budget`` (else streamed per sample)."""
    if name not in DATASETS:
        raise unknown_name_error("data set", name, DATASETS)
    if transform not in TRANSFORMS:
        raise unknown_name_error("value for data.transform", transform, TRANSFORMS)
    if transform != "cifar" and name not in ("imagefolder", "shards"):
        raise ConfigError(f"data.transform={transform} needs data.name=imagefolder or shards (images of their own sizes); "
                          f"{name} is held as fixed-size tensors: use data.transform=cifar")
    skipped = 0
    tf: ImageTransform | None = None
    storage: dict[str, Any] = {"in_memory": True}
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
    elif name == "shards":
        if root is None:
            raise ConfigError("data.root is required for shards (a folder or object-storage URL made by kdistill pack)")
        train, val, classes, tf, storage = _shards(root, image_size, transform, decoder, cache_dir, seed)
    else:
        if root is None:
            raise ConfigError("data.root is required for imagefolder (a folder with train/ and val/ or test/)")
        base = Path(root)
        if not base.is_dir():
            raise ConfigError(f"data.root {root!r} is not a folder")
        train, val, classes, skipped, tf, storage = _image_folder(
            base, image_size, transform, in_memory, decoder, cache_dir, on_bad_image, seed, memory_budget_gb)
    if mean is None or std is None:
        # statistics of the whole train split, also when training on a subset of it: that is what
        # a teacher trained on the split was normalised with
        if name in KNOWN_STATS:
            mean, std = (list(v) for v in KNOWN_STATS[name])
        elif isinstance(train, ImageTensors):
            mean, std = train.channel_stats()
        elif getattr(train, "is_shards", False):
            from kdistill.data.shards import shard_stats

            mean, std = shard_stats(train, STATS_SAMPLE, seed)
        else:
            mean, std = estimate_stats(train, seed=seed)
            log.info("channel statistics estimated from %d images: mean %s std %s", min(STATS_SAMPLE, len(train)),
                     [round(v, 4) for v in mean], [round(v, 4) for v in std])
    if train_per_class:
        if not isinstance(train, ImageTensors):
            raise ConfigError("data.train_per_class needs the in-memory path (data.in_memory=true or auto)")
        train = train.subset_per_class(train_per_class, seed)
    return DataBundle(train, val, classes, list(mean), list(std), skipped, tf, storage)


def make_loader(
    data: ImageTensors | StreamingFolder,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    progress: Any = None,
    loader_class: type[torch.utils.data.DataLoader] = torch.utils.data.DataLoader,
    samples_per_class: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``(uint8 images, targets, indices)``: one index operation per batch for in-memory
    tensors, per-sample decoding in ``num_workers`` processes (resumable mid-epoch) for image folders and shards.
    A training split that cuts the stored crops of a teacher cache (``views``) also yields each batch's crops.
    ``loader_class`` is the DataLoader class of in-memory tensors (a resumable one for training);
    ``samples_per_class`` m makes training batches of m images per class (in-memory tensors only)."""
    if isinstance(data, ImageTensors):
        return make_tensor_loader(data, batch_size, train, seed, rank, world_size, num_workers, loader_class,
                                  samples_per_class)
    if train and samples_per_class:
        raise ConfigError("data.samples_per_class needs the training set in memory (data.in_memory=true or auto, "
                          "not shards or a streamed folder)")
    if getattr(data, "is_shards", False):  # LitData shards: LitData splits them by rank and worker
        from kdistill.data.shards import make_shard_loader

        return make_shard_loader(data, batch_size, rank, world_size, num_workers, progress if train else None,
                                 with_params=train and data.views is not None)
    return StreamingLoader(data, batch_size, train, seed, rank, world_size, num_workers, progress=progress,
                           with_params=train and data.views is not None)


__all__ = [
    "DATASETS",
    "IN_MEMORY",
    "TRANSFORMS",
    "ImageTransform",
    "MemoryFolder",
    "StreamingFolder",
    "StreamingLoader",
    "BatchAugment",
    "BatchSampler",
    "ClassBalancedBatchSampler",
    "DataBundle",
    "ImageTensors",
    "build_data",
    "make_loader",
    "make_synthetic",
]
