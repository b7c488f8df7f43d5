"""Teacher-output cache for logit methods (KD, DKD, MEAL V2): logits of K augmented views per image.

docs/speed.md. For every training image ``i`` and view ``v < K`` the cache holds the augmentation
parameters ``p[i, v] = (dy, dx, flip)`` of ``BatchAugment`` and the teacher logits of exactly that
view. During training each sample of a batch draws one of its K views; the student sees
``augment.apply(image, p[i, v])`` and the method gets the cached logits of the same ``(i, v)``, so
the cache never pairs a view with the logits of another one (caching by index alone is wrong under
random augmentation). With K views the augmentation of a run is restricted to K draws per image.

Storage (``storage``): ``fp32`` (exact), ``fp16`` (2 bytes a logit; relative error ≤ 2⁻¹¹ of a
logit's magnitude), or ``topk`` (the k largest logits in fp16 with their classes; every other
class gets the mean of the remaining logits — approximate, for data sets with many classes).
Files are safetensors (no pickle); ``manifest.json`` is written last and records fingerprints of
the teachers (parameters and buffers, also their input normalisation), of the training images and
targets, of the augmentation, and the teacher precision, so a changed teacher or data set is
rejected with a clear error instead of silently training on stale targets.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdistill.data import BatchAugment, ImageTensors
from kdistill.files import atomic_write, atomic_write_json
from kdistill.methods.base import Batch, ModelOutput
from kdistill.step import Distiller
from kdistill.utils import ConfigError, unknown_name_error

FORMAT = "kdistill-teacher-cache/1"
STORAGES = ("fp16", "fp32", "topk")
MANIFEST = "manifest.json"


class TeacherCacheError(ConfigError):
    """The cache is missing, damaged, or was built for another teacher, data set or augmentation."""


def _hash_tensors(named: Sequence[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (also non-persistent ones) by name, dtype and shape."""
    named = [*module.named_parameters(), *((f"buffer:{n}", b) for n, b in module.named_buffers())]
    return _hash_tensors(sorted(named, key=lambda kv: kv[0]))


def data_fingerprint(data: ImageTensors) -> str:
    """sha256 over the uint8 training images and their targets (row order matters: rows are the keys)."""
    return _hash_tensors([("images", data.images), ("targets", data.targets)])


def augment_description(augment: BatchAugment) -> dict[str, Any]:
    """What decides a view's pixels: padding, flip and the normalisation the teacher input starts from."""
    return {
        "padding": augment.padding,
        "flip": bool(augment.flip),
        "mean": [round(float(v), 8) for v in augment.mean.flatten()],
        "std": [round(float(v), 8) for v in augment.std.flatten()],
    }


def _teacher_descriptions(distiller: Distiller) -> list[dict[str, Any]]:
    return [
        {
            "model": getattr(t, "kdistill_name", "") or type(t).__name__,
            "weights_sha256": module_fingerprint(t),
            "input_sha256": module_fingerprint(inp),
        }
        for t, inp in zip(distiller.teachers, distiller.teacher_inputs, strict=True)
    ]


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclass
class TeacherCache:
    """Cached teacher logits of ``K`` views of ``N`` images for ``T`` teachers (see the module docstring).

    ``params`` N×K×3 (dy, dx, flip); ``values`` T×N×K×C (``fp16``/``fp32``) or T×N×K×k (``topk``);
    ``classes`` T×N×K×k and ``fill`` T×N×K for ``topk``.
    """

    manifest: dict[str, Any]
    params: Tensor
    values: Tensor
    classes: Tensor | None = None
    fill: Tensor | None = None

    @property
    def views(self) -> int:
        return self.params.shape[1]

    @property
    def num_teachers(self) -> int:
        return self.values.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """One view per sample, uniformly among the K cached ones (global RNG unless ``generator``)."""
        return torch.randint(0, self.views, (n,), generator=generator)

    def view_params(self, index: Tensor, view: Tensor) -> Tensor:
        """The (dy, dx, flip) of view ``view[b]`` of image ``index[b]``: a B×3 int64 tensor."""
        return self.params[index.cpu(), view.cpu()].long()

    def logits(self, teacher: int, index: Tensor, view: Tensor) -> Tensor:
        """Float32 B×C logits of teacher ``teacher`` for views ``view`` of images ``index``."""
        i, v = index.cpu(), view.cpu()
        stored = self.values[teacher, i, v].float()
        if self.classes is None:
            return stored
        fill = self.fill[teacher, i, v].float()  # type: ignore[index]
        full = fill.view(-1, 1).expand(len(i), self.num_classes).clone()
        return full.scatter_(1, self.classes[teacher, i, v].long(), stored)  # type: ignore[index]

    def training_batch(
        self,
        batch: Batch,
        augment: BatchAugment,
        teachers: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> tuple[Batch, list[ModelOutput]]:
        """From a batch of uint8 images and their indices: the student batch augmented with the drawn
        cached views, and the cached logits of exactly those views for ``teachers``."""
        if batch.index is None:
            raise ValueError("the teacher cache needs the dataset indices of the batch (Batch.index)")
        view = self.draw_views(len(batch.index), generator)
        params = self.view_params(batch.index, view).to(batch.images.device)
        images = augment.normalize(augment.apply(batch.images, params))
        device = images.device
        outputs = [ModelOutput(self.logits(t, batch.index, view).to(device)) for t in teachers]
        return Batch(images, batch.targets, batch.index), outputs


class CachedTeachers:
    """A ``TeacherSource`` (``kdistill.step``) reading a ``TeacherCache``: batches arrive as uint8
    images with their indices; each sample draws one cached view, the student trains on exactly
    that view (augmented and normalised here) and the method gets that view's cached logits."""

    def __init__(self, cache: TeacherCache, augment: BatchAugment):
        self.cache = cache
        self.augment = augment

    def __call__(self, batch: Batch, selected: Sequence[int]) -> tuple[Batch, list[ModelOutput]]:
        return self.cache.training_batch(batch, self.augment, selected)


def _check_usable(distiller: Distiller) -> None:
    if distiller.needs_teacher_features:
        raise TeacherCacheError(
            f"method {distiller.method.name!r} reads teacher features; the teacher cache holds logits only "
            "(use it with logit methods such as kd, dkd, meal_v2 with blocks [logits])"
        )


def _expected_manifest(distiller: Distiller, data: ImageTensors, augment: BatchAugment) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "teachers": _teacher_descriptions(distiller),
        "teacher_precision": distiller.teacher_precision,
        "data": {"size": len(data), "shape": list(data.images.shape[1:]), "sha256": data_fingerprint(data)},
        "augment": augment_description(augment),
    }


@torch.no_grad()
def build_teacher_cache(
    distiller: Distiller,
    data: ImageTensors,
    augment: BatchAugment,
    out: str | Path,
    views: int = 8,
    storage: str = "fp16",
    topk: int = 10,
    batch_size: int = 256,
    seed: int = 0,
) -> TeacherCache:
    """Run every teacher once on ``views`` augmented views of every image of ``data`` and store the logits.

    The views are drawn with ``augment.sample_params`` from a generator seeded with ``seed``; the
    teacher pass is ``distiller.teacher_forward`` (same normalisation, precision and memory format
    as in training). The folder ``out`` is written atomically file by file, the manifest last.
    """
    if storage not in STORAGES:
        raise unknown_name_error("teacher cache storage", storage, STORAGES)
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}")
    _check_usable(distiller)
    if not len(distiller.teachers):
        raise ConfigError("the teacher cache needs at least one teacher")
    start = time.perf_counter()
    device = _device_of(distiller)
    augment = augment.to(device)
    n = len(data)
    g = torch.Generator().manual_seed(seed)
    params = torch.stack([augment.sample_params(n, torch.device("cpu"), g) for _ in range(views)], 1)
    per_teacher = []
    for t in range(len(distiller.teachers)):
        rows = []
        for lo in range(0, n, batch_size):
            images = data.images[lo : lo + batch_size].to(device)
            per_view = []
            for v in range(views):
                x = augment.normalize(augment.apply(images, params[lo : lo + batch_size, v].to(device)))
                per_view.append(distiller.teacher_forward(t, x).logits.float().cpu())
            rows.append(torch.stack(per_view, 1))  # b×K×C
        per_teacher.append(torch.cat(rows))
    logits = torch.stack(per_teacher)  # T×N×K×C
    if not torch.isfinite(logits).all():
        raise TeacherCacheError("the teacher produced non-finite logits; refusing to cache them")
    num_classes = logits.shape[-1]
    tensors: dict[str, Tensor] = {"params": params.to(torch.int16)}
    if storage == "fp32":
        tensors["values"] = logits.contiguous()
    elif storage == "fp16":
        if logits.abs().max() > torch.finfo(torch.float16).max:
            raise TeacherCacheError("teacher logits exceed the float16 range; use --storage fp32")
        tensors["values"] = logits.half().contiguous()
    else:
        if not 1 <= topk < num_classes:
            raise ConfigError(f"--topk must be in [1, {num_classes - 1}] for {num_classes} classes, got {topk}")
        top = logits.topk(topk, dim=-1)
        rest = (logits.sum(-1) - top.values.sum(-1)) / (num_classes - topk)
        tensors["values"] = top.values.half().contiguous()
        tensors["classes"] = top.indices.to(torch.int16 if num_classes < 2**15 else torch.int32).contiguous()
        tensors["fill"] = rest.half().contiguous()
    manifest = {
        **_expected_manifest(distiller, data, augment),
        "views": views,
        "seed": seed,
        "storage": storage,
        "topk": topk if storage == "topk" else None,
        "num_classes": num_classes,
        "build_seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    atomic_write(folder / "tensors.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / MANIFEST, manifest)
    return _from_tensors(manifest, tensors)


def _from_tensors(manifest: dict[str, Any], tensors: dict[str, Tensor]) -> TeacherCache:
    return TeacherCache(manifest, tensors["params"], tensors["values"], tensors.get("classes"), tensors.get("fill"))


def _short(digest: str) -> str:
    return digest[:12]


def load_teacher_cache(
    path: str | Path, distiller: Distiller, data: ImageTensors, augment: BatchAugment
) -> TeacherCache:
    """Open the cache at ``path`` and check it belongs to these teachers, training images and augmentation."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise TeacherCacheError(
            f"teacher.cache={str(path)!r}: no {MANIFEST} there (not built, or the build did not finish); "
            "build it with: kdistill cache-teacher <recipe> [overrides] --views K --out DIR"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise TeacherCacheError(f"teacher cache manifest {str(manifest_path)!r} is damaged: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{str(manifest_path)!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_usable(distiller)
    expected = _expected_manifest(distiller, data, augment)
    rebuild = "; rebuild it with kdistill cache-teacher"
    have, want = manifest["teachers"], expected["teachers"]
    if len(have) != len(want):
        raise TeacherCacheError(f"teacher cache {str(path)!r} was built for {len(have)} teachers, the run has {len(want)}{rebuild}")
    for i, (h, w) in enumerate(zip(have, want, strict=True)):
        if h["weights_sha256"] != w["weights_sha256"]:
            raise TeacherCacheError(
                f"teacher cache {str(path)!r}: teacher {i} ({w['model']}) has different weights than when the cache "
                f"was built (sha256 {_short(w['weights_sha256'])}… now, {_short(h['weights_sha256'])}… in the cache){rebuild}"
            )
        if h["input_sha256"] != w["input_sha256"]:
            raise TeacherCacheError(f"teacher cache {str(path)!r}: teacher {i}'s input normalisation changed{rebuild}")
    hd, wd = manifest["data"], expected["data"]
    if hd != wd:
        raise TeacherCacheError(
            f"teacher cache {str(path)!r} was built on another training set ({hd['size']} images "
            f"{hd['shape']}, sha256 {_short(hd['sha256'])}…) than this run's ({wd['size']} images {wd['shape']}, "
            f"sha256 {_short(wd['sha256'])}…){rebuild}"
        )
    if manifest["augment"] != expected["augment"]:
        raise TeacherCacheError(
            f"teacher cache {str(path)!r}: augmentation/normalisation {manifest['augment']} differs from the run's "
            f"{expected['augment']}{rebuild}"
        )
    if manifest["teacher_precision"] != expected["teacher_precision"]:
        raise TeacherCacheError(
            f"teacher cache {str(path)!r} holds teacher.precision={manifest['teacher_precision']} outputs but the run "
            f"sets teacher.precision={expected['teacher_precision']}{rebuild}"
        )
    try:
        tensors = load_file(str(folder / "tensors.safetensors"))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise TeacherCacheError(f"teacher cache {str(path)!r}: cannot read tensors.safetensors ({exc}){rebuild}") from exc
    cache = _from_tensors(manifest, tensors)
    if cache.params.shape[0] != len(data) or cache.values.shape[:3] != (len(want), len(data), manifest["views"]):
        raise TeacherCacheError(f"teacher cache {str(path)!r}: tensor shapes do not match its manifest{rebuild}")
    return cache
