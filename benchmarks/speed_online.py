"""Step time of the online methods against their networks trained alone (``speed.py --online``).

For each online method, one child process builds the cohort of ``benchmarks/online.py`` (resnet20-
sized networks, batch 64, 32×32, 100 classes) and times, interleaved step by step so that a
changing background load hits all of them alike:

* ``networks``  every member trained alone, one after the other: forward, cross-entropy, backward
  and an SGD step per member (a member behind a shared trunk is timed with the trunk in front, as
  ``Cohort.member`` exports it), i.e. what training the networks separately costs per batch;
* ``method``    the method's whole step (``Distiller.forward_train`` of the cohort, one backward of
  the summed losses, every optimizer group's step: the reference ``train_step``);
* ``modules``   the method's own forward and backward on fixed (detached) network outputs: its
  embedding heads, adapters, fusion module, decoders and losses.

Ratio = method / networks; the target is ``ratio ≤ 1.1 + modules / networks``. Cohorts with a
shared trunk (``oekd``, ``mcl_okd``) run the trunk once per step instead of once per member, so
their ratio can fall below 1. Times are medians of per-step CPU time of the measuring thread
(``time.thread_time``, one intra-op thread), wall-time medians beside them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# the cohorts of benchmarks/online.py: (model, model kwargs, method options)
R20 = "cifar.resnet20"
COHORTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "dml": ("online.peers", {"networks": [R20, R20]}, {}),
    "oekd": ("online.oekd_resnet", {"depth": 20, "num_students": 5}, {"optimizer": "sgd"}),
    "mcl": ("online.peers", {"networks": [R20, R20]}, {}),
    "mcl_okd": ("online.branch_resnet", {"depth": 20, "num_branches": 4}, {"num_samples": 50_000}),
    "ffsd": ("online.peers", {"networks": [R20, R20, R20], "names": ["student1", "student2", "leader"]}, {}),
}
NUM_CLASSES = 100


def measure_online(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the ``networks``, ``method`` and ``modules`` timings of ``method``'s cohort."""
    import torch
    import torch.nn.functional as F
    from speed_timing import Timer

    from kdistill.methods import RunFacts, build_method
    from kdistill.methods.base import Batch, ModelOutput, StepInfo
    from kdistill.models import create_model
    from kdistill.optim import GroupedOptimizer, make_optimizer
    from kdistill.step import Distiller, OwnOptimizerStep, train_step

    model, kwargs, options = COHORTS[method]
    torch.manual_seed(0)
    cohort = create_model(model, num_classes=NUM_CLASSES, **kwargs)
    n = args.batch
    labels = torch.arange(50_000) % NUM_CLASSES
    facts = RunFacts(input_size=(3, 32, 32), num_samples=50_000, num_classes=NUM_CLASSES, train_targets=labels)
    m = build_method(method, student=cohort, teachers=[], facts=facts, **options)
    d = Distiller(cohort, [], m).train()
    groups = m.param_groups()
    opt = GroupedOptimizer([make_optimizer(g, 0.01, 0.9, True, 5e-4) for g in groups], [g.name for g in groups])
    own = OwnOptimizerStep(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    index = torch.randperm(50_000, generator=g)[:n]
    targets = labels[index]  # m-per-class batches are not needed for timing
    batch = Batch(x, targets, index)
    info = StepInfo(epoch=10, step=0, max_epochs=300)  # past every warm-up

    alone = [cohort.member(i) for i in range(len(cohort.members))]
    alone_opts = [torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
                  for net in alone]

    def networks() -> None:
        for net, o in zip(alone, alone_opts, strict=True):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), targets).backward()
            o.step()

    def method_step() -> None:
        train_step(d, batch, info, opt, own)

    live = d.student_forward(x)
    fixed = ModelOutput(live.logits.detach(), {k: v.detach() for k, v in live.features.items()})
    del live

    def modules() -> None:
        s = ModelOutput(fixed.logits.clone().requires_grad_(),
                        {k: v.clone().requires_grad_() for k, v in fixed.features.items()})
        losses = m(batch, s, [], info)
        torch.stack([v.float() for v in losses.values()]).sum().backward()
        for p in m.parameters():
            p.grad = None

    timer = Timer({"networks": networks, "method": method_step, "modules": modules}, lambda: None)
    load0 = os.getloadavg()
    timer.run(args.warmup, args.steps)
    res = timer.summary()
    ratio = res["method"]["cpu_ms"] / res["networks"]["cpu_ms"]
    target = 1.1 + res["modules"]["cpu_ms"] / res["networks"]["cpu_ms"]
    return {"pair": "cohort", "method": method, "times": res, "members": len(cohort.members),
            "trunk": cohort.trunk is not None, "ratio_cpu": ratio,
            "ratio_wall": res["method"]["wall_ms"] / res["networks"]["wall_ms"], "target": target,
            "module_params": sum(p.numel() for p in m.parameters()), "load": [load0, os.getloadavg()],
            "steps": args.steps, "batch": n}


def write_online_report(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    """The Markdown table of the cached online rows."""
    lines = [
        "# Speed: online steps against their networks trained alone",
        "",
        f"Machine: {meta['machine']}",
        "Commands (in order; rows are cached and resumed):",
        *[f"    {c}" for c in meta.get("commands", [meta["command"]])],
        "",
        f"Settings: batch {meta['batch']}, 32×32, 100 classes, {meta['threads']} intra-op thread(s), device "
        f"{meta['device']}; {meta['steps']} measured steps per row after {meta['warmup']} warm-up steps, interleaved; "
        "medians of thread CPU time (wall time beside it). Cohorts as in benchmarks/online.py.",
        "",
        "*networks*: every member trained alone (forward, CE, backward, SGD step), summed; *method*: the online step; "
        "*modules*: the method's own modules and losses, forward + backward on fixed network outputs. "
        "Target: ratio ≤ 1.1 + modules / networks.",
        "",
        "| method | members | networks CPU ms (wall) | method CPU ms (wall) | modules CPU ms | ratio (CPU) | ratio (wall) "
        "| target | within | load start → end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][-200:]!r} | | | | | | | | |")
            continue
        t = r["times"]
        trunk = " (shared trunk)" if r["trunk"] else ""
        ok = "yes" if r["ratio_cpu"] <= r["target"] else "**no**"
        lines.append(
            f"| {r['method']} | {r['members']}{trunk} | {t['networks']['cpu_ms']:.0f} ({t['networks']['wall_ms']:.0f}) | "
            f"{t['method']['cpu_ms']:.0f} ({t['method']['wall_ms']:.0f}) | {t['modules']['cpu_ms']:.0f} | "
            f"{r['ratio_cpu']:.3f} | {r['ratio_wall']:.3f} | {r['target']:.3f} | {ok} | "
            f"{r['load'][0][0]:.1f} → {r['load'][1][0]:.1f} |")
    path.write_text("\n".join(lines) + "\n")
