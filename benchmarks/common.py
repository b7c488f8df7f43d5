"""What every benchmark shares: the repository's paths, the machine description printed with each
result, and the shared tiny100-32 data unpacked outside the repository.

Benchmarks run as scripts (``python benchmarks/<name>.py`` from the repository), so Python puts this
folder first on the import path and ``from common import ...`` needs no path editing; kdistill itself
is imported from the installed (editable) package or ``PYTHONPATH=src``.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def machine_line() -> str:
    """CPU model, cores, native bf16 support, torch and Python versions, and the GPU if any."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return (f"{cpu}, {os.cpu_count()} cores, native bf16: {'yes' if bf16 else 'no'}; torch {torch.__version__}, "
            f"python {platform.python_version()}; CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")


def unpack_tiny100(cache: Path) -> Path:
    """``tiny100-32`` unpacked once into ``cache`` (never into the repository)."""
    target = cache / "tiny100-32"
    if (target / "val").is_dir():
        return target
    archive = SHARED / "data" / "tiny100-32.tar.gz"
    if not archive.is_file():
        sys.exit(f"missing {archive}: the benchmark needs the shared tiny100-32 data")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return target


def shown_path(path: Path | str, var: str = "CACHE") -> str:
    """``path`` for a results file, with the folder named by the environment variable ``var`` (when set)
    written as ``$var``."""
    root = os.environ.get(var)
    return str(path).replace(root.rstrip("/"), f"${var}") if root else str(path)


def shown_command(argv: list[str], program: str = "kdistill") -> str:
    """``argv`` as a shell command for a results file, with this machine's paths made portable: the
    data cache (``$KDISTILL_CACHE`` or ``~/.cache/kdistill``) becomes ``$KDISTILL_CACHE``, and paths inside
    the repository or its sibling ``shared`` folder become relative to the repository."""
    cache = os.environ.get("KDISTILL_CACHE", str(Path.home() / ".cache" / "kdistill"))
    swaps = [(str(Path(cache).resolve()), "$KDISTILL_CACHE"), (cache.rstrip("/"), "$KDISTILL_CACHE"),
             (str(ROOT) + "/", ""), (str(SHARED), "../shared")]
    parts = []
    for a in argv:
        for old, new in swaps:
            a = a.replace(old, new)
        # keep $KDISTILL_CACHE expandable by the shell: unquoted when the rest needs no quoting, else double quotes
        quoted = shlex.quote(a.replace("$KDISTILL_CACHE", "KDISTILLCACHE"))
        if "$KDISTILL_CACHE" in a:
            quoted = a if quoted == a.replace("$KDISTILL_CACHE", "KDISTILLCACHE") else '"' + a.replace('"', '\\"') + '"'
        parts.append(quoted)
    return " ".join([program, *parts])

