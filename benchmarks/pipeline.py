"""Input pipeline harness (issue 6): kdistill's in-memory uint8 pipeline vs torchvision's per-image CIFAR one.

Both deliver training batches of 64 normalised 32×32 images with pad-4 random crop and horizontal
flip, from the same uint8 images held in memory:

* ``torchvision``: what ``torchvision.datasets.CIFAR10`` + the usual transforms do — per image,
  ``PIL.Image.fromarray``, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``, batched by a shuffling ``DataLoader`` with 0 and 2 worker processes;
* ``kdistill``: ``make_loader`` (one index operation per batch) + ``BatchAugment`` on the whole batch.

Alternating rounds of each, images/s = images / wall time of the round (the median round); for
every variant the CPU time of the main process plus its worker processes is reported too. One intra-op thread, as in training.

    python benchmarks/pipeline.py                      # writes benchmarks/results/speed-pipeline.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import ROOT, machine_line

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


class PilCifar(torch.utils.data.Dataset):
    """torchvision's CIFAR ``__getitem__``: an HWC uint8 array → PIL image → transforms."""

    def __init__(self, images_hwc: np.ndarray, targets: list[int], transform: Callable):
        self.images, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.targets[i]


def torchvision_loader(images: torch.Tensor, targets: torch.Tensor, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = PilCifar(images.permute(0, 2, 3, 1).numpy(), targets.tolist(), transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def worker_cpu_seconds(loaders: list[torch.utils.data.DataLoader]) -> float:
    """User + system CPU time of the persistent worker processes of ``loaders`` (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for loader in loaders:
        for worker in getattr(getattr(loader, "_iterator", None), "_workers", []) or []:
            try:
                fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def wait_until_idle(loaders: list[torch.utils.data.DataLoader], poll: float = 0.05, timeout: float = 10.0) -> None:
    """Block until the persistent workers of ``loaders`` stop using CPU (they refill their prefetch
    queue after a round ends); otherwise that work would run, and be counted, inside the next variant's round."""
    last, start = -1.0, time.perf_counter()
    while time.perf_counter() - start < timeout:
        now = worker_cpu_seconds(loaders)
        if now == last:
            return
        last = now
        time.sleep(poll)


def consume(loader_iter_factory: Callable[[], object], n_batches: int, step: Callable[[object], object]) -> int:
    seen = 0
    for i, batch in enumerate(loader_iter_factory()):
        if i == n_batches:
            break
        seen += len(step(batch))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="images in memory")
    parser.add_argument("--batches", type=int, default=100, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed-pipeline"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from kdistill.data import BatchAugment, ImageTensors, make_loader

    g = torch.Generator().manual_seed(0)
    data = ImageTensors(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 100, (args.images,), generator=g))
    augment = BatchAugment(MEAN, STD, padding=4, flip=True)
    kd_loader = make_loader(data, args.batch, train=True)
    tv = {w: torch_loader for w, torch_loader in ((w, torchvision_loader(data.images, data.targets, args.batch, w)) for w in (0, 2))}

    variants: dict[str, tuple[Callable[[], object], Callable[[object], object]]] = {
        "kdistill in-memory (make_loader + BatchAugment)": (lambda: iter(kd_loader), lambda b: augment(b[0], train=True)),
        "torchvision per-image PIL, DataLoader 0 workers": (lambda: iter(tv[0]), lambda b: b[0]),
        "torchvision per-image PIL, DataLoader 2 workers": (lambda: iter(tv[2]), lambda b: b[0]),
    }
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    load0 = os.getloadavg()
    for it, step in variants.values():  # warm-up (worker start-up is not counted)
        consume(it, 2, step)
    for _ in range(args.rounds):
        for name, (it, step) in variants.items():
            wait_until_idle(list(tv.values()))
            own = [tv[2]] if name.endswith("2 workers") else []  # worker CPU counts only for the variant that owns them
            w0, c0, k0 = time.perf_counter(), time.process_time(), worker_cpu_seconds(own)
            n = consume(it, args.batches, step)
            wall[name].append(n / (time.perf_counter() - w0))
            used = time.process_time() - c0 + worker_cpu_seconds(own) - k0
            cpu[name].append(n / max(used, 1e-9))
    load1 = os.getloadavg()
    result = {name: {"images_per_s_wall": statistics.median(wall[name]), "images_per_s_cpu": statistics.median(cpu[name])}
              for name in variants}
    ours_key = "kdistill in-memory (make_loader + BatchAugment)"
    best_tv = max(v["images_per_s_wall"] for k, v in result.items() if k.startswith("torchvision"))
    ours = result[ours_key]["images_per_s_wall"]
    best_tv_cpu = max(v["images_per_s_cpu"] for k, v in result.items() if k.startswith("torchvision"))
    ours_cpu = result[ours_key]["images_per_s_cpu"]
    out = Path(args.out)
    command = "python benchmarks/pipeline.py " + shlex.join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"machine": machine_line(), "command": command, "load": [load0, load1],
                                                     "results": result, "speedup_vs_best_torchvision": ours / best_tv,
                                                     "speedup_per_cpu_second": ours_cpu / best_tv_cpu}, indent=1))
    lines = [
        "# Input pipeline: in-memory uint8 batches vs torchvision's per-image CIFAR pipeline (issue 6)", "",
        f"Machine: {machine_line()}", "Command:", f"    {command}", "",
        f"{args.images} uint8 32×32 images in memory, batch {args.batch}, pad-4 crop + flip + normalise, one intra-op thread; "
        f"median of {args.rounds} alternating rounds of {args.batches} batches. Load average {load0[0]:.1f} at the start, "
        f"{load1[0]:.1f} at the end (2 cores; 2 means one other single-thread job besides this one, which leaves the "
        "worker-process variant little spare CPU). Before each round the persistent workers are left to finish "
        "refilling their prefetch queue, and their CPU time counts only for the variant that owns them.", "",
        "| pipeline | images/s (wall) | images per CPU-second (main process + workers) |", "|---|---|---|",
    ]
    for name, v in result.items():
        lines.append(f"| {name} | {v['images_per_s_wall']:.0f} | {v['images_per_s_cpu']:.0f} |")
    lines += ["", f"**In-memory vs the best torchvision variant: {ours / best_tv:.1f}× in images/s (wall), "
              f"{ours_cpu / best_tv_cpu:.1f}× in images per CPU-second.** On a busy machine the wall ratio understates the "
              "difference: the in-memory loop gets only a share of one core while the worker variant spreads over processes."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
