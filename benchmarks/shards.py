"""Packing an image folder into LitData shards, and reading the shards against streaming the folder itself.

Both readers decode in DataLoader worker processes with the same decoder and the same ``imagenet`` random resized
crop + flip at ``--size``: the only difference is where the encoded bytes come from (one file per image, or a few large
shards). Times are wall time and CPU seconds of the main process and its worker processes (read from /proc while they
run), and the machine load (``uptime``) is recorded. The packed shards are kept in ``--cache``
and reused (their packing time is stored with them), so a rerun measures only the reads.

    export CACHE=/path/to/a/cache/folder            # outside the repository; shown as $CACHE in the results
    python benchmarks/photo_folders.py photos --count 5000 --out $CACHE/photos-5000
    python benchmarks/shards.py --folder $CACHE/photos-5000 --cache $CACHE
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import shown_path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def children_cpu() -> dict[int, float]:
    """CPU seconds so far of each live child process (the DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields after the name: state, ppid, ..., utime (12), stime (13)
            out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def pack(folder: Path, out: Path) -> dict[str, float]:
    """Pack ``folder`` into ``out`` once (in a child process, so its CPU time is counted); reuse it afterwards."""
    record = out / "pack-time.json"
    if record.is_file():
        return json.loads(record.read_text())
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    subprocess.run([sys.executable, "-m", "kdistill.cli", "pack", str(folder), "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    row = {"wall_s": time.perf_counter() - start_wall, "cpu_s": cpu_seconds() - start_cpu,
           "bytes": sum(p.stat().st_size for p in out.rglob("*.bin"))}
    record.write_text(json.dumps(row))
    return row


def measure(loader: torch.utils.data.DataLoader, batches: int) -> dict[str, float]:
    """Images/s over ``batches`` batches after one warm-up batch (workers started, first chunks open)."""
    it = iter(loader)
    next(it)
    own = resource.getrusage(resource.RUSAGE_SELF)
    start_wall, start_own, start_kids, n = time.perf_counter(), own.ru_utime + own.ru_stime, children_cpu(), 0
    for _ in range(batches):
        images, _, _ = next(it)
        n += len(images)
    wall = time.perf_counter() - start_wall
    own, kids = resource.getrusage(resource.RUSAGE_SELF), children_cpu()  # workers still alive: read them now
    cpu = own.ru_utime + own.ru_stime - start_own + sum(c - start_kids.get(pid, 0.0) for pid, c in kids.items())
    del it
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="image folder with train/<class>/<image>")
    parser.add_argument("--cache", type=Path, required=True, help="where the packed shards are kept")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shards.md")
    args = parser.parse_args()

    from kdistill.data import StreamingFolder, make_loader
    from kdistill.data.shards import ShardDataset, make_shard_loader
    from kdistill.data.streaming import scan_folder
    from kdistill.data.transforms import build_transform

    shards = args.cache / f"{args.folder.name}-shards"
    packed = pack(args.folder, shards)
    tf = build_transform("imagenet", args.size)
    rows = {}
    train = ShardDataset(str(shards / "train"), tf, train=True, seed=0)
    rows["shards (LitData)"] = measure(make_shard_loader(train, args.batch_size, num_workers=args.workers),
                                       args.batches)
    files = scan_folder(args.folder / "train")
    folder = StreamingFolder(files, tf, True, seed=0)
    rows["image folder (streamed)"] = measure(make_loader(folder, args.batch_size, True, num_workers=args.workers),
                                              args.batches)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Shards: packing, and reading them against streaming the folder",
        "",
        f"Command: `python benchmarks/shards.py --folder {shown_path(args.folder)} --cache {shown_path(args.cache)} --size {args.size} "
        f"--batch-size {args.batch_size} --batches {args.batches} --workers {args.workers}`",
        "",
        f"The folder: `python benchmarks/photo_folders.py photos --count 5000 --out {shown_path(args.folder)}` (real photos "
        "at ordinary sizes); `$CACHE` is a cache folder outside the repository.",
        "",
        f"Machine: {os.cpu_count()} cores, no GPU; load while measuring: `{load}` (other work shared the machine).",
        "",
        f"Packing `{args.folder.name}` ({packed['bytes'] / 2**20:.0f} MiB of shards): {packed['wall_s']:.1f} s wall, "
        f"{packed['cpu_s']:.1f} CPU s (one packing process; nothing is decoded).",
        "",
        f"Reading: random resized crop + flip at {args.size}, batch {args.batch_size}, {args.workers} workers, "
        f"{args.batches} batches after one warm-up batch; CPU seconds of the main process and its workers.",
        "",
        "| reader | images | wall s | images/s | CPU s | images per CPU-second |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images']} | {r['wall_s']:.2f} | {r['images_per_s']:.1f} | {r['cpu_s']:.2f} | "
                     f"{r['images_per_cpu_s']:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
