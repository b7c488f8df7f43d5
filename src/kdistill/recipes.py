"""Recipe files: find them by name, read them safely, resolve their ``base:`` recipes.

A recipe may name one or several base recipes and override some of their keys::

    base: [_base/cifar100/methods/kd, _base/cifar100/teachers/resnet56]
    student: {model: cifar.resnet20}

Rules (docs/recipes.md):

- ``base`` is a recipe name or a list of names. A name is looked up next to the file that names it
  first (``../schedule``, ``teachers/resnet56.yaml``), then under ``recipes/``; ``.yaml`` is optional.
- Bases are merged left to right, then the file's own keys on top. Merging is deep for mappings; any
  other value (a list, a number, a string, ``null``) replaces the base's value as a whole.
- Bases may have bases. A cycle, a chain deeper than ``MAX_DEPTH``, more than ``MAX_FILES`` files in
  one resolution, or a file larger than ``MAX_BYTES`` stops with a ``ConfigError`` naming the file.
- Files under a folder whose name starts with ``_`` (``recipes/_base/``) are bases: ``kdistill
  recipes`` does not list them, but they can still be named as a path.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from kdistill.safe_yaml import load_yaml
from kdistill.utils import ConfigError, unknown_name_error

BASE_KEY = "base"
MAX_DEPTH = 8  # a recipe, its base, the base's base, ...: longer chains are almost certainly a mistake
MAX_FILES = 64  # files read to resolve one recipe (a diamond counts each file once)
MAX_BYTES = 256 * 1024  # the largest recipe in the repository is about 2 kB


def recipes_dir() -> Path:
    """Where named recipes live: ``$KDISTILL_RECIPES`` or the repository's ``recipes/``."""
    env = os.environ.get("KDISTILL_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def is_base(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` (under ``root``) is a base recipe: some folder on the way starts with ``_``."""
    root = recipes_dir() if root is None else root
    try:
        parts = path.resolve().relative_to(root.resolve()).parts[:-1]
    except ValueError:
        return False
    return any(part.startswith("_") for part in parts)


def list_recipes(root: Path | None = None) -> list[tuple[str, Path]]:
    """The runnable recipes under ``root`` as (name, path), sorted by name; bases are left out."""
    root = recipes_dir() if root is None else root
    rows = [(str(p.relative_to(root).with_suffix("")), p) for p in root.rglob("*.yaml") if not is_base(p, root)]
    return sorted(rows)


def _candidates(name: str, folder: Path) -> list[Path]:
    return [folder / name] if name.endswith((".yaml", ".yml")) else [folder / f"{name}.yaml", folder / name]


def find_recipe(name: str, relative_to: Path | None = None) -> Path:
    """A recipe by path, or by name relative to ``relative_to`` (a folder) and then to ``recipes/``.

    ``find_recipe("cifar100/kd/resnet56-resnet20")`` is ``recipes/cifar100/kd/resnet56-resnet20.yaml``.
    """
    path = Path(name)
    if relative_to is None and path.is_file():
        return path
    folders = ([relative_to] if relative_to is not None else []) + [recipes_dir()]
    for folder in folders:
        for candidate in _candidates(name, folder):
            if candidate.is_file():
                return candidate
    root = recipes_dir()
    if relative_to is None:  # a recipe to run: suggest runnable ones; a base: suggest any file
        known = [n for n, _ in list_recipes(root)] if root.is_dir() else []
    else:
        known = [str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")] if root.is_dir() else []
    raise unknown_name_error("recipe", name, known)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping (``base`` not resolved): size-checked, ``yaml.safe_load`` only."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    if size > MAX_BYTES:
        raise ConfigError(f"recipe {str(path)!r} is {size} bytes; a recipe may be at most {MAX_BYTES} bytes")
    try:
        raw = load_yaml(path.read_text(), f"recipe {str(path)!r}")  # nesting and alias expansion bounded
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, every other value replaces.

    Neither argument is modified; the result shares no mutable values with them.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _show(path: Path) -> str:
    """``path`` for messages: relative to ``recipes/`` when it is under it."""
    try:
        return str(path.resolve().relative_to(recipes_dir().resolve()))
    except ValueError:
        return str(path)


def _base_names(raw: dict[str, Any], path: Path) -> list[str]:
    names = raw.get(BASE_KEY)
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"recipe {str(path)!r}: {BASE_KEY} must be a recipe name or a list of recipe names, "
                          f"got {names!r}")
    return names


class _Resolver:
    """Resolves one recipe: remembers the chain being resolved (cycles, depth) and the files read."""

    def __init__(self) -> None:
        self.files: dict[Path, dict[str, Any]] = {}

    def read(self, path: Path) -> dict[str, Any]:
        key = path.resolve()
        if key not in self.files:
            if len(self.files) >= MAX_FILES:
                raise ConfigError(f"recipe {str(path)!r}: resolving its bases reads more than {MAX_FILES} files")
            self.files[key] = read_recipe_file(path)
        return self.files[key]

    def resolve(self, path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
        key = path.resolve()
        if key in chain:
            names = " -> ".join(_show(p) for p in (*chain[chain.index(key):], key))
            raise ConfigError(f"recipe {str(path)!r}: its bases form a cycle: {names}")
        if len(chain) >= MAX_DEPTH:
            raise ConfigError(f"recipe {str(path)!r}: base chain deeper than {MAX_DEPTH} "
                              f"({' -> '.join(_show(p) for p in (*chain, key))})")
        raw = self.read(path)
        tree: dict[str, Any] = {}
        for name in _base_names(raw, path):
            try:
                base_path = find_recipe(name, relative_to=path.parent)
            except ConfigError as exc:
                raise ConfigError(f"recipe {str(path)!r}: base {name!r} not found (looked next to the file and "
                                  f"under {str(recipes_dir())!r}). {exc}") from None
            tree = merge(tree, self.resolve(base_path, (*chain, key)))
        return merge(tree, {k: v for k, v in raw.items() if k != BASE_KEY})


def load_recipe(recipe: str | Path) -> dict[str, Any]:
    """A recipe (path or name) with its bases resolved, as a plain mapping without the ``base`` key."""
    path = recipe if isinstance(recipe, Path) else find_recipe(recipe)
    return _Resolver().resolve(path, ())
