"""The methods package stands below the training step: no module under ``kdistill/methods`` imports the
step, the engine, the CLI or the configuration (checked on the source, including imports inside
functions and under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import kdistill.methods

METHODS_DIR = Path(kdistill.methods.__file__).parent
FORBIDDEN = ("kdistill.step", "kdistill.engine", "kdistill.cli", "kdistill.config", "kdistill.demo")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement in ``path`` names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "kdistill.methods"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import kdistill.engine.run\nfrom kdistill import step\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kdistill.config import Config\n"
        "def f():\n    from ..cli import main\n"
    )
    found = imported_modules(probe)
    assert {"kdistill.engine.run", "kdistill.step", "kdistill.config", "kdistill.cli"} <= found


def test_no_method_module_imports_the_step_engine_cli_or_config() -> None:
    files = sorted(METHODS_DIR.glob("*.py"))
    assert {"base.py", "kd.py", "reviewkd.py", "meal.py", "crd.py"} <= {f.name for f in files}
    offending = {
        f.name: sorted(m for m in imported_modules(f) if m.startswith(FORBIDDEN))
        for f in files
    }
    assert {name: mods for name, mods in offending.items() if mods} == {}
