"""Compiled distillation steps (``trainer.compile``): each network with its feature taps, and the
method's own modules and losses, as ``torch.compile`` graphs.

Three kinds of graphs per run:

* the student's training pass with its taps (``RecordingPass``: the forward hooks are registered
  once and record only inside the pass, so Dynamo inlines them into the graph; hooks registered per
  step, as ``FeatureRecorder`` does, break the graph at every registration);
* each teacher's inference pass with its taps;
* the method's ``forward`` (ABFs, embeddings, discriminators and the losses);

plus the student's evaluation pass. The optimizer steps, a method's own optimizer step (MEAL's
discriminators) and the teacher selection stay eager between the graphs. Inductor keeps compiled
kernels in a cache directory (``TORCHINDUCTOR_CACHE_DIR``; default ``~/.cache/kdistill/inductor``),
so a resumed or repeated run reuses them instead of compiling again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.features import RecordingPass
from kdistill.methods.base import ModelOutput
from kdistill.utils import ConfigError, unknown_name_error

# torch.compile's modes: "default" (inductor, no CUDA graphs), "reduce-overhead" (CUDA graphs: the
# whole graph replayed in one launch, on GPUs), "max-autotune" (benchmarks kernel choices at compile
# time, plus CUDA graphs on GPUs), "max-autotune-no-cudagraphs".
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdistill" / "inductor"


def use_compile_cache(path: str | Path | None = None) -> Path:
    """Point Inductor's kernel and graph caches at ``path`` (default: ``TORCHINDUCTOR_CACHE_DIR`` if set,
    else ``default_cache_dir()``) and return it. Call before the first compilation."""
    chosen = Path(path) if path is not None else Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen)
    return chosen


class CompiledPasses:
    """The compiled graphs of one ``Distiller`` (see the module docstring).

    ``mode`` is one of ``COMPILE_MODES``; ``dynamic`` is ``torch.compile``'s: ``None`` (default)
    compiles for the first batch shape and, when another appears (a last partial training batch),
    once more with a symbolic batch size; ``False`` compiles each shape separately; ``True`` starts
    symbolic. Evaluation batches are padded to the first one's size, so a last partial validation
    batch reuses the graph (evaluation mode treats samples independently; the padding rows are
    dropped from the logits).
    """

    def __init__(self, distiller: nn.Module, mode: str = "default", dynamic: bool | None = None,
                 backend: str = "inductor"):
        if mode not in COMPILE_MODES:
            raise unknown_name_error("compile mode", mode, COMPILE_MODES)
        if not hasattr(distiller, "student") or not hasattr(distiller, "teachers"):
            raise ConfigError("CompiledPasses needs a Distiller (student, teachers, method)")
        self.mode = mode
        self.dynamic = dynamic
        # backends other than inductor (``"aot_eager"``: trace only, for tests and debugging) take no mode
        opts: dict[str, Any] = {"dynamic": dynamic, "backend": backend, **({"mode": mode} if backend == "inductor" else {})}
        # the passes share RecordingPass.__call__'s code, and Dynamo keeps a limited number of graphs per code
        # object: one per network, with room for a symbolic-batch recompile each
        limit = 2 * (1 + len(distiller.teachers)) + 2
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        self._student_pass = RecordingPass(distiller.student, distiller.student_taps)
        self._teacher_passes = [RecordingPass(t, taps, detach=True)
                                for t, taps in zip(distiller.teachers, distiller.teacher_taps, strict=True)]
        self._student = torch.compile(self._student_pass.__call__, **opts)
        self._teachers = [torch.compile(p.__call__, **opts) for p in self._teacher_passes]
        self.method = torch.compile(distiller.method, **opts)
        self._eval = torch.compile(distiller.student, **opts)
        self._eval_batch: int | None = None

    def student(self, images: Tensor) -> ModelOutput:
        """The student's training pass with its taps."""
        return ModelOutput(*self._student(images))

    def teacher(self, index: int, images: Tensor) -> ModelOutput:
        """Teacher ``index``'s pass with its taps (call it under inference mode)."""
        return ModelOutput(*self._teachers[index](images))

    def evaluate(self, images: Tensor) -> Tensor:
        """The student's logits in evaluation mode; smaller batches are padded to the first one's size."""
        n = images.shape[0]
        if self._eval_batch is None:
            self._eval_batch = n
        if n < self._eval_batch:
            pad = images.new_zeros((self._eval_batch - n, *images.shape[1:]))
            return self._eval(torch.cat([images, pad]))[:n]
        return self._eval(images)

    def remove(self) -> None:
        """Take the recording hooks off the networks (the compiled graphs are then unusable)."""
        for p in (self._student_pass, *self._teacher_passes):
            p.remove()


def compile_stats() -> dict[str, Any]:
    """Dynamo's counters of this process: graphs compiled, graph breaks with their reasons, recompiles, and
    the on-disk caches' hits and misses (Inductor's compiled graphs, AOT autograd's forward/backward pairs)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": {reason.split("\n")[0]: n for reason, n in counters["graph_break"].items()},
            "recompiles": int(counters["recompiles"].total()) if "recompiles" in counters else 0,
            "cache": {"inductor_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
                      "inductor_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
                      "autograd_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
                      "autograd_miss": int(counters["aot_autograd"]["autograd_cache_miss"])}}


def compile_distiller(distiller: nn.Module, mode: str = "default", dynamic: bool | None = None,
                      backend: str = "inductor") -> CompiledPasses:
    """Make ``distiller`` run its passes compiled (``CompiledPasses``) and return them; its parameters,
    state dict and eager behaviour otherwise stay as they are."""
    distiller.compiled = CompiledPasses(distiller, mode, dynamic, backend)
    return distiller.compiled
