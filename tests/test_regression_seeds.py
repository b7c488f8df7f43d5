"""Seeded short runs must stay bit-identical to values recorded from an earlier version of the code.

Each case trains a tiny student on synthetic data through the whole engine (``kdistill.config`` +
``kdistill.engine.run.fit``: data loader, augmentation, teacher pass or teacher cache, the method,
the own optimizer of MEAL's discriminators, the schedule) on one CPU thread, and compares every
logged per-step loss term, every epoch's validation top-1, a sha256 of the final checkpoint's
weights (student, method modules, teachers) and of the student's logits on a fixed batch against
``tests/data/regression_seeds.json``. A refactoring that changes any bit of any of them fails here.

The recorded values are exact for this machine's PyTorch build and CPU kernels; on another machine
(other SIMD paths) they may differ in the last bits. Re-record deliberately, never to make a failure
go away: ``KDISTILL_RECORD_REGRESSION=1 pytest tests/test_regression_seeds.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.config import build_config
from kdistill.engine.run import fit, load_exported

RECORD = Path(__file__).parent / "data" / "regression_seeds.json"
RECORDING = os.environ.get("KDISTILL_RECORD_REGRESSION") == "1"

TINY = [
    "seed=3", "data.name=synthetic", "data.num_classes=4", "data.train_size=64", "data.val_size=32",
    "data.image_size=16", "data.batch_size=16", "data.eval_batch_size=32", "trainer.max_epochs=2",
    "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "optim.lr=0.05", "optim.schedule=cosine",
    "student.model=cifar.resnet8", "teachers.0.model=cifar.resnet14", "teacher.allow_untrained=true",
]
CASES: dict[str, list[str]] = {
    "kd": ["method.name=kd"],
    "kd_cache": ["method.name=kd"],  # the teacher-output cache replaces the teacher pass
    "reviewkd": ["method.name=reviewkd", "method.options.warmup_epochs=2", "method.options.warmup_epoch_base=1"],
    "dkd": ["method.name=dkd", "method.options.warmup_epochs=2"],
    "crd": ["method.name=crd_kd", "method.options.num_negatives=16", "method.options.feat_dim=8"],
    # two teachers of different families, a feature block and the logits, one teacher drawn per batch,
    # the discriminators' joint step
    "meal_v1": ["method.name=meal_v1", "teachers.1.model=cifar.wrn_16_1", "method.options.blocks=[stage2,logits]",
                "method.options.dims=[16,null]", "method.options.sim_weights=[0.1,1.0]"],
    # the separate discriminator step before the student's (alternating mode)
    "meal_v1_alternating": ["method.name=meal_v1", "teachers.1.model=cifar.resnet8",
                            "method.options.adversarial_mode=alternating"],
}


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(name: str, tmp_path: Path) -> dict[str, Any]:
    overrides = [*TINY, *CASES[name], f"output={tmp_path / name}"]
    if name == "kd_cache":
        import lightning as L

        from kdistill.engine.build import build_run
        from kdistill.engine.teacher_cache import build_teacher_cache

        cfg = build_config(None, overrides)
        L.seed_everything(cfg.seed, verbose=False)
        built = build_run(cfg)
        build_teacher_cache(built.distiller, built.data.train, built.augment, tmp_path / "cache", views=2,
                            storage="fp32", seed=cfg.seed)
        overrides.append(f"teacher.cache={tmp_path / 'cache'}")
    cfg = build_config(None, overrides)
    result = fit(cfg)
    out = Path(result.output)
    with open(out / "logs" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [
        {k: v for k, v in row.items() if k.startswith("train/") and k not in ("train/images_per_s", "train/data_time",
                                                                               "train/lr", "train/top1") and v}
        for row in rows
    ]
    steps = [s for s in steps if s]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    student, _ = load_exported(out / "student.safetensors")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student.eval()(x)
    return {
        "steps": steps,
        "val_top1": [row["val_top1"] for row in result.history],
        "weights_sha256": _sha(_flat(ckpt["state_dict"])),
        "own_optimizer_sha256": _sha(_flat(ckpt.get("own_optimizer", {}))),
        "logits_sha256": _sha({"logits": logits}),
        "logits_first_row": [float(v) for v in logits[0]],
    }


def _flat(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}.{i}"))
    elif isinstance(tree, (int, float, bool)):
        out[prefix] = torch.tensor(float(tree), dtype=torch.float64)
    return out


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    if RECORDING:
        return {}
    if not RECORD.is_file():
        pytest.fail(f"{RECORD} is missing; record it with KDISTILL_RECORD_REGRESSION=1")
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_run_is_bit_identical(name: str, recorded: dict[str, Any], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    got = _run(name, tmp_path)
    assert len(got["steps"]) == 8 and all(got["steps"])  # 2 epochs x 4 batches, every step logged
    if RECORDING:
        data = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
        data[name] = got
        RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    want = recorded[name]
    assert got["steps"] == want["steps"]
    assert got["val_top1"] == want["val_top1"]
    assert got["logits_first_row"] == want["logits_first_row"]
    assert got["logits_sha256"] == want["logits_sha256"]
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["own_optimizer_sha256"] == want["own_optimizer_sha256"]
