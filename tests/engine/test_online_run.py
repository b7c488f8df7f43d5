"""Runs of several networks (online methods) on the engine: SIGKILL and --resume equal to an
uninterrupted run (every network, every optimizer), every network's accuracy in the metrics and in
``kdistill eval``, the deployed network exported alone, and two gloo DDP processes that end with
identical networks and memory banks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kdistill_command, kill_at_first_checkpoint, subprocess_env
from safetensors.torch import load_file

from kdistill.cli import main

FFSD = ["train", "model=online.peers", "student.kwargs.networks=[cifar.resnet8,cifar.resnet8,cifar.resnet8]",
        "student.kwargs.names=[student1,student2,leader]", "student.kwargs.deploy=leader", "method.name=ffsd",
        "data.num_classes=4", "data.train_size=256", "data.val_size=32", "data.image_size=16",
        "data.batch_size=16", "data.eval_batch_size=32", "trainer.max_epochs=2", "trainer.progress_bar=false",
        "optim.lr=0.05", "optim.milestones=[1]", "optim.gamma=0.5"]


def test_ffsd_sigkill_then_resume_matches_uninterrupted_run_and_reports_every_network(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    kill_at_first_checkpoint(FFSD, killed)
    done = subprocess.run([*kdistill_command(FFSD, killed), "--resume"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]

    straight = tmp_path / "straight"
    assert main([*FFSD, f"output={straight}"]) == 0
    a = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    assert any(".members.2." in k for k in b["state_dict"]) and any(".decoders." in k for k in b["state_dict"])
    for key, value in b["state_dict"].items():  # every network, fusion module, decoders
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=0, msg=key)
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_b["names"] == ["student1", "student2", "fusion", "leader", "decoders"]
    for sa, sb in zip(opt_a["optimizers"], opt_b["optimizers"], strict=True):  # SGD momenta and Adam moments
        assert sb["state"]
        torch.testing.assert_close(sa["state"], sb["state"], rtol=0, atol=0)
        assert sa["param_groups"] == sb["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert [round(lr, 6) for lr in a["lr_schedulers"][0]["_last_lr"]] == [0.025, 0.025, 0.025, 0.025, 0.0005]

    # metrics: every network and the ensemble; the export is the leader alone, as a plain resnet8
    metrics = json.loads((straight / "metrics.json").read_text())
    assert set(metrics["networks"]) == {"student1", "student2", "leader", "ensemble"}
    assert metrics["top1_last"] == metrics["networks"]["leader"]
    card = json.loads((straight / "student.json").read_text())
    assert card["model"] == "cifar.resnet8"
    exported = load_file(straight / "student.safetensors")
    leader = {k[len("distiller.student.members.2."):]: v for k, v in b["state_dict"].items()
              if k.startswith("distiller.student.members.2.")}
    assert exported.keys() == leader.keys() and all(torch.equal(exported[k], leader[k]) for k in leader)


def test_eval_of_an_online_run_reports_each_network_and_the_ensemble(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dml"
    args = ["train", "model=online.peers", "student.kwargs.networks=[cifar.resnet8,cifar.wrn_16_1]",
            "student.kwargs.deploy=best", "method.name=dml", "data.num_classes=4", "data.train_size=64",
            "data.val_size=32", "data.image_size=16", "data.batch_size=16", "trainer.max_epochs=1",
            "trainer.progress_bar=false", f"output={out}"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("net0", "net1", "ensemble"):
        assert evaluated[f"top1/{name}"] == pytest.approx(metrics["networks"][name], abs=1e-3)
    best = max(("net0", "net1"), key=lambda n: metrics["networks"][n])
    assert evaluated["top1"] == pytest.approx(metrics["networks"][best], abs=1e-3)
    card = json.loads((out / "student.json").read_text())
    assert card["model"] == {"net0": "cifar.resnet8", "net1": "cifar.wrn_16_1"}[best]


DRIVER = """
import os, sys
import torch
from kdistill.cli import quiet_lightning
from kdistill.config import build_config
from kdistill.engine.build import build_run
from kdistill.engine.run import fit

quiet_lightning(False)
cfg = build_config(None, sys.argv[1:])
built = build_run(cfg)
fit(cfg, built=built)
torch.save(built.distiller.state_dict(), os.path.join(cfg.output, f"rank{os.environ['RANK']}.pt"))
"""


def test_ddp_two_processes_end_with_identical_networks_and_banks(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "mcl_okd"
    argv = ["model=online.branch_resnet", "student.kwargs.depth=8", "student.kwargs.num_branches=2",
            "method.name=mcl_okd", "method.options.num_negatives=8", "method.options.feat_dim=16",
            "data.num_classes=4", "data.train_size=64", "data.val_size=16", "data.image_size=16",
            "data.batch_size=16", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", "trainer.progress_bar=false", f"output={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *argv],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0.keys() == r1.keys()
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, f"ranks differ in {differ[:5]}"
    assert any(k.startswith("student.members.1.") for k in r0) and any(k.startswith("student.trunk.") for k in r0)
    for bank in ("memory_branch0", "memory_branch1"):  # each rank saw half the samples; all 64 rows written
        rows = r0[f"method.memory.{bank}"]
        assert ((rows.norm(dim=1) - 1).abs() < 1e-5).sum().item() == 64
