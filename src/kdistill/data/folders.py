"""Image folders (``<root>/<split>/<class>/<file>``) and torchvision's CIFAR, decoded once into
uint8 tensors and cached on disk (safetensors), keyed by the file list, sizes and mtimes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdistill.data.tensors import ImageTensors
from kdistill.files import atomic_write, atomic_write_text
from kdistill.utils import ConfigError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class FolderSplit:
    """A decoded split plus its class names and how many unreadable files were skipped."""

    tensors: ImageTensors
    classes: list[str]
    skipped: list[str]


def default_cache_dir() -> Path:
    """``$KDISTILL_CACHE`` or ``~/.cache/kdistill``."""
    return Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))


def _list_split(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class folders of ``split_dir`` and its ``(image path, label)`` pairs; with ``classes`` (the train
    split's), a split whose class folders differ is a ConfigError naming the differences."""
    if not split_dir.is_dir():
        raise ConfigError(f"image folder split {str(split_dir)!r} does not exist")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not names:
        raise ConfigError(f"{str(split_dir)!r} has no class sub-folders (expected <split>/<class>/<image>)")
    if classes is not None and names != classes:
        raise ConfigError(
            f"{str(split_dir)!r} has classes that differ from the train split's "
            f"(only here: {sorted(set(names) - set(classes))[:5]}, missing: {sorted(set(classes) - set(names))[:5]})"
        )
    files: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(names):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            empty.append(name)
        files += [(p, label) for p in found]
    if empty:
        raise ConfigError(f"{str(split_dir)!r}: class folders without images: {empty[:10]}")
    return names, files


def _fingerprint(files: list[tuple[Path, int]], image_size: int | None, decoder: str = "pil",
                 on_bad_image: str = "skip") -> str:
    # every setting that changes the decoded result is part of the key; v3: faithful 16-bit/float modes, decoders
    h = hashlib.sha256(f"v3 {image_size} {decoder} {on_bad_image}".encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _decode(path: Path, image_size: int | None, decoder: str = "pil") -> torch.Tensor:
    """One image as uint8 3×H×W, squashed to ``image_size``² when given (the ``cifar`` transform's decode, the
    same function the streaming path uses, so both give the same pixels)."""
    from kdistill.data.decode import decode_sample
    from kdistill.data.transforms import ImageTransform

    image, _ = decode_sample(path.read_bytes(), ImageTransform("cifar", image_size), False, decoder=decoder)
    return image


def _try_decode(path: Path, image_size: int | None, decoder: str) -> torch.Tensor | Exception:
    try:
        return _decode(path, image_size, decoder)
    except Exception as exc:  # PIL raises many types for broken files
        return exc


def load_image_folder(
    split_dir: str | Path,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    on_bad_image: str = "skip",
    classes: list[str] | None = None,
    decoder: str = "auto",
) -> FolderSplit:
    """Decode every image of ``split_dir`` (in parallel threads; cached); unreadable files are skipped and counted
    (``on_bad_image="skip"``) or raise (``"error"``). Images of different sizes need ``image_size``."""
    from kdistill.data.decode import decode_threads, resolve_decoder

    decoder = resolve_decoder(decoder)
    if on_bad_image not in ("skip", "error"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    split_dir = Path(split_dir)
    found_classes, files = _list_split(split_dir, classes)
    cache = Path(cache_dir or default_cache_dir()) / "folders"
    key = _fingerprint(files, image_size, decoder, on_bad_image)
    cached = cache / f"{split_dir.name}-{key}.safetensors"
    if cached.exists():
        blob = load_file(str(cached))
        meta = json.loads(cached.with_suffix(".json").read_text())
        return FolderSplit(ImageTensors(blob["images"], blob["targets"]), found_classes, meta["skipped"])
    images, targets, skipped = [], [], []
    first_shape = None
    with ThreadPoolExecutor(decode_threads()) as pool:  # the decoders release the GIL
        decoded = list(pool.map(lambda f: _try_decode(f[0], image_size, decoder), files))
    for (path, label), img in zip(files, decoded, strict=True):
        if isinstance(img, Exception):
            exc = img
            if on_bad_image == "error":
                raise ConfigError(f"cannot read image {str(path)!r}: {exc}") from exc
            skipped.append(str(path))
            continue
        if first_shape is None:
            first_shape = img.shape
        elif img.shape != first_shape:
            raise ConfigError(
                f"image {str(path)!r} is {tuple(img.shape)} but earlier ones are {tuple(first_shape)}; "
                "set data.image_size to resize all images"
            )
        images.append(img)
        targets.append(label)
    if skipped:
        log.warning("skipped %d unreadable images in %s (first: %s)", len(skipped), split_dir, skipped[0])
        unreadable = [name for label, name in enumerate(found_classes) if label not in set(targets)]
        if unreadable:
            raise ConfigError(f"{str(split_dir)!r}: every image of class folder(s) {unreadable[:10]} is unreadable "
                              f"(first skipped: {skipped[0]!r}); fix or remove them")
    if not images:
        raise ConfigError(f"no readable images in {str(split_dir)!r}")
    tensors = ImageTensors(torch.stack(images), torch.tensor(targets, dtype=torch.long))
    try:
        atomic_write_text(cached.with_suffix(".json"), json.dumps({"skipped": skipped, "source": str(split_dir)}))
        blob = {"images": tensors.images.contiguous(), "targets": tensors.targets}
        atomic_write(cached, lambda tmp: save_file(blob, str(tmp)))  # last: its presence means complete
    except OSError as exc:  # a read-only cache only costs speed
        log.warning("could not write the decoded-image cache %s: %s", cached, exc)
    return FolderSplit(tensors, found_classes, skipped)


def load_cifar(name: str, root: str | Path, train: bool, download: bool = False) -> FolderSplit:
    """torchvision's CIFAR-10/100 files under ``root`` (downloaded only when ``download``)."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise ConfigError(f"{name} not found under {str(root)!r}; set data.download=true to fetch it ({exc})") from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return FolderSplit(ImageTensors(images, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes), [])
