"""Recipes and overrides: types, names, ranges; every mistake names the key and what is allowed."""

from __future__ import annotations

import pytest

from kdistill.config import build_config, parse_override
from kdistill.utils import ConfigError


def test_overrides_parse_yaml_values_and_aliases() -> None:
    cfg = build_config(None, ["optim.lr=0.2", "data.batch_size=32", "optim.milestones=[1, 2]",
                              "teacher.checkpoint=t.pth", "teacher.model=cifar.resnet56", "model=cifar.resnet8",
                              "method.name=kd", "method.options.temperature=2", "trainer.devices=2"])
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32 and cfg.optim.milestones == [1, 2]
    assert cfg.teachers[0].checkpoint == "t.pth" and cfg.teachers[0].model == "cifar.resnet56"
    assert cfg.student.model == "cifar.resnet8" and cfg.method.options == {"temperature": 2}
    assert cfg.trainer.devices == 2


def test_recipe_file_then_overrides(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {batch_size: 16}\noptim: {lr: 0.1}\nmethod: {name: kd, options: {temperature: 3}}\n"
                      "teachers: [{model: cifar.resnet20}]\n")
    cfg = build_config(str(recipe), ["optim.lr=0.01"])
    assert cfg.data.batch_size == 16 and cfg.optim.lr == 0.01 and cfg.method.options["temperature"] == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], r"unknown config key 'optim.lrr'.*Did you mean 'optim.lr'"),
        (["optimm.lr=0.1"], r"unknown config key 'optimm'.*Did you mean 'optim'"),
        (["data.batch_size=abc"], r"data.batch_size: expected an integer, got 'abc'"),
        (["optim.lr=fast"], r"optim.lr: expected a number, got 'fast'"),
        (["optim.nesterov=maybe"], r"optim.nesterov: expected true or false"),
        (["model=cifar.resnet21"], r"unknown model for student.model 'cifar.resnet21'. Did you mean .*'cifar.resnet20'"),
        (["method.name=revewkd"], r"unknown method 'revewkd'"),
        (["data.name=cifar1000"], r"unknown value for data.name 'cifar1000'.*cifar100"),
        (["optim.schedule=cosin"], r"unknown value for optim.schedule 'cosin'.*Did you mean 'cosine'"),
        (["method.name=kd", "method.options.temprature=2"], r"method.options.temprature.*'temperature'"),
        (["optim.lr=-1"], r"optim.lr must be >= 0, got -1"),
        (["data.batch_size=0"], r"data.batch_size must be >= 1"),
        (["optim.lr"], r"malformed override 'optim.lr': expected key=value"),
        (["optim..lr=1"], r"malformed override"),
        (["optim.milestones=[1, 2"], r"value is not valid YAML"),
        (["teachers.3.model=cifar.resnet8"], r"index '3' is out of range"),
    ],
)
def test_bad_config_messages(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


def test_bad_recipe_files(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        build_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        build_config(str(listy))
    with pytest.raises(ConfigError, match="unknown recipe 'no/such/recipe'"):
        build_config("no/such/recipe")


def test_yaml_is_safe_loaded(tmp_path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("description: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(str(evil))


def test_parse_override_value_types() -> None:
    assert build_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1,2]") == ("a", [1, 2])


def test_every_recipe_validates_and_carries_its_published_number() -> None:
    from kdistill.methods import method_class
    from kdistill.recipes import list_recipes, load_recipe

    # bases (recipes/_base/) need not be complete recipes; detection recipes (task: detection) have their own
    # schema, checked in tests/test_detection_cli.py
    paths = [path for _, path in list_recipes() if load_recipe(path).get("task") != "detection"]
    assert len(paths) > 100
    for path in paths:
        cfg = build_config(str(path))
        raw = load_recipe(path)
        assert raw["description"], path
        # a number, or an explicit null with the source saying why none is published
        top1 = cfg.published["top1"]
        assert isinstance(top1, float) or (top1 is None and cfg.published.get("source")), path
        if method_class(cfg.method.name).needs_teacher:  # not ce or an online method (networks teach each other)
            assert cfg.teachers, path
