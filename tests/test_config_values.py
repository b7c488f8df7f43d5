"""Every configuration key is checked before training (kdistill.config_values, kdistill.safe_yaml): a
fuzz test drives each leaf key of the schema with wrong types, out-of-range values, empty values and
deep nesting, in process; a few cases go through the ``kdistill`` command as a user would."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from kdistill.cli import main
from kdistill.config import Config, build_config, validate
from kdistill.config_values import RULES, free, schema_leaves
from kdistill.utils import ConfigError

BASE: dict[str, Any] = {"method": {"name": "kd"}, "teachers": [{"model": "cifar.resnet8"}],
                        "student": {"model": "cifar.resnet8"}}
HUGE_IS_VALID = {"trainer.gradient_clip_val", "trainer.limit_train_batches", "trainer.limit_val_batches",
                 "optim.warmup_epochs"}
EMPTY_IS_VALID = {"description"}  # free text


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def bad_values(key: str, tp: Any) -> list[Any]:
    """Values of the wrong type, out of range, empty, or nested, for a key annotated ``tp``."""
    args = typing.get_args(tp)
    optional = type(None) in args
    core = next((a for a in args if a is not type(None)), tp) if optional else tp
    deep = nested(30)
    values: list[Any] = [deep, {"a": {"b": 1}}]
    if not optional and core is not Any:
        values.append(None)
    if core is int:
        values += ["abc", "", [1], True, 1.5, -1, 10**13]
    elif core is float:
        values += ["abc", "", [1.0], True, math.nan, math.inf, -math.inf, -1.0]
        if key not in HUGE_IS_VALID:
            values.append(1e13)
    elif core is bool:
        values += ["maybe", "", 2, [True]]
    elif core is str:
        values += [[], ["x"], [1, 2]]
        if key not in EMPTY_IS_VALID:
            values += ["", "  "]
    elif typing.get_origin(core) is list:
        values += ["abc", "", 5, [deep], ["x"], [math.nan], [{"a": 1}]]
        if key.endswith("std"):
            values += [[0.0, 0.0, 0.0], [0.5, -1.0, 0.5], [0.5, 0.5]]
        if key.endswith("mean"):
            values += [[0.5, 0.5], []]
        if key == "optim.milestones":
            values += [[-1], [10**13]]
    elif typing.get_origin(core) is dict:
        values = [deep, "abc", "", 5, [1]]
        if key.endswith("taps"):
            values += [{"feat": ""}, {"feat": [1]}, {"feat": deep}]
        if key.endswith("kwargs"):
            values += [{"no_such_option": 1}, {"num_classes": 3}]
        if key == "method.options":
            values += [{"no_such_option": 1}]
    elif core is Any:  # trainer.devices
        values += ["abc", "", 0, -2, 1.5, True, [], [-1], [0, 0], {"a": 1}]
    return values


def set_key(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    node: Any = tree
    parts = key.replace("*", "0").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


CASES = [(key, value) for key, tp in schema_leaves().items() for value in bad_values(key, tp)]


def test_every_schema_key_has_a_rule() -> None:
    leaves = set(schema_leaves())
    assert leaves == set(RULES), (leaves - set(RULES), set(RULES) - leaves)
    # only free-form keys and plain switches go without a range or name rule
    assert {k for k, r in RULES.items() if r is free} == {
        "description", "published", "data.download", "data.augment", "student.kwargs", "teachers.*.kwargs",
        "teacher.channels_last", "teacher.allow_untrained", "teacher.evaluate", "method.options", "optim.nesterov",
        "trainer.compile", "trainer.channels_last", "trainer.progress_bar"}


def test_base_config_is_valid() -> None:
    validate(Config.from_dict(BASE))


def test_fuzz_every_key_wrong_type_out_of_range_empty_nested() -> None:
    """Every case must stop with a ConfigError that names the key (teachers.* as teachers.0)."""
    assert len({k for k, _ in CASES}) == len(schema_leaves())
    failures = []
    for key, value in CASES:
        try:
            validate(Config.from_dict(set_key(BASE, key, value)))
        except ConfigError as exc:
            if key.replace("*", "0") not in str(exc):
                failures.append(f"{key}={value!r:.60}: message does not name the key: {exc}")
        except Exception as exc:  # a traceback for the user
            failures.append(f"{key}={value!r:.60}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{key}={value!r:.60}: accepted")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} of {len(CASES)} cases)"


@pytest.mark.parametrize("key", sorted(k.replace("*", "0") for k in schema_leaves()))
def test_override_nested_beyond_the_limit_names_the_key(key: str) -> None:
    text = f"{key}=" + "[" * 5000 + "]" * 5000
    with pytest.raises(ConfigError, match="nested") as info:
        build_config(None, ["teacher.model=cifar.resnet8", text])
    assert key in str(info.value) and len(str(info.value)) < 400


def test_recipe_limits(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("optim:\n  milestones: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        build_config(str(deep))
    laughs = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    laughs.write_text("published:\n" + "\n".join("  " + line for line in lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        build_config(str(laughs))
    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * 300_000 + "'\n")
    with pytest.raises(ConfigError, match="bytes|characters"):
        build_config(str(big))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=abc", "trainer.devices must be a number of devices >= 1"),
        ("trainer.strategy=bogus", "unknown value for trainer.strategy 'bogus'"),
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu but this machine has no usable GPU"),
        ("student.kwargs.bogus=1", "student.kwargs.bogus: model 'cifar.resnet8' does not accept"),
        ("data.image_size=0", "data.image_size must be an integer in [4, 4096], got 0"),
        ("data.std=[0,0,0]", "data.std[0] must be a finite number > 0"),
        ("trainer.limit_train_batches=2.5", "trainer.limit_train_batches must be a fraction in (0, 1]"),
        ("seed=-1", "seed must be an integer in [0, 4294967295]"),
        ("method.name=nosuch", "method.name: unknown method 'nosuch'"),
    ],
)
def test_cli_bad_values_exit_2_naming_the_key(override: str, message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    if override.startswith("trainer.accelerator=gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = tmp_path / "o"
    code = main(["train", "model=cifar.resnet8", f"output={out}", "data.train_size=8", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_console_script_deep_recipe_exits_2_without_traceback(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("trainer:\n  devices: " + "[" * 20000 + "]" * 20000 + "\n")
    done = subprocess.run([sys.executable, "-m", "kdistill.cli", "train", str(deep), "trainer.strategy=bogus",
                           f"output={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nested" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_fuzz_every_method_option() -> None:
    """Every option of every method: wrong types, out of range, empty, nested; the error names
    ``method.options`` and the option, through the same validation as a recipe."""
    import dataclasses

    from kdistill.methods import list_methods, method_class

    failures, count = [], 0
    for method in list_methods():
        hints = typing.get_type_hints(method_class(method).Options)
        for f in dataclasses.fields(method_class(method).Options):
            core = hints[f.name]
            values: list[Any] = [{"a": {"b": 1}}, nested(30), "", [["x"]]]
            if core in (int, float, int | None, float | None):
                values += ["abc", -1, math.nan]
            if typing.get_origin(core) is None and core in (str,):
                values += ["no-such-choice"]
            for value in values:
                count += 1
                tree = {**BASE, "method": {"name": method, "options": {f.name: value}}}
                try:
                    validate(Config.from_dict(tree))
                except ConfigError as exc:
                    if "method.options" not in str(exc) or f.name not in str(exc):
                        failures.append(f"{method}.{f.name}={value!r:.40}: {exc}")
                except Exception as exc:
                    failures.append(f"{method}.{f.name}={value!r:.40}: {type(exc).__name__}: {exc}")
                else:
                    failures.append(f"{method}.{f.name}={value!r:.40}: accepted")
    assert count > 300 and not failures, "\n".join(failures[:40]) + f"\n({len(failures)} of {count})"
