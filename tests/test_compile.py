"""Compiled steps: the recording pass (hooks registered once), one graph per network and for the
method with no graph break, equal losses and updates to the eager step, padded evaluation batches."""

from __future__ import annotations

import copy
import csv
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kdistill.engine.compile import COMPILE_MODES, compile_distiller, compile_stats, use_compile_cache
from kdistill.features import FeatureRecorder, RecordingPass
from kdistill.losses import dkd_loss
from kdistill.methods import build_method
from kdistill.methods.base import Batch, StepInfo
from kdistill.step import Distiller, OwnOptimizerStep, train_step
from kdistill.utils import ConfigError

TAPS = {"stage1": "relu1", "stage2": "relu2", "pooled": "pool"}


def tiny_net(width: int, classes: int = 5) -> nn.Module:
    """Two conv stages, pooled, linear: the smallest network with stages for ReviewKD."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, width, 3, padding=1), bn1=nn.BatchNorm2d(width), relu1=nn.ReLU(),
        conv2=nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), bn2=nn.BatchNorm2d(2 * width), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(2 * width, classes),
    ))


def make(method: str = "reviewkd", seed: int = 0, **options) -> Distiller:
    torch.manual_seed(seed)
    student, teacher = tiny_net(4), tiny_net(8)
    m = build_method(method, student=student, teachers=[teacher], input_size=(3, 8, 8),
                     student_taps=TAPS, teacher_taps=TAPS, **options)
    return Distiller(student, [teacher], m).train()


def test_recording_pass_matches_feature_recorder_and_records_only_inside_its_pass():
    net = tiny_net(4).eval()
    taps = {"a": "relu1", "b": "conv2+bn2", "c": "conv1:input!relu", "p": "pool!flatten"}
    x = torch.randn(3, 3, 8, 8)
    with FeatureRecorder(net, taps) as rec:
        logits = net(x)
    rp = RecordingPass(net, taps)
    out_logits, out_features = rp(x)
    assert torch.equal(out_logits, logits)
    assert out_features.keys() == rec.features.keys()
    for key, value in rec.features.items():
        assert torch.equal(out_features[key], value), key
    net(x)  # a plain call: nothing recorded, nothing kept alive
    assert rp._captures == {}
    assert set(net.state_dict()) == set(tiny_net(4).state_dict())  # no state added to the model
    rp.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_recording_pass_rejects_unknown_module():
    with pytest.raises(ConfigError, match="relu9"):
        RecordingPass(tiny_net(4), {"x": "relu9"})


def test_compile_mode_must_be_known():
    with pytest.raises(ConfigError, match="max-autotune"):
        compile_distiller(make(), mode="fast")
    assert "reduce-overhead" in COMPILE_MODES


def test_dkd_loss_has_no_data_dependent_shapes():
    """Boolean-mask indexing (a data-dependent shape) would break the method's graph."""
    s, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    explained = torch._dynamo.explain(dkd_loss)(s, t, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def run_steps(d: Distiller, epochs: int, after_step=None) -> list[dict[str, float]]:
    """One SGD step per epoch on fixed random batches; returns the loss terms of each step."""
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    own = OwnOptimizerStep(d.method)
    g = torch.Generator()
    losses = []
    for step in range(epochs):
        g.manual_seed(step)
        batch = Batch(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g), torch.arange(6))
        losses.append(train_step(d, batch, StepInfo(epoch=step, step=step, max_epochs=epochs), opt, own))
        if after_step is not None:
            after_step(step)
    return losses


def assert_same_run(eager: Distiller, compiled: Distiller, runs: dict[str, list[dict[str, float]]], rel: float) -> None:
    for le, lc in zip(runs["eager"], runs["compiled"], strict=True):
        assert le.keys() == lc.keys()
        for k in le:
            assert lc[k] == pytest.approx(le[k], rel=rel, abs=1e-6), k
    for pe, pc in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=rel, atol=1e-5)


def test_compiled_reviewkd_traces_one_graph_per_pass_without_breaks():
    """Traced through AOTAutograd without code generation (fast): the graphs Dynamo builds, and the
    losses and updates of the traced step equal the eager ones."""
    fresh_dynamo()
    eager = make(warmup_epochs=2)
    compiled = copy.deepcopy(eager)
    compile_distiller(compiled, backend="aot_eager")
    assert set(compiled.state_dict()) == set(eager.state_dict())
    graphs = []
    runs = {"eager": run_steps(eager, 3),
            "compiled": run_steps(compiled, 3, lambda step: graphs.append(compile_stats()["unique_graphs"]))}
    assert_same_run(eager, compiled, runs, rel=1e-5)
    assert compile_stats()["graph_breaks"] == {}
    # student pass, teacher pass, method; the warm-up factor reads the epoch: one recompile of the
    # method when it first changes (the epoch becomes symbolic), none after
    assert graphs == [3, 4, 4]

    # evaluation: a smaller last batch is padded to the first batch's size; outputs unchanged
    eager.eval(), compiled.eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled(x[:4]), eager(x[:4]))
    assert compile_stats()["unique_graphs"] == 5  # plus the evaluation pass, compiled once


def test_a_smaller_training_batch_compiles_once_more_with_a_symbolic_batch_size():
    """The last partial batch of an epoch: one more graph per pass (batch size symbolic), then every
    other size reuses it; the losses equal eager for each size."""
    fresh_dynamo()
    eager = make("dkd", warmup_epochs=0)
    compiled = copy.deepcopy(eager)
    compile_distiller(compiled, backend="aot_eager")
    graphs = []
    for n in (6, 4, 5, 6):
        batch = Batch(torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,)), torch.arange(n))
        _, ref = eager.forward_train(batch, StepInfo())
        _, got = compiled.forward_train(batch, StepInfo())
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
        graphs.append(compile_stats()["unique_graphs"])
    assert graphs == [3, 6, 6, 6]
    assert compile_stats()["graph_breaks"] == {}


def test_inductor_compiled_kd_step_equals_eager_and_a_second_run_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert use_compile_cache() == tmp_path / "inductor"
    fresh_dynamo()
    eager = make("kd")
    compiled, again = copy.deepcopy(eager), copy.deepcopy(eager)
    compile_distiller(compiled)
    runs = {"eager": run_steps(eager, 2), "compiled": run_steps(compiled, 2)}
    assert_same_run(eager, compiled, runs, rel=1e-4)
    assert compile_stats()["graph_breaks"] == {}
    counters = torch._dynamo.utils.counters
    assert counters["inductor"]["fxgraph_cache_miss"] > 0 and counters["inductor"]["fxgraph_cache_hit"] == 0
    # a resumed run: new process state (Dynamo reset), same cache directory: the kernels are reused
    fresh_dynamo()
    compile_distiller(again)
    run_steps(again, 1)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and counters["inductor"]["fxgraph_cache_miss"] == 0
    cache = compile_stats()["cache"]
    assert cache["inductor_hit"] == counters["inductor"]["fxgraph_cache_hit"] and cache["inductor_miss"] == 0


def test_engine_runs_compiled_bf16_mixed_steps_and_evaluation(tmp_path, monkeypatch):
    """``trainer.compile=true trainer.precision=bf16-mixed`` through the engine (traced with the fast
    ``aot_eager`` backend): teacher, student, method and evaluation each one graph, no break, and the
    run's losses are finite float32 values close to those of the eager float32 run."""
    from kdistill.config import build_config
    from kdistill.engine import run as run_module

    def traced(distiller, mode="default", dynamic=None):
        return compile_distiller(distiller, mode, dynamic, backend="aot_eager")

    monkeypatch.setattr(run_module, "compile_distiller", traced)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    common = ["data.name=synthetic", "data.num_classes=4", "data.train_size=32", "data.val_size=24", "data.image_size=16",
              "data.batch_size=16", "data.eval_batch_size=16", "model=cifar.resnet8", "teacher.model=cifar.resnet8",
              "method.name=reviewkd", "method.options.warmup_epochs=0", "trainer.max_epochs=1", "teacher.allow_untrained=true",
              "trainer.progress_bar=false", "trainer.log_every_n_steps=1"]
    fresh_dynamo()
    results = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true", "trainer.precision=bf16-mixed"])):
        torch.manual_seed(0)
        results[name] = run_module.fit(build_config(None, [*common, *extra, f"output={tmp_path / name}"]))
    stats = compile_stats()
    assert stats["graph_breaks"] == {}
    assert stats["unique_graphs"] == 4  # student, teacher, method, evaluation (the last val batch of 8 padded)
    steps = {}
    for name, res in results.items():
        with open(res.output / "logs" / "metrics.csv") as fh:
            steps[name] = [float(row["train/loss"]) for row in csv.DictReader(fh) if row.get("train/loss")]
    assert len(steps["compiled"]) == len(steps["eager"]) == 2
    for got, ref in zip(steps["compiled"], steps["eager"], strict=True):
        assert got == pytest.approx(ref, rel=0.05)
    assert (tmp_path / "inductor").is_dir()
