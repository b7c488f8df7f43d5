"""Teacher cache for random resized crops: K stored crops per image with the teachers' top-k soft labels.

This is the region-level soft-label cache of FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022), which MEAL V2 (Shen & Savvides, 2020) offers as its fast variant: before training, every
teacher labels K random resized crops of every training image once; training then draws one of the K stored crops per
sample and epoch, the DataLoader worker cuts exactly that crop, and the method reads the stored labels instead of
running the teachers. A logit method (KD, DKD, MEAL V2 on logits) on ImageNet-sized data skips the teacher pass.

* Crops. View ``v`` of image ``index`` is drawn by the data set's own transform (``ImageTransform.params``, the
  ``imagenet`` random resized crop + flip) from ``cache_rng(seed, index, v)``: deterministic under the seed, whatever
  the order, worker or process that builds the cache. The boxes ``(top, left, height, width, flip)`` in source pixels
  are stored with the labels (``params``, N×K×5), and training decodes each crop with the same decoder and DCT scaling
  as the build, so the student sees the very pixels the teacher labelled. The view a sample uses in an epoch is
  ``view_of(seed, epoch, index, K)``; the batch carries the crop it was cut with, and the lookup checks that it is one
  of the stored crops of that image.
* Top-k (FKD's marginal smoothing). Per view and teacher the k largest logits are kept with their classes, plus one
  fill value ``f = log((sum of exp over the other C - k logits) / (C - k))``. The reconstruction puts the k logits back
  and ``f`` everywhere else: its softmax gives the k classes exactly their probabilities under the full logits and
  spreads the remaining probability mass evenly over the other classes. At temperature 1 that is FKD's soft label;
  the k stored logits are the teacher's own, so the top-k classes keep their logits exactly.

Files: ``tensors.safetensors`` (no pickle) and ``manifest.json`` (written last) with fingerprints of the teachers'
weights and input normalisation, of the data set's listing, the transform, the decoder, the normalisation and the
teacher precision: a cache built for anything else is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdistill.data.decode import decode_sample
from kdistill.data.tensors import BatchAugment
from kdistill.data.transforms import ImageTransform
from kdistill.engine.teacher_cache import MANIFEST, TeacherCacheError, _check_usable, _teacher_descriptions
from kdistill.files import atomic_write, atomic_write_json
from kdistill.methods.base import Batch, ModelOutput
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)
FORMAT = "kdistill-crop-cache/1"
VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def cache_rng(seed: int, index: int, view: int) -> random.Random:
    """The generator of stored view ``view`` of image ``index``: a pure function of the three numbers."""
    return random.Random(f"kdistill-cache-crop/{seed}/{index}/{view}")


def view_of(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the ``views`` stored crops sample ``index`` trains on in ``epoch`` (uniform, seeded)."""
    return random.Random(f"kdistill-cache-view/{seed}/{epoch}/{index}").randrange(views)


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, classes, fill)``: the ``k`` largest logits of each row, their classes, and the fill logit
    ``log(mean(exp(other logits)))`` (FKD's marginal smoothing; module docstring). ``logits``: ...×C float."""
    c = logits.shape[-1]
    if not 1 <= k < c:
        raise ConfigError(f"--topk must be in [1, {c - 1}] for {c} classes, got {k}")
    x = logits.double()
    top = x.topk(k, dim=-1)
    rest = x.scatter(-1, top.indices, float("-inf")).logsumexp(-1) - math.log(c - k)
    return top.values.float(), top.indices, rest.float()


def topk_expand(values: Tensor, classes: Tensor, fill: Tensor, num_classes: int) -> Tensor:
    """The logits ``topk_compress`` describes: ``values`` at ``classes``, ``fill`` elsewhere (float32)."""
    full = fill.float().unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return full.scatter_(-1, classes.long(), values.float())


class CropViews:
    """The stored crop a sample trains on: ``(index, epoch) -> (top, left, height, width, flip)``. Set as a data
    set's ``views`` (it is pickled into the DataLoader workers)."""

    def __init__(self, params: Tensor, seed: int):
        self.params, self.seed = params, seed

    def __call__(self, index: int, epoch: int) -> Tensor:
        row = self.params[index, view_of(self.seed, epoch, index, self.params.shape[1])]
        if row[2] <= 0:
            raise ValueError(f"image {index} could not be decoded when the teacher cache was built")
        return row.double()


@dataclass
class CropCache:
    """Stored crops ``params`` N×K×5 and the teachers' top-k labels: ``values``/``classes`` T×N×K×k, ``fill`` T×N×K."""

    manifest: dict[str, Any]
    params: Tensor
    values: Tensor
    classes: Tensor
    fill: Tensor

    @property
    def views(self) -> int:
        return self.params.shape[1]

    @property
    def num_teachers(self) -> int:
        return self.values.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def crop_views(self) -> CropViews:
        """The callable that makes a data set cut the stored crops (``ShardDataset.views``)."""
        return CropViews(self.params, int(self.manifest["seed"]))

    def view_for(self, index: Tensor, crops: Tensor) -> Tensor:
        """For each sample, which stored view ``crops[b]`` is; raises if a crop is not one of its image's views."""
        stored = self.params[index.cpu()].double()  # B×K×5
        match = (stored == crops.cpu().double().unsqueeze(1)).all(-1)  # B×K
        missing = ~match.any(1)
        if missing.any():
            b = int(missing.nonzero()[0])
            raise TeacherCacheError(
                f"sample {int(index[b])} was cut with crop {crops[b].tolist()}, which is none of the {self.views} crops "
                "stored in the teacher cache; the data set must cut the stored crops (set its views from the cache)")
        return match.float().argmax(1)

    def logits(self, teacher: int, index: Tensor, view: Tensor) -> Tensor:
        """Float32 B×C logits reconstructed from the top-k labels of ``teacher`` for views ``view`` of ``index``."""
        i, v = index.cpu(), view.cpu()
        return topk_expand(self.values[teacher, i, v], self.classes[teacher, i, v], self.fill[teacher, i, v],
                           self.num_classes)

    def training_batch(self, batch: Batch, augment: Any, teachers: Sequence[int]) -> tuple[Batch, list[ModelOutput]]:
        """The batch as it is (its images are the stored crops, already normalised) and the cached outputs of
        ``teachers`` for exactly those crops."""
        return CachedCropTeachers(self)(batch, teachers)


class CachedCropTeachers:
    """A teacher source for the training step: the batch's images are the stored crops (cut by the workers); the
    outputs are the cached labels of exactly those crops for the selected teachers."""

    def __init__(self, cache: CropCache):
        self.cache = cache

    def __call__(self, batch: Batch, selected: Sequence[int]) -> tuple[Batch, list[ModelOutput]]:
        crops = getattr(batch, "crops", None)
        if batch.index is None or crops is None:
            raise ValueError("the crop teacher cache needs each batch's dataset indices and crop parameters")
        view = self.cache.view_for(batch.index, crops)
        device = batch.images.device
        return batch, [ModelOutput(self.cache.logits(t, batch.index, view).to(device)) for t in selected]


def split_size(dataset: Any) -> int:
    """The number of samples of the whole training split. Under DDP a shard data set's ``len`` is the rank's share;
    the cache holds every sample, so that it is one file whichever rank (or how many) reads it."""
    return int(dataset.split_size) if hasattr(dataset, "split_size") else len(dataset)


def _encoded(dataset: Any) -> Iterator[tuple[int, bytes]]:
    """``(index, encoded bytes)`` of every sample of a shard split or a streamed image folder (all of the split,
    not a rank's share)."""
    if hasattr(dataset, "raw"):  # ShardDataset: raw positions address the whole split
        for position in range(split_size(dataset)):
            item = dataset.raw(position)
            yield int(item["index"]), bytes(item["image"])
    elif hasattr(dataset, "files"):  # a streamed image folder: the sample index is the position in its listing
        for index, path in enumerate(dataset.files.paths):
            with open(path, "rb") as f:
                yield index, f.read()
    else:
        raise ConfigError(f"the crop teacher cache reads shards or streamed image folders, not {type(dataset).__name__}")


def data_identity(dataset: Any) -> dict[str, Any]:
    """What identifies the training split without reading it: the shard index (chunk names, sizes, counts), or the
    folder listing (paths, labels, image sizes)."""
    h = hashlib.sha256()
    if hasattr(dataset, "raw"):
        root = dataset.input_dir.path or dataset.input_dir.url
        index_file = Path(dataset.input_dir.path or "", "index.json")
        h.update(index_file.read_bytes() if index_file.is_file() else str(root).encode())
        kind = "shards"
    else:
        files = dataset.files
        for path, target, size in zip(files.paths, files.targets.tolist(), files.sizes.tolist(), strict=True):
            h.update(f"{Path(path).name}|{target}|{size}\n".encode())
        kind = "folder"
    return {"kind": kind, "size": split_size(dataset), "sha256": h.hexdigest()}


def _expected(distiller: Any, dataset: Any, augment: BatchAugment) -> dict[str, Any]:
    transform: ImageTransform = dataset.image_transform if hasattr(dataset, "image_transform") else dataset.transform
    return {
        "format": FORMAT,
        "teachers": _teacher_descriptions(distiller),
        "teacher_precision": distiller.teacher_precision,
        "data": data_identity(dataset),
        "transform": transform.describe(),
        "decoder": {"name": dataset.decoder, "reduce": bool(dataset.reduce)},
        "normalize": {"mean": [round(float(v), 8) for v in augment.mean.flatten()],
                      "std": [round(float(v), 8) for v in augment.std.flatten()]},
    }


def check_crop_cache_usable(distiller: Any, dataset: Any) -> None:
    """A clear ``ConfigError`` for combinations the crop cache cannot serve."""
    _check_usable(distiller)
    transform = getattr(dataset, "image_transform", getattr(dataset, "transform", None))
    if not isinstance(transform, ImageTransform) or not transform.per_sample_augment:
        raise TeacherCacheError(
            "the crop teacher cache stores random resized crops: it needs data.transform=imagenet; for the cifar "
            "transform (pad-crop + flip on whole batches) build the view cache of in-memory data instead")
    if not (hasattr(dataset, "raw") or hasattr(dataset, "files")) or not hasattr(dataset, "views") \
            or hasattr(dataset, "buffer"):
        raise TeacherCacheError(
            f"the crop teacher cache works with shards (data.name=shards) or streamed image folders, not with "
            f"{type(dataset).__name__}; set data.in_memory=false for an image folder")
    if dataset.decoder == "gpu":
        raise TeacherCacheError("the crop teacher cache decodes crops on the CPU while building; data.decoder=gpu "
                                "decodes them differently (a grey level or two): use a CPU decoder with the cache")


@torch.no_grad()
def build_crop_cache(
    distiller: Any,
    dataset: Any,
    augment: BatchAugment,
    out: str | Path,
    views: int = 8,
    topk: int = 5,
    storage: str = "fp16",
    batch_size: int = 64,
    seed: int = 0,
) -> CropCache:
    """Label ``views`` random resized crops of every training image with every teacher; keep the top ``topk``.

    Crops are decoded exactly as training will decode them (the data set's transform, decoder and DCT scaling),
    normalised by ``augment`` and passed through ``distiller.teacher_forward`` (teacher precision and normalisation
    as in training). Undecodable images get no views (training drops them anyway) and are counted.
    """
    if storage not in VALUE_DTYPES:
        raise ConfigError(f"crop cache storage must be one of {sorted(VALUE_DTYPES)}, got {storage!r}")
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}")
    check_crop_cache_usable(distiller, dataset)
    if not len(distiller.teachers):
        raise ConfigError("the teacher cache needs at least one teacher")
    start = time.perf_counter()
    device = next(iter([*distiller.parameters(), *distiller.buffers()])).device
    norm = augment.to(device)
    transform = dataset.image_transform if hasattr(dataset, "image_transform") else dataset.transform
    n, t_count = split_size(dataset), len(distiller.teachers)
    params = torch.zeros(n, views, 5, dtype=torch.int32)  # height 0 marks an image that did not decode
    stored: dict[str, Tensor] = {}
    skipped: list[int] = []
    pending: list[tuple[int, int, Tensor]] = []

    def flush() -> None:
        rows, cols = torch.tensor([p[0] for p in pending]), torch.tensor([p[1] for p in pending])
        x = norm.normalize(torch.stack([p[2] for p in pending]).to(device))
        for t in range(t_count):
            logits = distiller.teacher_forward(t, x).logits.float().cpu()
            if not torch.isfinite(logits).all():
                raise TeacherCacheError("the teacher produced non-finite logits; refusing to cache them")
            top_values, top_classes, fill = topk_compress(logits, topk)
            if not stored:
                c = logits.shape[-1]
                stored["values"] = torch.zeros(t_count, n, views, topk, dtype=VALUE_DTYPES[storage])
                stored["classes"] = torch.zeros(t_count, n, views, topk, dtype=torch.int16 if c < 2**15 else torch.int32)
                stored["fill"] = torch.zeros(t_count, n, views, dtype=torch.float32)
                stored["num_classes"] = torch.tensor(c)
            stored["values"][t, rows, cols] = top_values.to(stored["values"].dtype)
            stored["classes"][t, rows, cols] = top_classes.to(stored["classes"].dtype)
            stored["fill"][t, rows, cols] = fill
        pending.clear()

    for index, data in _encoded(dataset):
        try:
            crops = [decode_sample(data, transform, True, cache_rng(seed, index, v), dataset.decoder, dataset.reduce)
                     for v in range(views)]
        except Exception as exc:  # the same files training drops and counts
            log.warning("teacher cache: cannot decode sample %d: %s", index, exc)
            skipped.append(index)
            continue
        for v, (image, p) in enumerate(crops):
            params[index, v] = p.round().to(torch.int32)
            pending.append((index, v, image))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not stored:
        raise ConfigError("no readable images to cache")
    num_classes = int(stored.pop("num_classes"))
    if storage == "fp16" and stored["values"].float().abs().max() >= torch.finfo(torch.float16).max:
        raise TeacherCacheError("teacher logits exceed the float16 range; use --storage fp32")
    tensors = {"params": params, **stored}
    manifest = {
        **_expected(distiller, dataset, augment),
        "views": views, "seed": seed, "topk": topk, "storage": storage, "num_classes": num_classes,
        "skipped": skipped, "build_seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__,
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    atomic_write(folder / "tensors.safetensors", lambda tmp: save_file(tensors, str(tmp)), "teacher cache")
    atomic_write_json(folder / MANIFEST, manifest, "teacher cache manifest")
    return CropCache(manifest, params, stored["values"], stored["classes"], stored["fill"])


def is_crop_cache(path: str | Path) -> bool:
    """True when ``path`` holds a crop cache (its manifest's format), False for anything else."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def load_crop_cache(path: str | Path, distiller: Any, dataset: Any, augment: BatchAugment) -> CropCache:
    """Open the crop cache at ``path`` and check it was built for these teachers, data, transform and decoder."""
    folder = Path(path)
    rebuild = "; rebuild it with kdistill cache-teacher"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherCacheError(f"teacher.cache={str(path)!r}: no readable {MANIFEST} ({exc}){rebuild}") from exc
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{str(path)!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    check_crop_cache_usable(distiller, dataset)
    expected = _expected(distiller, dataset, augment)
    for key, what in (("teachers", "teachers (weights or input normalisation)"), ("data", "training data"),
                      ("transform", "transform"), ("decoder", "decoder"), ("normalize", "normalisation"),
                      ("teacher_precision", "teacher precision")):
        if manifest[key] != expected[key]:
            raise TeacherCacheError(f"teacher cache {str(path)!r} was built for other {what}: {manifest[key]} in the "
                                    f"cache, {expected[key]} in this run{rebuild}")
    try:
        tensors = load_file(str(folder / "tensors.safetensors"))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise TeacherCacheError(f"teacher cache {str(path)!r}: cannot read tensors.safetensors ({exc}){rebuild}") from exc
    cache = CropCache(manifest, tensors["params"], tensors["values"], tensors["classes"], tensors["fill"])
    if cache.params.shape[:2] != (split_size(dataset), manifest["views"]) or cache.values.shape[0] != len(expected["teachers"]):
        raise TeacherCacheError(f"teacher cache {str(path)!r}: tensor shapes do not match its manifest{rebuild}")
    return cache
