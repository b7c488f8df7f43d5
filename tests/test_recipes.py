"""Recipe inheritance (``kdistill.recipes``): merge rules, base lookup, cycles and limits, listing, and
every repository recipe resolving to the configuration recorded before the recipes were put on bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill import recipes
from kdistill.cli import main
from kdistill.config import build_config
from kdistill.recipes import MAX_DEPTH, list_recipes, load_recipe, merge
from kdistill.utils import ConfigError

RECORDED = Path(__file__).parent / "data" / "recipes_resolved.jsonl"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_merge_is_deep_for_mappings_and_replaces_everything_else() -> None:
    base = {"optim": {"lr": 0.05, "milestones": [150, 180, 210]}, "teachers": [{"model": "a"}, {"model": "b"}],
            "published": {"top1": 70.0, "source": "x"}, "seed": 0}
    override = {"optim": {"lr": 0.01}, "teachers": [{"model": "c"}], "published": {"top1": None}, "seed": 3,
                "new": {"k": 1}}
    out = merge(base, override)
    assert out == {"optim": {"lr": 0.01, "milestones": [150, 180, 210]}, "teachers": [{"model": "c"}],
                   "published": {"top1": None, "source": "x"}, "seed": 3, "new": {"k": 1}}
    out["optim"]["milestones"].append(1)  # the result shares nothing with its inputs
    out["new"]["k"] = 2
    assert base["optim"]["milestones"] == [150, 180, 210] and override["new"] == {"k": 1}
    # a mapping replaces a scalar and the other way round
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge({"a": {"b": 2}}, {"a": 5}) == {"a": 5}


def test_bases_merge_left_to_right_then_the_file_on_top(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDISTILL_RECIPES", str(tmp_path / "recipes"))
    root = tmp_path / "recipes"
    _write(root, "_base/schedule.yaml", "optim: {lr: 0.05, momentum: 0.9}\ntrainer: {max_epochs: 240}\n")
    _write(root, "_base/light.yaml", "base: schedule\noptim: {lr: 0.01}\n")  # next to the file, no .yaml
    _write(root, "_base/teacher.yaml", "teachers: [{model: cifar.resnet56}]\ntrainer: {max_epochs: 100}\n")
    recipe = _write(root, "cifar/kd/pair.yaml",
                    "base: [_base/light, ../../_base/teacher.yaml]\ntrainer: {max_epochs: 7}\nseed: 1\n")
    assert load_recipe(recipe) == {"optim": {"lr": 0.01, "momentum": 0.9}, "trainer": {"max_epochs": 7},
                                   "teachers": [{"model": "cifar.resnet56"}], "seed": 1}
    # without the file's own trainer key the later base wins over the earlier one
    _write(root, "cifar/kd/pair.yaml", "base: [_base/light, _base/teacher]\n")
    assert load_recipe("cifar/kd/pair")["trainer"] == {"max_epochs": 100}
    # a single name and a list of one name are the same
    _write(root, "cifar/kd/one.yaml", "base: _base/schedule\n")
    assert load_recipe("cifar/kd/one") == {"optim": {"lr": 0.05, "momentum": 0.9}, "trainer": {"max_epochs": 240}}
    # a diamond is not a cycle: both branches share one base
    _write(root, "cifar/kd/diamond.yaml", "base: [_base/light, _base/schedule]\n")
    assert load_recipe("cifar/kd/diamond")["optim"]["lr"] == 0.05


def test_base_errors_name_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDISTILL_RECIPES", str(tmp_path))
    missing = _write(tmp_path, "missing.yaml", "base: _base/shedule\n")
    _write(tmp_path, "_base/schedule.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml.*base '_base/shedule' not found.*_base/schedule"):
        load_recipe(missing)
    a = _write(tmp_path, "a.yaml", "base: b\n")
    _write(tmp_path, "b.yaml", "base: [c]\n")
    _write(tmp_path, "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_recipe(a)
    own = _write(tmp_path, "self.yaml", "base: self\n")
    with pytest.raises(ConfigError, match=r"self\.yaml.*cycle"):
        load_recipe(own)
    for text, shown in (("base: 3\n", "3"), ("base: [a, 4]\n", "['a', 4]"), ("base: ['']\n", "['']")):
        bad = _write(tmp_path, "bad.yaml", text)
        with pytest.raises(ConfigError, match=r"bad\.yaml.*base must be a recipe name or a list") as err:
            load_recipe(bad)
        assert shown in str(err.value)
    broken = _write(tmp_path, "_base/broken.yaml", "optim: [unclosed\n")
    child = _write(tmp_path, "child.yaml", "base: _base/broken\n")
    with pytest.raises(ConfigError, match=rf"{broken.name}.*not valid YAML"):
        load_recipe(child)
    _write(tmp_path, "_base/list.yaml", "- a\n- b\n")
    _write(tmp_path, "child.yaml", "base: _base/list\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*must be a mapping of sections, got list"):
        load_recipe(child)


def test_depth_file_count_and_size_limits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDISTILL_RECIPES", str(tmp_path))
    for i in range(MAX_DEPTH):  # level i names level i+1; level MAX_DEPTH - 1 has no base
        _write(tmp_path, f"l{i}.yaml", f"base: l{i + 1}\n" if i < MAX_DEPTH - 1 else "seed: 5\n")
    assert load_recipe("l0") == {"seed": 5}  # exactly MAX_DEPTH files in the chain: allowed
    _write(tmp_path, f"l{MAX_DEPTH - 1}.yaml", f"base: l{MAX_DEPTH}\n")
    _write(tmp_path, f"l{MAX_DEPTH}.yaml", "seed: 6\n")
    with pytest.raises(ConfigError, match=rf"l{MAX_DEPTH}\.yaml.*deeper than {MAX_DEPTH}.*l0\.yaml -> l1\.yaml"):
        load_recipe("l0")
    monkeypatch.setattr(recipes, "MAX_FILES", 3)
    _write(tmp_path, "wide.yaml", "base: [w1, w2, w3]\n")
    for i in (1, 2, 3):
        _write(tmp_path, f"w{i}.yaml", f"seed: {i}\n")
    with pytest.raises(ConfigError, match=r"w3\.yaml.*more than 3 files"):
        load_recipe("wide")
    monkeypatch.setattr(recipes, "MAX_BYTES", 100)
    _write(tmp_path, "_base/huge.yaml", "description: '" + "x" * 200 + "'\n")
    _write(tmp_path, "small.yaml", "base: _base/huge\n")
    with pytest.raises(ConfigError, match=r"huge\.yaml.* is 2\d\d bytes; a recipe may be at most 100 bytes"):
        load_recipe("small")


def test_cli_resolves_bases_and_lists_only_runnable_recipes(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KDISTILL_RECIPES", str(tmp_path))
    _write(tmp_path, "_base/schedule.yaml", "optim: {lr: 0.2, milestones: [5]}\ntrainer: {max_epochs: 9}\n")
    _write(tmp_path, "mine/run.yaml", "base: _base/schedule\ndescription: my run\noptim: {lr: 0.3}\n")
    assert main(["train", "mine/run", "data.batch_size=16", "--print-config"]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.3 and cfg["optim"]["milestones"] == [5] and cfg["trainer"]["max_epochs"] == 9
    assert cfg["data"]["batch_size"] == 16 and cfg["description"] == "my run" and "base" not in cfg
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["mine/run"] and "my run" in listed[0]
    _write(tmp_path, "mine/loop.yaml", "base: loop\n")
    assert main(["train", "mine/loop", "--print-config"]) == 2
    assert "loop.yaml" in capsys.readouterr().err
    _write(tmp_path, "mine/badkey.yaml", "base: _base/schedule\noptim: {lrr: 1}\n")
    assert main(["train", "mine/badkey", "--print-config"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def _recorded() -> tuple[dict, dict[str, dict]]:
    lines = [json.loads(line) for line in RECORDED.read_text().splitlines()]
    return lines[0]["defaults"], {line["recipe"]: line["config"] for line in lines[1:]}


def test_every_recipe_resolves_to_its_recorded_configuration() -> None:
    """Recorded with the loader that had no ``base:`` (every recipe then spelled out in full), as each
    recipe's differences from the defaults of that time; the defaults are recorded too, so a changed
    default shows up here as well."""
    defaults, recorded = _recorded()
    # detection recipes (task: detection) have their own schema and their own test in test_detection_cli.py
    names = [name for name, path in list_recipes() if load_recipe(path).get("task") != "detection"]
    assert sorted(names) == sorted(recorded), set(names) ^ set(recorded)
    assert len(names) == 194
    for name in names:
        expected = build_config(base=merge(defaults, recorded[name])).to_dict()
        assert build_config(name).to_dict() == expected, name
