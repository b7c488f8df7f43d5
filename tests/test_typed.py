"""kdistill.typed: values checked against annotations and dataclasses built from mappings, with the key
named in every error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kdistill.typed import build_dataclass, coerce
from kdistill.utils import ConfigError


@dataclass
class Inner:
    size: int = 1


@dataclass
class Outer:
    rate: float = 0.5
    name: str = "a"
    levels: tuple[int, ...] = (4, 2)
    pair: tuple[int, str] = (1, "x")
    dims: list[int | None] | None = None
    shapes: list[int | list[int]] | None = None
    inner: Inner | None = None


def test_coercions() -> None:
    assert coerce("k", 3, float) == 3.0 and isinstance(coerce("k", 3, float), float)
    assert coerce("k", "1e-3", float) == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert coerce("k", 32, str) == "32"
    assert coerce("k", [4, 2, 1], tuple[int, ...]) == (4, 2, 1)
    assert coerce("k", [8, [4, 6]], list[int | list[int]]) == [8, [4, 6]]
    assert coerce("k", [None, 3], list[int | None]) == [None, 3]


@pytest.mark.parametrize(
    ("value", "tp", "message"),
    [
        ("abc", float, r"^k: expected a number, got 'abc'$"),
        (True, int, r"^k: expected an integer, got True$"),
        (2.5, int, r"^k: expected an integer, got 2.5$"),
        ("yes", bool, r"^k: expected true or false, got 'yes'$"),
        ([1, "b"], tuple[int, ...], r"^k\[1\]: expected an integer, got 'b'$"),
        ([1], tuple[int, str], r"^k: expected a list of 2 values, got \[1\]$"),
        ("x", list[int], r"^k: expected a list, got 'x'$"),
        ({"a": 1}, int | None, r"^k: expected an integer, got \{'a': 1\}$"),
        ([1.5], int | list[int], r"^k: expected int or list, got \[1.5\]$"),
    ],
)
def test_errors_name_the_key(value, tp, message) -> None:
    with pytest.raises(ConfigError, match=message):
        coerce("k", value, tp)


def test_build_dataclass() -> None:
    built = build_dataclass(Outer, {"rate": 1, "levels": [1], "inner": {"size": 3}}, "sec")
    assert built == Outer(rate=1.0, levels=(1,), inner=Inner(3))
    with pytest.raises(ConfigError, match=r"unknown config key 'sec.rat'. Did you mean 'sec.rate'"):
        build_dataclass(Outer, {"rat": 1}, "sec")
    with pytest.raises(ConfigError, match=r"sec.inner.size: expected an integer"):
        build_dataclass(Outer, {"inner": {"size": "big"}}, "sec")
    with pytest.raises(ConfigError, match=r"^custom rat$"):
        build_dataclass(Outer, {"rat": 1}, unknown=lambda key, allowed: ConfigError(f"custom {key}"))
    with pytest.raises(ConfigError, match=r"sec: expected a mapping, got \[1\]"):
        build_dataclass(Outer, [1], "sec")
