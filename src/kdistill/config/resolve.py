"""A recipe (with its ``base:`` recipes) plus ``key=value`` overrides resolved into a checked ``Config``.
YAML is read with ``yaml.safe_load`` only, under limits on size, nesting and alias expansion."""

from __future__ import annotations

from typing import Any

from kdistill.config.checks import validate
from kdistill.config.schema import TEACHER_FIELDS, Config
from kdistill.recipes import load_recipe
from kdistill.safe_yaml import load_yaml, short_repr
from kdistill.utils import ConfigError


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``"a.b"``, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected key=value, for example optim.lr=0.05")
    value = load_yaml(raw, f"override {short_repr(text)}: value") if raw.strip() else None
    return key, value


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "teacher" and len(parts) > 1 and parts[1] in TEACHER_FIELDS:
        parts = ["teachers", "0", *parts[1:]]  # teacher.checkpoint=... means the first teacher
    if parts[0] == "model" and len(parts) == 1:
        parts = ["student", "model"]  # kdistill train model=cifar.resnet56
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {key!r}: index {part!r} is out of range for a list of {len(node)}")
            if int(part) == len(node):
                node.append({})
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"override {key!r}: index {last!r} is out of range for a list of {len(node)}")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])!r} is not a section")


def load_raw(recipe: str | None) -> dict[str, Any]:
    """The recipe as a dict with its ``base:`` recipes resolved (empty for no recipe)."""
    return {} if recipe is None else load_recipe(recipe)


def build_config(recipe: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Resolve a recipe + overrides into a validated ``Config`` (nothing is trained or loaded)."""
    tree = dict(base or {})
    tree.update(load_raw(recipe))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = Config.from_dict(tree)
    validate(cfg)
    return cfg
