"""``trainer.compile=true`` under DDP: a two-process CPU (gloo) ``distill`` run of ReviewKD (its ABFs
are the method's own trained modules) launched with torchrun, compiled and eager from the same seed.

The compiled passes run inside Lightning's DDP wrapper: the gradient of every student and ABF
parameter must still be averaged over the ranks (both ranks end with the same weights, and weights
that moved from their initialisation), and the compiled run must train the same weights as the eager
one. The graphs are traced with the fast ``aot_eager`` backend (Dynamo's tracing and AOT autograd,
which is where DDP's hooks meet the compiled step; Inductor's C++ kernels would add minutes of
compilation per rank and are compared with eager steps in tests/test_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from kdistill.config import build_config
from kdistill.engine.build import build_run

DRIVER = """
import os, sys
import lightning as L
import torch
from kdistill.cli import quiet_lightning
from kdistill.config import build_config
from kdistill.engine import run as run_module
from kdistill.engine.build import build_run
from kdistill.engine.compile import compile_distiller, compile_stats

def traced(distiller, mode="default", dynamic=None):
    return compile_distiller(distiller, mode, dynamic, backend="aot_eager")

run_module.compile_distiller = traced
quiet_lightning(False)
rank = int(os.environ["RANK"])
runs = [[]]
for a in sys.argv[1:]:
    runs.append([]) if a == "--" else runs[-1].append(a)
for overrides in runs:
    cfg = build_config(None, overrides)
    L.seed_everything(cfg.seed, verbose=False)
    built = build_run(cfg)
    result = run_module.fit(cfg, built=built)
    torch.save({"state": built.distiller.state_dict(), "top1": result.top1_last, "stats": compile_stats(),
                "compiled": getattr(built.distiller, "compiled", None) is not None},
               os.path.join(cfg.output, f"rank{rank}.pt"))
"""

COMMON = ["model=cifar.resnet8", "teacher.model=cifar.resnet8", "teacher.allow_untrained=true", "data.num_classes=4",
          "data.train_size=64", "data.val_size=32", "data.image_size=16", "data.batch_size=16", "data.eval_batch_size=16",
          "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
          "trainer.progress_bar=false", "optim.lr=0.1", "method.name=reviewkd", "method.options.warmup_epochs=0"]


pytestmark = pytest.mark.slow  # two torchrun processes, two runs each: about 40 s on a quiet 2-core CPU


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-compile")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    outs = {"eager": root / "eager", "compiled": root / "compiled"}
    argv = [*COMMON, f"output={outs['eager']}", "--", *COMMON, "trainer.compile=true", f"output={outs['compiled']}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *argv],
        capture_output=True, text=True, timeout=240, env=env, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return outs


def _load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def _trained(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith(("student.", "method.")) and state[k].is_floating_point()]


def test_compiled_ddp_ranks_hold_the_same_trained_weights(runs: dict[str, Path]) -> None:
    r0, r1 = _load(runs["compiled"], 0), _load(runs["compiled"], 1)
    assert r0["compiled"] and r1["compiled"]
    # every pass was traced into a graph (student, teacher, method, evaluation) and none broke
    assert r0["stats"]["unique_graphs"] >= 4 and r0["stats"]["graph_breaks"] == {}
    keys = _trained(r0["state"])
    assert any(k.startswith("method.") and k.endswith("weight") for k in keys), "no ABF weights in the state"
    differ = [k for k in keys if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not differ, f"ranks differ after compiled DDP steps in {differ[:5]}"
    assert r0["top1"] == r1["top1"]
    # the weights moved: a fresh build from the same seed holds the initial ones
    cfg = build_config(None, [*COMMON, "trainer.strategy=auto", "trainer.devices=1"])
    L.seed_everything(cfg.seed, verbose=False)
    init = build_run(cfg).distiller.state_dict()
    for prefix in ("student.", "method."):
        moved = [k for k in keys if k.startswith(prefix) and k.endswith("weight") and not torch.equal(init[k], r0["state"][k])]
        assert moved, f"no {prefix}* weight changed: the compiled DDP run did not train"


def test_compiled_ddp_trains_the_eager_ddp_weights(runs: dict[str, Path]) -> None:
    eager, compiled = _load(runs["eager"], 0), _load(runs["compiled"], 0)
    assert not eager["compiled"]
    keys = _trained(eager["state"])
    assert set(keys) == set(_trained(compiled["state"]))
    worst = max(((compiled["state"][k] - eager["state"][k]).abs().max().item(), k) for k in keys)
    # four SGD steps at lr 0.1 on the same batches: the traced step reorders float sums only
    assert worst[0] < 1e-4, f"compiled and eager DDP weights differ by {worst[0]:.2e} in {worst[1]}"
