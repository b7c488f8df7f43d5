"""YAML for recipes and overrides: ``yaml.safe_load`` behind limits on size, nesting and alias expansion.

``safe_load`` never runs code, but a hostile or broken file can still exhaust the process: a value
nested thousands of levels deep overflows the parser's recursion, and a few lines of anchors and
aliases (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) expand to billions of nodes once the recipe is
copied or printed. The node graph is checked before any Python object is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from kdistill.utils import ConfigError

MAX_TEXT = 256 * 1024  # characters in one recipe or override value
MAX_NESTING = 32  # mappings / lists inside each other (the deepest recipe uses 4)
MAX_NODES = 100_000  # values after expanding every alias


def _check_graph(root: yaml.Node, where: str) -> None:
    """Depth and expanded size of a composed YAML node graph, without expanding it."""
    expanded: dict[int, int] = {}  # node id -> values below it, counted once per alias use
    depth_of: dict[int, int] = {id(root): 1}
    order: list[yaml.Node] = []
    stack: list[yaml.Node] = [root]
    seen: set[int] = set()
    while stack:  # iterative: a deep file must not overflow Python's stack here either
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        depth = depth_of[id(node)]
        if depth > MAX_NESTING:
            raise ConfigError(f"{where} is nested {depth} levels deep; at most {MAX_NESTING} are allowed")
        for child in _children(node):
            depth_of[id(child)] = max(depth_of.get(id(child), 0), depth + 1)
            stack.append(child)
    for node in reversed(order):  # children before parents (a YAML graph has no cycles we build)
        expanded[id(node)] = 1 + sum(expanded.get(id(c), 1) for c in _children(node))
        if expanded[id(node)] > MAX_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_NODES} values (anchors and aliases "
                              "repeated inside each other); write the values out instead")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _flow_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of flow collections outside quotes (a cheap scan before parsing:
    the parser recurses once per level, so thousands of brackets would exhaust its stack slowly)."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (a recipe or an override value) with ``yaml.safe_load`` semantics and limits.

    ``where`` names the source in errors. Raises ConfigError for invalid YAML, a text longer than
    ``MAX_TEXT``, nesting deeper than ``MAX_NESTING`` or more than ``MAX_NODES`` values after aliases."""
    if len(text) > MAX_TEXT:
        raise ConfigError(f"{where} is {len(text)} characters long; at most {MAX_TEXT} are allowed")
    if _flow_depth(text) > MAX_NESTING:
        raise ConfigError(f"{where} is nested {_flow_depth(text)} levels deep; at most {MAX_NESTING} are allowed")
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_graph(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError as exc:
        raise ConfigError(f"{where} is nested too deeply to read; at most {MAX_NESTING} levels are allowed") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about huge values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"
