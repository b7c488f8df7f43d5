"""Image folders read per sample: decoded in DataLoader worker processes, memory bounded whatever the set size.

``scan_folder`` lists ``<split>/<class>/<file>`` once, reads every file's header in parallel (size; unreadable files are
skipped and counted, as the in-memory path does) and caches the listing. ``StreamingFolder`` decodes one file per
sample (``decode_sample``: DCT-scaled JPEG decoding, the transform's crop); ``MemoryFolder`` holds the decoded images
of a split at full size in one shared uint8 buffer and only cuts crops (the in-memory path for per-sample transforms).
Both take keys ``(index, epoch)``: a sample's crop is a function of ``(seed, epoch, index)`` alone
(``sample_rng``), so it does not depend on which worker or rank reads it, and a resumed run draws the same crops.

``StreamingLoader`` batches them: each rank reads a disjoint share of a seeded permutation (``BatchSampler``), workers
return uint8 batches (normalisation happens on the device), and the loader's ``state_dict`` records the epoch and the
batches already trained on, so a run killed mid-epoch resumes at the next unseen batch. A file that fails to decode
inside a worker (a truncated JPEG) is dropped from its batch, counted in ``bad_images`` and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.crops import FixedCrop
from kdistill.data.decode import decode_batch, decode_sample, decode_threads, gpu_device, resolve_decoder
from kdistill.data.folders import _list_split, default_cache_dir
from kdistill.data.image_modes import to_rgb
from kdistill.data.tensors import BatchSampler, ImageTensors
from kdistill.data.transforms import ImageTransform, sample_rng
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)


@dataclass
class FolderFiles:
    """The readable files of a split: paths, targets, ``(width, height)`` of each, class names, skipped files."""

    paths: list[str]
    targets: Tensor
    sizes: Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def decoded_bytes(self, transform: ImageTransform, train: bool) -> int:
        """Bytes the split takes decoded in memory: full-size images when training crops are drawn per sample,
        else one output-size image each."""
        if train and transform.per_sample_augment:
            return int((self.sizes[:, 0].long() * self.sizes[:, 1].long()).sum().item()) * 3
        if transform.size is not None:
            return len(self) * 3 * transform.size * transform.size
        return int((self.sizes[:, 0].long() * self.sizes[:, 1].long()).sum().item()) * 3


def _header(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "JPEG":  # JPEG: the header is enough here; decoding checks the rest
                im.verify()
            return im.size
    except Exception:  # Pillow raises many types for broken files
        return None


def _listing_key(files: list[tuple[Path, int]]) -> str:
    h = hashlib.sha256(b"listing v1")
    for path, label in files:
        st = path.stat()
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def scan_folder(
    split_dir: str | Path,
    classes: list[str] | None = None,
    on_bad_image: str = "skip",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> FolderFiles:
    """List a split and read every header in parallel; unreadable files are skipped and counted (``"skip"``) or
    raise (``"error"``). The listing is cached under ``cache_dir`` keyed by paths, sizes and mtimes."""
    if on_bad_image not in ("skip", "error"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    split_dir = Path(split_dir)
    found, files = _list_split(split_dir, classes)
    cache = Path(cache_dir or default_cache_dir()) / "listings"
    cached = cache / f"{split_dir.name}-{_listing_key(files)}.json"
    if cached.is_file():
        blob = json.loads(cached.read_text())
        skipped = blob["skipped"]
        if skipped and on_bad_image == "error":
            raise ConfigError(f"cannot read image {skipped[0]!r}")
        return FolderFiles(blob["paths"], torch.tensor(blob["targets"], dtype=torch.long),
                           torch.tensor(blob["sizes"], dtype=torch.int32).view(-1, 2), found, skipped)
    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        headers = list(pool.map(_header, [str(p) for p, _ in files], chunksize=256))
    paths, targets, sizes, skipped = [], [], [], []
    for (path, label), size in zip(files, headers, strict=True):
        if size is None:
            if on_bad_image == "error":
                raise ConfigError(f"cannot read image {str(path)!r}")
            skipped.append(str(path))
            continue
        paths.append(str(path))
        targets.append(label)
        sizes.append(size)
    if skipped:
        log.warning("skipped %d unreadable images in %s (first: %s)", len(skipped), split_dir, skipped[0])
    if not paths:
        raise ConfigError(f"no readable images in {str(split_dir)!r}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"paths": paths, "targets": targets, "sizes": [v for s in sizes for v in s],
                                   "skipped": skipped}))
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only cache only costs the next start-up time
        log.warning("could not write the folder listing cache %s: %s", cached, exc)
    return FolderFiles(paths, torch.tensor(targets, dtype=torch.long), torch.tensor(sizes, dtype=torch.int32).view(-1, 2),
                       found, skipped)


class StreamingFolder(torch.utils.data.Dataset):
    """Decodes one file per sample (module docstring). Keys are ``(index, epoch)`` pairs."""

    def __init__(self, files: FolderFiles, transform: ImageTransform, train: bool, seed: int = 0,
                 decoder: str = "auto", reduce: bool = True, on_bad_image: str = "skip"):
        self.files, self.transform, self.train, self.seed = files, transform, train, seed
        self.decoder, self.reduce, self.on_bad_image = resolve_decoder(decoder), reduce, on_bad_image
        # one fixed-width byte array, not a list of str: forked workers that read a list touch each item's
        # reference count and so copy its memory page by page (per worker, for millions of paths)
        self.paths = np.array([p.encode() for p in files.paths]) if len(files) else np.array([], dtype="S1")
        # with a teacher cache of stored crops: (index, epoch) -> the stored crop to cut (kdistill.engine.crop_cache)
        self.views: Callable[[int, int], Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def targets(self) -> Tensor:
        return self.files.targets

    @property
    def output_size(self) -> tuple[int, int, int]:
        w, h = (int(v) for v in self.files.sizes[0])
        return (3, *self.transform.output_size(w, h))

    def _rng(self, index: int, epoch: int):
        return sample_rng(self.seed, epoch, index) if self.train and self.transform.per_sample_augment else None

    def load(self, index: int, epoch: int = 0) -> tuple[Tensor, Tensor]:
        """The crop of sample ``index`` in ``epoch`` and its parameters; raises if the file cannot be decoded.
        With the ``gpu`` decoder: the file's bytes (a 1-D uint8 tensor), decoded later by the loader."""
        with open(self.paths[index].decode(), "rb") as f:
            data = f.read()
        transform: Any = self.transform
        if self.train and self.views is not None:
            transform = FixedCrop(self.transform, self.views(index, epoch))
        if self.decoder == "gpu":
            w, h = (int(v) for v in self.files.sizes[index])
            params = transform.params(w, h, self.train, self._rng(index, epoch))
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), params
        return decode_sample(data, transform, self.train, self._rng(index, epoch), self.decoder, self.reduce)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[Tensor, int, int, Tensor] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            image, params = self.load(index, epoch)
        except Exception as exc:  # a file damaged after the scan (truncated JPEG ...): dropped and counted
            if self.on_bad_image == "error":
                raise ConfigError(f"cannot read image {self.files.paths[index]!r}: {exc}") from exc
            log.warning("cannot decode %s: %s", self.files.paths[index], exc)
            return None
        return image, int(self.files.targets[index]), index, params


class MemoryFolder(StreamingFolder):
    """The split decoded once at full size (in parallel) into one shared uint8 buffer; samples are only cropped.
    Files that fail to decode are left out and added to ``files.skipped`` (or raise with ``on_bad_image="error"``)."""

    def __init__(self, files: FolderFiles, transform: ImageTransform, train: bool, seed: int = 0,
                 decoder: str = "auto", on_bad_image: str = "skip", threads: int | None = None):
        super().__init__(files, transform, train, seed, decoder, reduce=False, on_bad_image=on_bad_image)
        with ThreadPoolExecutor(threads or decode_threads()) as pool:
            decoded = list(pool.map(self._decode_full, range(len(files)), chunksize=16))
        bad = [i for i, d in enumerate(decoded) if isinstance(d, str)]
        if bad and on_bad_image == "error":
            raise ConfigError(f"cannot read image {files.paths[bad[0]]!r}: {decoded[bad[0]]}")
        if bad:
            log.warning("skipped %d undecodable images (first: %s)", len(bad), files.paths[bad[0]])
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            self.files = FolderFiles([files.paths[i] for i in good], files.targets[good], files.sizes[good],
                                     files.classes, files.skipped + [files.paths[i] for i in bad])
            self.paths = self.paths[good]
            decoded = [decoded[i] for i in good]
        counts = torch.tensor([d.numel() for d in decoded], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.buffer = torch.cat([d.reshape(-1) for d in decoded]) if decoded else torch.empty(0, dtype=torch.uint8)
        self.buffer.share_memory_()  # worker processes read it without copies

    def _decode_full(self, i: int) -> Tensor | str:
        from PIL import Image

        try:
            with Image.open(self.files.paths[i]) as im:
                rgb = to_rgb(im)
                if rgb.size != tuple(int(v) for v in self.files.sizes[i]):
                    return f"decoded size {rgb.size} differs from the header's"
                return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        except Exception as exc:  # Pillow raises many types for broken files
            return str(exc) or type(exc).__name__

    def image(self, index: int) -> Tensor:
        """The decoded ``H×W×3`` uint8 image ``index`` (a view of the buffer)."""
        w, h = (int(v) for v in self.files.sizes[index])
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].view(h, w, 3)

    def load(self, index: int, epoch: int = 0) -> tuple[Tensor, Tensor]:
        w, h = (int(v) for v in self.files.sizes[index])
        if self.train and self.views is not None:
            params = self.views(index, epoch)
        else:
            params = self.transform.params(w, h, self.train, self._rng(index, epoch))
        return self.transform.apply(self.image(index).numpy(), params), params


def decode_to_tensors(dataset: StreamingFolder, threads: int | None = None) -> tuple[ImageTensors, list[str]]:
    """Every sample of ``dataset`` (evaluation crops, or ``cifar``'s fixed-size images) decoded in parallel into
    one ``ImageTensors`` (the in-memory form of a split whose images all come out at one size), and the files that
    could not be decoded (left out; they raise with ``on_bad_image="error"``)."""
    c, h, w = dataset.output_size
    images = torch.empty(len(dataset), c, h, w, dtype=torch.uint8)

    def fill(i: int) -> str | None:
        try:
            image, _ = dataset.load(i, 0)
        except Exception as exc:  # Pillow raises many types for broken files
            if dataset.on_bad_image == "error":
                raise ConfigError(f"cannot read image {dataset.files.paths[i]!r}: {exc}") from exc
            return "bad"
        if image.shape != images.shape[1:]:
            raise ConfigError(f"image {dataset.files.paths[i]!r} is {tuple(image.shape)} but earlier ones are "
                              f"{tuple(images.shape[1:])}; set data.image_size to resize all images")
        images[i] = image
        return None

    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        failed = [i for i, e in enumerate(pool.map(fill, range(len(dataset)), chunksize=16)) if e is not None]
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[failed] = False
    if failed:
        log.warning("skipped %d undecodable images (first: %s)", len(failed), dataset.files.paths[failed[0]])
    if failed:
        images = images[keep]
    return ImageTensors(images, dataset.targets[keep].clone()), [dataset.files.paths[i] for i in failed]


def collate(samples: Sequence[tuple[Tensor, int, int, Tensor] | None]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Stack the decodable samples: ``(uint8 images, targets, indices, crop params, number dropped)``."""
    good = [s for s in samples if s is not None]
    dropped = len(samples) - len(good)
    if not good:
        return (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                torch.empty(0, 5, dtype=torch.float64), dropped)
    if good[0][0].dim() == 1:  # encoded files for the gpu decoder: decoded by the loader
        images: Tensor | list[Tensor] = [s[0] for s in good]
    else:  # in a worker: stacked straight into shared memory
        images = torch.utils.data.default_collate([s[0] for s in good])
    targets = torch.tensor([s[1] for s in good], dtype=torch.long)
    index = torch.tensor([s[2] for s in good], dtype=torch.long)
    return images, targets, index, torch.stack([s[3] for s in good]), dropped


class EpochBatches(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """``BatchSampler``'s batches (or, for evaluation, rank ``rank``'s rows in order, unpadded) as ``(index, epoch)``
    keys, starting after ``skip`` batches once (a resumed epoch)."""

    def __init__(self, size: int, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.train = train
        self.inner = BatchSampler(size, batch_size, shuffle=train, drop_last=train and size >= batch_size * world_size,
                                  seed=seed, rank=rank, world_size=world_size)
        self.rows = list(range(rank, size, world_size))
        self.batch_size = batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.inner.epoch = epoch

    @property
    def sampler(self) -> EpochBatches:
        """Itself: Lightning starts each epoch with ``loader.sampler.set_epoch`` and
        ``loader.batch_sampler.sampler.set_epoch``, never ``loader.batch_sampler.set_epoch``; without this every epoch
        would repeat epoch 0's order and crops."""
        return self

    def __len__(self) -> int:
        return len(self.inner) if self.train else -(-len(self.rows) // self.batch_size)

    def batches(self) -> Iterator[list[int]]:
        if self.train:
            yield from self.inner
        else:
            for start in range(0, len(self.rows), self.batch_size):
                yield self.rows[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self.skip = self.skip, 0
        for b, batch in enumerate(self.batches()):
            if b >= skip:
                yield [(i, self.epoch) for i in batch]


class StreamingLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ``StreamingFolder`` yielding ``(uint8 images, targets, indices)`` (plus the crop
    parameters with ``with_params``), resumable mid-epoch (module docstring).

    ``progress`` returns how many batches of the current epoch training has consumed (the trainer's count: the
    loader itself runs ahead by its prefetch); ``state_dict`` stores it with the epoch.
    """

    def __init__(self, dataset: StreamingFolder, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, with_params: bool = False,
                 progress: Callable[[], int] | None = None, prefetch_factor: int = 2):
        self.epoch_batches = EpochBatches(len(dataset), batch_size, train, seed, rank, world_size)
        extra: dict[str, Any] = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers else {}
        super().__init__(dataset, batch_sampler=self.epoch_batches, num_workers=num_workers, collate_fn=collate,
                         generator=torch.Generator().manual_seed(seed), **extra)
        self.with_params, self.progress = with_params, progress
        self.bad_images = 0
        self._yielded = 0

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        self._yielded = self.epoch_batches.skip
        for images, targets, index, params, dropped in super().__iter__():
            self._yielded += 1
            if isinstance(images, list):
                images, targets, index, params, bad = self._decode_on_device(images, targets, index, params)
                dropped += bad
            if dropped:
                self.bad_images += dropped
                log.warning("dropped %d undecodable images from a batch (%d so far)", dropped, self.bad_images)
            if len(targets) == 0:
                continue
            yield (images, targets, index, params) if self.with_params else (images, targets, index)

    def _decode_on_device(self, files: list[Tensor], targets: Tensor, index: Tensor,
                          params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """``gpu`` decoder: the batch decoded on this process's GPU (the CPU without one); undecodable files are
        found one by one and dropped."""
        device, transform = gpu_device(), self.dataset.transform
        try:
            return decode_batch(files, params, transform, device), targets, index, params, 0
        except Exception:  # one damaged file fails the whole batch: decode one by one to drop only the bad ones
            good, images = [], []
            for k, f in enumerate(files):
                try:
                    images.append(decode_batch([f], params[k : k + 1], transform, device)[0])
                    good.append(k)
                except Exception as exc:
                    if self.dataset.on_bad_image == "error":
                        raise ConfigError(f"cannot read image {self.dataset.files.paths[int(index[k])]!r}: {exc}") from exc
            if not good:
                return torch.empty(0, dtype=torch.uint8), targets[:0], index[:0], params[:0], len(files)
            return torch.stack(images), targets[good], index[good], params[good], len(files) - len(good)

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches were trained on."""
        done = self.progress() if self.progress is not None else self._yielded
        return {"epoch": self.epoch_batches.epoch, "batches": int(done), "bad_images": self.bad_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its trained batches (a state saved at the end of an epoch skips nothing)."""
        self.bad_images = int(state.get("bad_images", 0))
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self.epoch_batches.skip = 0
        if batches < len(self.epoch_batches):
            self.epoch_batches.set_epoch(epoch)
            self.epoch_batches.skip = batches
