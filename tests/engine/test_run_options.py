"""Method defaults adapted to the run (epoch-counted options, MEAL V2's discriminator), printed at the
start and written to config.json with the data's own class count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.config import build_config
from kdistill.engine.build import build_run
from kdistill.engine.run import fit
from kdistill.methods import RunFacts, parse_method_options

TINY = ["data.name=synthetic", "data.num_classes=10", "data.train_size=32", "data.val_size=16", "data.image_size=16",
        "data.batch_size=16", "data.eval_batch_size=16", "model=cifar.resnet8", "teacher.model=cifar.resnet8",
        "teacher.allow_untrained=true", "trainer.progress_bar=false", "optim.schedule=cosine"]


@pytest.mark.parametrize("method", ["dkd", "reviewkd"])
@pytest.mark.parametrize(("epochs", "expected"), [(24, 2), (4, 0), (240, 20), (480, 40)])
def test_warmup_scales_with_the_run_unless_set(method: str, epochs: int, expected: int) -> None:
    options = parse_method_options(method, {})
    notes = options.fit_to_run(set(), RunFacts(max_epochs=epochs))
    assert options.warmup_epochs == expected
    assert bool(notes) == (expected != 20)
    if notes:
        assert notes[0].startswith(f"warmup_epochs={expected} (default 20 is for 240 epochs; scaled to this run's {epochs}")
    given = parse_method_options(method, {"warmup_epochs": 20})
    assert given.fit_to_run({"warmup_epochs"}, RunFacts(max_epochs=epochs)) == [] and given.warmup_epochs == 20


@pytest.mark.parametrize(("classes", "expected"), [(10, 2), (5, 1), (20, 3), (100, 8), (1000, 8)])
def test_meal_v2_discriminator_reduction_fits_the_class_count(classes: int, expected: int) -> None:
    options = parse_method_options("meal_v2", {})
    notes = options.fit_to_run(set(), RunFacts(num_classes=classes))
    assert options.disc_reduction == expected
    assert bool(notes) == (expected != 8)
    kept = parse_method_options("meal_v2", {"disc_reduction": 8})
    assert kept.fit_to_run({"disc_reduction"}, RunFacts(num_classes=classes)) == [] and kept.disc_reduction == 8


def test_meal_v2_with_defaults_builds_on_ten_classes(tmp_path: Path) -> None:
    built = build_run(build_config(None, [*TINY, "method.name=meal_v2", f"output={tmp_path}"]))
    assert built.method_options["disc_reduction"] == 2
    assert built.distiller.method.discriminators[0].widths == [10, 5, 2, 2]


def test_resolved_options_printed_and_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for c in range(3):
            (tmp_path / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((16, 16, 3), 60 * c + i, np.uint8)).save(tmp_path / "images" / split / f"c{c}" / f"{i}.png")
    # the recipe's data.num_classes stays at its default 10; the folder has 3 classes
    cfg = build_config(None, [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "method.name=dkd",
                              "trainer.max_epochs=1", f"output={tmp_path / 'run'}"])
    fit(cfg)
    out = capsys.readouterr().out
    assert "method dkd: ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0" in out
    assert "adapted to this run: warmup_epochs=0 (default 20 is for 240 epochs; scaled to this run's 1" in out
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["method"]["options"] == {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                            "warmup_epochs": 0}
    assert written["data"]["num_classes"] == 3


def test_trainer_threads_hold_for_the_run_and_the_callers_setting_comes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import kdistill.engine.run as run_module

    seen: list[int] = []
    real_fit = run_module._fit

    def recording_fit(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(run_module, "_fit", recording_fit)
    torch.set_num_threads(1)
    try:
        fit(build_config(None, [*TINY, "method.name=ce", "trainer.max_epochs=1", "trainer.threads=2",
                                f"output={tmp_path / 'two'}"]))
        assert seen == [2] and torch.get_num_threads() == 1
        fit(build_config(None, [*TINY, "method.name=ce", "trainer.max_epochs=1", f"output={tmp_path / 'default'}"]))
        assert seen == [2, 1]  # 0 (the default) leaves the caller's setting alone
        assert json.loads((tmp_path / "two" / "config.json").read_text())["trainer"]["threads"] == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_trainer_threads_must_be_a_count(value: str) -> None:
    from kdistill.utils import ConfigError

    with pytest.raises(ConfigError, match="trainer.threads"):
        build_config(None, [*TINY, f"trainer.threads={value}"])
