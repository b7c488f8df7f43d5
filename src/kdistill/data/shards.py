"""Image folders packed into LitData shards, streamed from local disk or object storage.

``pack_folder`` writes every split of ``<folder>/<split>/<class>/<file>`` as LitData chunks (Lightning's streaming
format: ``<out>/<split>/index.json`` + ``chunk-*.bin``): one sample is the file's encoded bytes as they are (JPEG,
PNG, ...), its class index and its index in the split's sorted listing; ``<out>/kdistill.json`` records the class
names and counts. Nothing is decoded while packing, so a damaged file is found, dropped from its batch and counted
when training reads it, as streamed folders do.

``ShardDataset`` reads one split: LitData hands each DDP rank and each DataLoader worker a disjoint share of the
chunks (shuffled per epoch by seed), downloads remote chunks ahead of use into a local cache, and the worker decodes
the bytes with the transform by name (``decode_sample``: DCT-scaled JPEG decoding, random resized crop + flip, or the
evaluation crop). A sample's crop is a function of ``(seed, epoch, index)`` (``sample_rng``), so it does not depend on
the worker or rank that reads it. ``ShardLoader`` is LitData's ``StreamingDataLoader``: its ``state_dict`` (saved in
Lightning's checkpoints with the fit loop) lets a run killed mid-epoch continue at the first batch it had not trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import litdata
import torch
from litdata.streaming.fs_provider import _get_fs_provider
from torch import Tensor

from kdistill.data.crops import FixedCrop
from kdistill.data.decode import decode_sample, resolve_decoder
from kdistill.data.folders import _list_split
from kdistill.data.transforms import ImageTransform, sample_rng
from kdistill.files import atomic_write_text
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)

FORMAT = "kdistill-shards/1"
META = "kdistill.json"
SPLITS = ("train", "val", "test")


def is_url(root: str | os.PathLike[str]) -> bool:
    """True for object-storage addresses (``s3://``, ``gs://``, ``azure://`` ...), False for local paths."""
    return "://" in str(root)


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else str(Path(root, *parts))


def _pack_item(item: tuple[int, str, int]) -> dict[str, Any]:
    """One sample as stored: the file's bytes unchanged, its label and its index (run in LitData's workers)."""
    index, path, label = item
    with open(path, "rb") as f:
        return {"index": index, "label": label, "image": f.read()}


def _write_meta(out: str, meta: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    text = json.dumps(meta, indent=2)
    if not is_url(out):
        atomic_write_text(Path(out) / META, text, "shard metadata")
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / META
        local.write_text(text)
        _get_fs_provider(out, storage_options).upload_file(str(local), _join(out, META))


def read_meta(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``kdistill.json`` of packed shards at ``root`` (a folder or an object-storage URL)."""
    try:
        if is_url(root):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / META
                _get_fs_provider(root, storage_options).download_file(_join(root, META), str(local))
                text = local.read_text()
        else:
            text = (Path(root) / META).read_text()
        meta = json.loads(text)
    except Exception as exc:  # missing file, no access, damaged JSON: all mean "not packed shards"
        raise ConfigError(f"data.root {root!r} holds no packed shards ({META}: {exc}); "
                          "make them with: kdistill pack <image folder> --out DIR") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{_join(root, META)!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def pack_folder(
    folder: str | Path,
    out: str,
    chunk_mb: float = 64,
    workers: int = 1,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pack ``folder``'s splits (``train``, and ``val`` and/or ``test`` when present; training needs one) into LitData shards under ``out`` (a new
    or empty local folder, or an object-storage URL) and return the metadata written to ``out/kdistill.json``."""
    base = Path(folder)
    if not (base / "train").is_dir():
        raise ConfigError(f"{str(folder)!r} has no train/ folder (expected <folder>/train/<class>/<image>)")
    if chunk_mb <= 0:
        raise ConfigError(f"--chunk-mb must be > 0, got {chunk_mb}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not is_url(out) and Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"--out {out!r} exists and is not empty; packing never overwrites: choose a new folder")
    classes, _ = _list_split(base / "train")
    meta: dict[str, Any] = {"format": FORMAT, "classes": classes, "source": str(base.resolve()), "splits": {}}
    for split in SPLITS:
        if not (base / split).is_dir():
            continue
        _, files = _list_split(base / split, classes)
        items = [(i, str(path), label) for i, (path, label) in enumerate(files)]
        start_method = multiprocessing.get_start_method(allow_none=True)
        try:
            litdata.optimize(fn=_pack_item, inputs=items, output_dir=_join(out, split),
                             chunk_bytes=int(chunk_mb * 2**20), num_workers=min(workers, len(items)),
                             reorder_files=False, verbose=False, storage_options=storage_options or {})
        finally:  # LitData forces the process-wide start method to spawn; DataLoaders started later keep theirs
            multiprocessing.set_start_method(start_method, force=True)
        meta["splits"][split] = {"count": len(items), "bytes": sum(p.stat().st_size for p, _ in files)}
    _write_meta(out, meta, storage_options)
    return meta


class ShardDataset(litdata.StreamingDataset):
    """One packed split (module docstring). Items are ``(uint8 crop, label, index, crop params)``, or ``None`` for
    bytes that do not decode (the loader drops and counts them).

    ``views``: with a teacher cache of stored crops (``RandomResizedCrop`` views), a callable ``(index, epoch) ->
    params`` that picks one of the stored crops of the sample instead of drawing a new one.
    """

    def __init__(self, input_dir: str, transform: ImageTransform, train: bool, seed: int = 0, decoder: str = "auto",
                 cache_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                 shuffle: bool | None = None, drop_last: bool | None = None, reduce: bool = True):
        super().__init__(input_dir, cache_dir=cache_dir, shuffle=train if shuffle is None else shuffle,
                         drop_last=drop_last, seed=seed, storage_options=storage_options or {})
        self.image_transform, self.train, self.crop_seed = transform, train, seed
        self.decoder, self.reduce = resolve_decoder(decoder), reduce
        self.views: Callable[[int, int], Tensor] | None = None

    is_shards = True  # what ``kdistill.data.make_loader`` dispatches on (no LitData import needed there)

    def set_distributed(self, rank: int, world_size: int, num_nodes: int = 1) -> None:
        """Read rank ``rank``'s share of ``world_size``: the data set may be built before the process group exists
        (LitData reads the environment once, at construction). Training shares are cut to equal lengths (no rank
        waits for another at a collective); evaluation shares keep every sample once."""
        from litdata.utilities.env import _DistributedEnv

        self.distributed_env = _DistributedEnv(world_size, rank, num_nodes)
        self.shuffler = None  # rebuilt for the new shares
        if self.train:
            self.set_drop_last(world_size > 1)

    @property
    def split_size(self) -> int:
        """Every sample of the split, whatever this rank's share (``len`` is the share under DDP)."""
        return sum(end - start for start, end in self.region_of_interest)

    @property
    def epoch(self) -> int:
        """The 0-based epoch being read (LitData counts from 1)."""
        return max(int(self.current_epoch) - 1, 0)

    @property
    def output_size(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of the samples: the transform's size, or the first image's own size."""
        if self.image_transform.size is not None:
            return (3, self.image_transform.size, self.image_transform.size)
        image, _ = self.decode(bytes(self.raw(0)["image"]), 0, 0)
        return tuple(image.shape)  # type: ignore[return-value]

    def raw(self, position: int) -> dict[str, Any]:
        """The stored sample at ``position`` of the split's chunks, undecoded."""
        return super().__getitem__(position)

    def decode(self, data: bytes, index: int, epoch: int) -> tuple[Tensor, Tensor]:
        """The crop of sample ``index`` in ``epoch`` from its encoded bytes, and its parameters."""
        transform: Any = self.image_transform
        rng = None
        if self.train and self.views is not None:
            transform = FixedCrop(self.image_transform, self.views(index, epoch))
        elif self.train and self.image_transform.per_sample_augment:
            rng = sample_rng(self.crop_seed, epoch, index)
        return decode_sample(data, transform, self.train, rng, self.decoder, self.reduce)

    def __getitem__(self, key: Any) -> tuple[Tensor, int, int, Tensor] | None:
        item = super().__getitem__(key)
        index, label = int(item["index"]), int(item["label"])
        try:
            image, params = self.decode(bytes(item["image"]), index, self.epoch)
        except Exception as exc:  # damaged bytes (a truncated JPEG ...): dropped from the batch and counted
            log.warning("cannot decode sample %d of %s: %s", index, self.input_dir.path or self.input_dir.url, exc)
            return None
        return image, label, index, params


def collate_samples(samples: Sequence[tuple[Tensor, int, int, Tensor] | None]) -> tuple[Tensor, ...]:
    """Stack the decodable samples: ``(uint8 images, targets, indices, crop params, number dropped)``."""
    good = [s for s in samples if s is not None]
    dropped = torch.tensor(len(samples) - len(good))
    if not good:
        return (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                torch.empty(0, 5, dtype=torch.float64), dropped)
    return (torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.long),
            torch.tensor([s[2] for s in good], dtype=torch.long), torch.stack([s[3] for s in good]), dropped)


class ShardLoader(litdata.StreamingDataLoader):
    """Batches of a ``ShardDataset``: ``(uint8 images, targets, indices)``, plus the crop parameters with
    ``with_params``. Undecodable samples are dropped and counted in ``bad_images``.

    ``progress`` returns how many batches of the current epoch were trained on: the trainer fetches ahead of the
    step it runs, so the loader's own count is one batch ahead when a checkpoint is written; ``state_dict`` records
    the trained count, and a resumed run continues exactly after it.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int = 0, with_params: bool = False,
                 progress: Callable[[], int] | None = None):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
                         persistent_workers=False)
        self.with_params, self.progress = with_params, progress
        self.bad_images = 0

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for images, targets, index, params, dropped in super().__iter__():
            if int(dropped):
                self.bad_images += int(dropped)
                log.warning("dropped %d undecodable images from a batch (%d so far)", int(dropped), self.bad_images)
            if len(targets) == 0:
                continue
            yield (images, targets, index, params) if self.with_params else (images, targets, index)

    def state_dict(self) -> dict[str, Any]:
        """LitData's loader state as of the last trained batch, and the count of dropped images."""
        if self.progress is not None:
            done = int(self.progress())
            self._num_samples_yielded_streaming = done * self.batch_size
            self._latest_worker_idx = (done - 1) % max(self.num_workers, 1) if done else 0
        return {**super().state_dict(), "bad_images": self.bad_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_images = int(state.get("bad_images", 0))
        super().load_state_dict({k: v for k, v in state.items() if k != "bad_images"})


def make_shard_loader(
    dataset: ShardDataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    progress: Callable[[], int] | None = None,
    with_params: bool = False,
    num_nodes: int = 1,
) -> ShardLoader:
    """A ``ShardLoader`` over rank ``rank``'s share of ``dataset``.

    LitData hands whole batches to the ranks (the remainder to the last one): a split of fewer than ``world_size``
    batches leaves some ranks with nothing, which Lightning cannot run, so that is refused with the batch size to use.
    """
    n = dataset.split_size
    if world_size > 1 and n // batch_size < world_size:
        key = "data.batch_size" if dataset.train else "data.eval_batch_size"
        raise ConfigError(f"{n} {'training' if dataset.train else 'evaluation'} samples in batches of {batch_size} "
                          f"leave some of the {world_size} processes without a batch (shards are shared out by whole "
                          f"batches): set {key} to at most {n // world_size}")
    dataset.set_distributed(rank, world_size, num_nodes)
    return ShardLoader(dataset, batch_size, num_workers, with_params=with_params, progress=progress)


def open_shards(
    root: str,
    transform: ImageTransform,
    seed: int = 0,
    decoder: str = "auto",
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[ShardDataset, ShardDataset, list[str]]:
    """The train split and the val (or test) split of the shards at ``root``, and the class names."""
    if decoder == "gpu":
        raise ConfigError("data.decoder=gpu decodes batches of image files in the main process; shards decode in the "
                          "DataLoader workers: use data.decoder=auto, simplejpeg, pil or torchvision")
    meta = read_meta(root, storage_options)
    evaluation = next((s for s in ("val", "test") if s in meta["splits"]), None)
    if "train" not in meta["splits"] or evaluation is None:
        raise ConfigError(f"shards at {root!r} need a train split and a val or test split; found {list(meta['splits'])}")
    cache = None
    if is_url(root):
        from kdistill.data.folders import default_cache_dir

        key = hashlib.sha256(root.encode()).hexdigest()[:16]  # one local cache per remote data set
        cache = str(Path(cache_dir or default_cache_dir()) / "shards" / key)
    train = ShardDataset(_join(root, "train"), transform, True, seed, decoder, _sub(cache, "train"), storage_options)
    # every evaluation sample exactly once over all ranks, in order
    val = ShardDataset(_join(root, evaluation), transform, False, seed, decoder, _sub(cache, evaluation),
                       storage_options, shuffle=False, drop_last=False)
    return train, val, list(meta["classes"])


def shard_stats(dataset: ShardDataset, sample: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Channel mean and standard deviation of the evaluation crops of up to ``sample`` images of a split (chosen
    by ``seed`` among all of the split's samples, whichever DDP rank asks): a whole pass over a large split only for
    its statistics would cost an epoch."""
    import random

    from kdistill.data.tensors import ImageTensors

    n = dataset.split_size  # the whole split: every rank measures the same statistics as one process does
    rows = sorted(random.Random(seed).sample(range(n), min(sample, n)))
    images = []
    for position in rows:
        item = dataset.raw(position)
        try:
            image, _ = decode_sample(bytes(item["image"]), dataset.image_transform, False, None, dataset.decoder)
        except Exception:  # counted when training reads it
            continue
        images.append(image)
    if not images:
        raise ConfigError(f"none of {len(rows)} sampled images of {dataset.input_dir.path or dataset.input_dir.url} "
                          "could be decoded")
    return ImageTensors(torch.stack(images), torch.zeros(len(images), dtype=torch.long)).channel_stats()


def _sub(cache: str | None, split: str) -> str | None:
    return None if cache is None else str(Path(cache, split))
