"""Timing for the speed harness: per-step thread CPU time, wall time and page faults of callables run
interleaved (so a changing background load hits them alike), and the paired excess of a step over
its floors."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


class Timer:
    """Per-step thread CPU time, wall time and minor page faults of named callables, run interleaved."""

    def __init__(self, fns: dict[str, Callable[[], Any]], sync: Callable[[], None]):
        self.fns, self.sync = fns, sync
        self.cpu: dict[str, list[float]] = {k: [] for k in fns}
        self.wall: dict[str, list[float]] = {k: [] for k in fns}
        self.faults: dict[str, list[int]] = {k: [] for k in fns}

    def run(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            for fn in self.fns.values():
                fn()
        self.sync()
        for _ in range(steps):
            for name, fn in self.fns.items():
                f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                self.sync()
                self.cpu[name].append(time.thread_time() - c0)
                self.wall[name].append(time.perf_counter() - w0)
                self.faults[name].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"cpu_ms": 1000 * statistics.median(self.cpu[k]), "wall_ms": 1000 * statistics.median(self.wall[k]),
                    "faults": statistics.median(self.faults[k])} for k in self.fns}



def paired_excess(step: list[float], student: list[float], teacher: list[float]) -> dict[str, Any]:
    """Step − (student step + teacher pass) per interleaved iteration, in ms: the median and a
    distribution-free 95% confidence interval of the median (order statistics k and n−1−k with
    k = ⌊(n − 1.96·√n) / 2⌋). Pairing removes the slow drifts of a shared machine that the
    difference of three separate medians keeps."""
    d = sorted(1000 * (a - b - c) for a, b, c in zip(step, student, teacher, strict=True))
    n = len(d)
    k = max(0, int((n - 1.96 * n ** 0.5) / 2))
    return {"median_ms": statistics.median(d), "ci95_ms": [d[k], d[n - 1 - k]], "n": n}

