"""Input pipeline harness: kdistill's in-memory uint8 pipeline vs torchvision's per-image CIFAR one (default), and
kdistill's streaming folders vs torchvision's ImageFolder pipeline at 224 (``folder``).

Both deliver training batches of 64 normalised 32×32 images with pad-4 random crop and horizontal
flip, from the same uint8 images held in memory:

* ``torchvision``: what ``torchvision.datasets.CIFAR10`` + the usual transforms do — per image,
  ``PIL.Image.fromarray``, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``, batched by a shuffling ``DataLoader`` with 0 and 2 worker processes;
* ``kdistill``: ``make_loader`` (one index operation per batch) + ``BatchAugment`` on the whole batch.

Alternating rounds of each, images/s = images / wall time of the round (the median round); for
every variant the CPU time of the main process plus its worker processes is reported too. One intra-op thread, as in training.

    python benchmarks/pipeline.py                      # writes benchmarks/results/speed-pipeline.{md,json}

``folder``: ImageNet-style training input at 224 from JPEG folders of ordinary photos: kdistill's streaming path
(``StreamingLoader`` over a ``StreamingFolder``: per-sample decode in worker processes, random resized crop + flip,
uint8 batches, normalised in the main process as a device would) against torchvision's reference pipeline
(``ImageFolder`` + PIL + ``transforms.v2`` RandomResizedCrop / flip / ToImage / ToDtype / Normalize + ``DataLoader``),
the same batch size and number of worker processes for both. Each (pipeline, folder, round) runs in a fresh process,
so peak memory (PSS of the main process plus its workers, sampled every 20 ms) is its own; images/s is over the timed
batches after a warm-up, CPU time is the main process plus its workers. Also a single-process table of the decoders
(decode + crop + resize per image, CPU time), with pillow-simd when ``--simd-python`` names a Python that has it.

    python benchmarks/photo_folders.py photos --count 20000 --out /work/cache/data13/photos-20000
    python benchmarks/photo_folders.py photos --count 5000 --seed 1 --out /work/cache/data13/photos-5000
    python benchmarks/pipeline.py folder --folders /work/cache/data13/photos-5000 /work/cache/data13/photos-20000
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
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
        "# Input pipeline: in-memory uint8 batches vs torchvision's per-image CIFAR pipeline", "",
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


# --- folder: streaming at 224 ------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _proc_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of ``pid`` in bytes (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if line.endswith("kB")}
    return fields.get("Pss", 0), fields.get("Rss", 0)


def _proc_cpu(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / ticks


class MemoryWatch:
    """Samples the summed PSS and RSS of this process and its live DataLoader workers every ``period`` seconds."""

    def __init__(self, period: float = 0.02):
        import threading

        self.pids: list[int] = [os.getpid()]
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            pss = rss = 0
            for pid in list(self.pids):
                p, r = _proc_memory(pid)
                pss, rss = pss + p, rss + r
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _kdistill_loader(folder: Path, size: int, batch: int, workers: int, decoder: str):
    from kdistill.data import BatchAugment
    from kdistill.data.streaming import StreamingFolder, StreamingLoader, scan_folder
    from kdistill.data.transforms import ImageTransform

    files = scan_folder(folder / "train", cache_dir=Path(os.environ.get("KDISTILL_CACHE", "/tmp/kdistill-bench")))
    ds = StreamingFolder(files, ImageTransform("imagenet", size), train=True, seed=0, decoder=decoder)
    loader = StreamingLoader(ds, batch, True, seed=0, num_workers=workers)
    normalize = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, padding=0, flip=False)
    return loader, lambda b: normalize(b[0], train=False)


def _torchvision_loader(folder: Path, size: int, batch: int, workers: int):
    import torchvision
    import torchvision.transforms.v2 as T

    transform = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToImage(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = torchvision.datasets.ImageFolder(str(folder / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return loader, lambda b: b[0]


def one_run(variant: str, folder: Path, size: int, batch: int, workers: int, batches: int, warmup: int,
            decoder: str) -> dict[str, float]:
    """Time ``batches`` training batches of one pipeline after ``warmup`` batches, in this (fresh) process."""
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    watch = MemoryWatch()
    if variant == "kdistill":
        loader, step = _kdistill_loader(folder, size, batch, workers, decoder)
    else:
        loader, step = _torchvision_loader(folder, size, batch, workers)
    it = iter(loader)
    for _ in range(warmup):
        out = step(next(it))
    # the workers: of the persistent iterator StreamingLoader keeps, or of the plain DataLoader iterator
    source = loader._iterator if getattr(loader, "_iterator", None) is not None else it
    worker_pids = [w.pid for w in getattr(source, "_workers", [])]
    assert len(worker_pids) == workers, worker_pids
    watch.pids += worker_pids
    w0, c0, k0 = time.perf_counter(), time.process_time(), sum(_proc_cpu(p) for p in worker_pids)
    seen = 0
    for _ in range(batches):
        out = step(next(it))
        seen += len(out)
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0 + sum(_proc_cpu(p) for p in worker_pids) - k0
    watch.stop()
    assert out.dtype == torch.float32 and tuple(out.shape[1:]) == (3, size, size)
    return {"images": seen, "wall_s": wall, "cpu_s": cpu, "images_per_s": seen / wall, "images_per_cpu_s": seen / cpu,
            "peak_pss_mb": watch.peak_pss / 2**20, "peak_rss_mb": watch.peak_rss / 2**20,
            "files": sum(1 for _ in (folder / "train").rglob("*.jpg"))}


def decoder_table(folder: Path, size: int, count: int, python: str | None) -> dict[str, float]:
    """Images per CPU-second of decode + random resized crop + flip at ``size`` for each decoder, one process."""
    code = r"""
import glob, json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
from kdistill.data.decode import decode_sample
from kdistill.data.transforms import ImageTransform, sample_rng
folder, size, count, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
files = sorted(glob.glob(folder + "/train/*/*.jpg"))[:count]
datas = [open(f, "rb").read() for f in files]
t = ImageTransform("imagenet", size)
out = {}
for name in names:
    dec, reduce = name.split("+")[0], name.endswith("+dct")
    for _ in range(2):  # the second pass is timed
        c0 = time.process_time()
        for i, d in enumerate(datas):
            decode_sample(d, t, True, sample_rng(0, 0, i), dec, reduce)
        cpu = time.process_time() - c0
    out[name] = len(datas) / cpu
if "reference" in sys.argv[5:]:
    import torchvision.transforms.v2 as T
    from PIL import Image
    tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToImage(),
                    T.ToDtype(torch.float32, scale=True), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    for _ in range(2):
        c0 = time.process_time()
        for f in files:
            with open(f, "rb") as fh:
                tf(Image.open(fh).convert("RGB"))
        cpu = time.process_time() - c0
    out["reference"] = len(files) / cpu
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    names = "pil,pil+dct,simplejpeg,simplejpeg+dct,torchvision"
    result = {}
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(size), str(count), names, "reference"],
                          capture_output=True, text=True, env=env, check=True)
    for k, v in json.loads(proc.stdout).items():
        result[f"{k} (Pillow {_pil_version(sys.executable)})" if k.startswith("pil") or k == "reference" else k] = v
    if python:
        proc = subprocess.run([python, "-c", code, str(folder), str(size), str(count), "pil,pil+dct", "reference"],
                              capture_output=True, text=True, env=env, check=True)
        for k, v in json.loads(proc.stdout).items():
            result[f"{k} (pillow-simd {_pil_version(python)})"] = v
    return result


def _pil_version(python: str) -> str:
    return subprocess.run([python, "-c", "import PIL; print(PIL.__version__)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def folder_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="pipeline.py folder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", nargs="+", required=True, help="photo folders (train/<class>/*.jpg)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, the same for both")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--decode-images", type=int, default=400, help="images for the decoder table (0: skip it)")
    parser.add_argument("--simd-python", default=None, help="a Python with pillow-simd (and kdistill importable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline-folder-224"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    runs = state.get("runs", [])  # resumable: finished runs are kept
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    loads = state.get("loads", [])
    for r in range(args.rounds):
        for folder in args.folders:
            for variant in ("torchvision", "kdistill"):
                key = {"round": r, "folder": folder, "variant": variant}
                if any(all(run.get(k) == v for k, v in key.items()) for run in runs):
                    continue
                loads.append(os.getloadavg()[0])
                proc = subprocess.run([sys.executable, __file__, "_one", variant, folder, str(args.size), str(args.batch),
                                       str(args.workers), str(args.batches), str(args.warmup), args.decoder],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{variant} on {folder} failed:\n{proc.stderr[-3000:]}")
                runs.append({**key, **json.loads(proc.stdout.strip().splitlines()[-1])})
                print(runs[-1], flush=True)
                state.update(runs=runs, loads=loads)
                out.with_suffix(".json").write_text(json.dumps(state, indent=1))
    if args.decode_images and "decoders" not in state:
        state["decoders"] = decoder_table(Path(args.folders[-1]), args.size, args.decode_images, args.simd_python)
    state.update(machine=machine_line(), command="python benchmarks/pipeline.py folder " + shlex.join(argv),
                 loads=loads, uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    out.with_suffix(".json").write_text(json.dumps(state, indent=1))
    out.with_suffix(".md").write_text(render_folder(state, args))
    print(out.with_suffix(".md").read_text())


def render_folder(state: dict, args: argparse.Namespace) -> str:
    runs = state["runs"]

    def med(variant: str, folder: str, field: str) -> float:
        return statistics.median(r[field] for r in runs if r["variant"] == variant and r["folder"] == folder)

    lines = ["# Input pipeline at 224: kdistill's streaming folders vs torchvision's ImageFolder pipeline", "",
             f"Machine: {state['machine']}", "Command:", f"    {state['command']}", "",
             f"Random resized crop (8-100 % of the area, ratio 3/4-4/3) + horizontal flip to {args.size}×{args.size}, "
             f"batch {args.batch}, {args.workers} DataLoader worker processes for both, normalised float32 batches "
             "at the end (kdistill: uint8 batches from the workers, normalised in the main process as a device would; "
             "torchvision: normalised per image in the workers). Folders of real photographs (crops of the COCO "
             "images of coco128, JPEG quality 85-95, sizes 500×375, 375×500, 500×333, 640×480, ...; made by "
             "`benchmarks/photo_folders.py`). Each run is a fresh process; medians of "
             f"{args.rounds} rounds of {args.batches} timed batches after {args.warmup} warm-up batches, pipelines "
             f"alternating. Load average before the runs: {', '.join(f'{v:.1f}' for v in state['loads'])} "
             f"(2 cores shared with other work; `uptime` at the end: {state['uptime']}).", "",
             "| folder | pipeline | images/s (wall) | images per CPU-second | peak memory, PSS (main + workers) | "
             "peak RSS (main + workers) |", "|---|---|---|---|---|---|"]
    for folder in dict.fromkeys(r["folder"] for r in runs):
        n = next(r["files"] for r in runs if r["folder"] == folder)
        for variant in ("torchvision", "kdistill"):
            lines.append(f"| {n:,} JPEGs | {variant} | {med(variant, folder, 'images_per_s'):.0f} | "
                         f"{med(variant, folder, 'images_per_cpu_s'):.0f} | {med(variant, folder, 'peak_pss_mb'):.0f} MB | "
                         f"{med(variant, folder, 'peak_rss_mb'):.0f} MB |")
    lines.append("")
    for folder in dict.fromkeys(r["folder"] for r in runs):
        n = next(r["files"] for r in runs if r["folder"] == folder)
        wall = med("kdistill", folder, "images_per_s") / med("torchvision", folder, "images_per_s")
        cpu = med("kdistill", folder, "images_per_cpu_s") / med("torchvision", folder, "images_per_cpu_s")
        lines.append(f"- {n:,} JPEGs: kdistill streaming is **{wall:.2f}×** torchvision's images/s (wall) and "
                     f"**{cpu:.2f}×** its images per CPU-second.")
    if "decoders" in state:
        lines += ["", f"Decoders, one process, one thread: decode + random resized crop + flip at {args.size} "
                  f"(kdistill's `decode_sample`; `+dct` = JPEG DCT-scaled decoding allowed), images per CPU-second; "
                  "`reference` is torchvision's per-image work in the pipeline above (PIL decode, v2 transforms, "
                  "normalise):", "", "| decoder | images per CPU-second |", "|---|---|"]
        for name, v in state["decoders"].items():
            lines.append(f"| {name} | {v:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["folder"]:
        folder_main(sys.argv[2:])
    elif sys.argv[1:2] == ["_one"]:
        v, f, size, batch, workers, batches, warmup, decoder = sys.argv[2:10]
        print(json.dumps(one_run(v, Path(f), int(size), int(batch), int(workers), int(batches), int(warmup), decoder)))
    else:
        main()
