"""Typed values from YAML: check a value against a type annotation, build a dataclass from a mapping.

One implementation for the recipe sections (``kdistill.config``) and every method's options
(``Method.Options``): wrong types and unknown keys raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kdistill.safe_yaml import short_repr
from kdistill.utils import ConfigError, unknown_name_error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(path: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are expected,
    lists where tuples are, numbers where strings are. ``path`` names the key in errors."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # ``X | None``: X's own error names the nested key and what X expects
            return coerce(path, value, real[0])
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(path, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {short_repr(value)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {short_repr(value)}")
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):  # sections in a list are named as overrides name them: teachers.0.model
            return [coerce(f"{path}.{i}", v, item) for i, v in enumerate(value)]
        return [coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {short_repr(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {short_repr(value)}")
        return tuple(coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {short_repr(value)}")
        key_type, item_type = typing.get_args(tp) or (Any, Any)
        return {coerce(f"{path}.{k}", k, key_type): coerce(f"{path}.{k}", v, item_type) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {short_repr(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {short_repr(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {short_repr(value)}")
        return value
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. teacher.precision=32
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {short_repr(value)}")
        return value
    return value


def build_dataclass(
    cls: type,
    raw: Any,
    path: str = "",
    unknown: Callable[[str, Iterable[str]], ConfigError] | None = None,
) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``raw`` (``None`` means all defaults).

    Every value is coerced to its field's annotation; an unknown key raises ``unknown(key, allowed)``
    (default: "unknown config key" with the dotted path and close matches).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {short_repr(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            if unknown is not None:
                raise unknown(str(key), names)
            raise unknown_name_error("config key", full, [f"{path}.{n}" if path else n for n in names])
        kwargs[key] = coerce(full, value, hints[key])
    return cls(**kwargs)
