"""Keep freed CPU memory for the next training step instead of returning it to the system (docs/speed.md).

glibc serves large allocations (activation maps of a batch) with ``mmap`` and gives them back with
``munmap`` when freed, and trims the heap top after frees; every training step then faults the
same pages in again (tens of thousands of minor page faults a step for a CIFAR ResNet at batch 64,
each one a kernel entry plus zeroing a page). Raising the mmap threshold to its maximum (32 MiB on
64-bit glibc) and the trim threshold makes the freed memory reusable by the next step. The peak
memory is unchanged: it was already reached once. CUDA has its own caching allocator and needs none
of this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; ``False`` where glibc is not the allocator."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
