"""The accuracy harness compares an execution mode with eager seed by seed, only against eager runs
with the same CPU kernels (a run reproduces its numbers only with the same kernels)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def accuracy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "accuracy"):
        sys.modules.pop(name, None)  # tests/ has a conftest; import the benchmarks' modules
    import accuracy as module

    yield module
    for name in ("common", "accuracy"):
        sys.modules.pop(name, None)


def row(method: str, seed: int, top1: float, kernels: str | None) -> dict:
    r = {"method": method, "seed": seed, "top1_last": top1, "top1_best": top1 + 0.5, "train_images_per_s": 10.0}
    return r if kernels is None else {**r, "kernels": kernels}


def test_modes_pair_seeds_and_kernels(accuracy) -> None:
    by_method = {
        "kd": [row("kd", 0, 17.0, "AVX2")],
        "kd@eager": [row("kd@eager", 1, 18.0, "AVX512"), row("kd@eager", 0, 16.0, "AVX512")],
        # seed 2 has no eager rerun and is left out of the difference; seeds 0 and 1 pair
        "kd@compiled+bf16": [row("kd@compiled+bf16", s, t, "AVX512") for s, t in ((0, 17.0), (1, 18.5), (2, 20.0))],
        # other kernels than every eager rerun: no difference shown
        "kd@bf16": [row("kd@bf16", 0, 30.0, "AVX2")],
    }
    lines = [ln for ln in accuracy.modes_section(by_method) if ln.startswith("| kd |")]
    cells = {ln.split(" | ")[1]: ln.strip("| ").split(" | ") for ln in lines}
    assert list(cells) == ["eager (the row above)", "eager (rerun)", "bf16", "compiled+bf16"]
    assert cells["eager (rerun)"][2:7] == ["AVX512", "0, 1", "17.00", "17.50", "16.00, 18.00"]
    comp = cells["compiled+bf16"]
    assert comp[3:5] == ["0, 1, 2", "18.50"]  # mean over its three seeds
    assert comp[7] == "+0.75 (per seed +1.00, +0.50)"  # ((17.0 - 16.0) + (18.5 - 18.0)) / 2
    assert cells["bf16"][7] == "—" and cells["eager (the row above)"][2] == "AVX2"


def test_rows_without_kernels_are_not_paired(accuracy) -> None:
    by_method = {"kd@eager": [row("kd@eager", 0, 16.0, None)], "kd@compiled": [row("kd@compiled", 0, 17.0, None)]}
    compiled = next(ln for ln in accuracy.modes_section(by_method) if "| compiled |" in ln)
    assert "not recorded" in compiled and compiled.split(" | ")[7] == "—"
