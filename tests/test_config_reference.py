"""``kdistill config`` and docs/config.md: every key with type, default and meaning, from the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.config import Config
from kdistill.config.reference import config_keys, render_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            keys |= _leaf_keys(type(value), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def test_every_key_has_type_default_and_meaning() -> None:
    rows = {r.key: r for r in config_keys()}
    assert _leaf_keys(Config) <= set(rows)
    assert "teachers.N.pretrained" in rows and "teachers.N.checkpoint" in rows
    missing = [k for k, r in rows.items() if not r.meaning]
    assert not missing, f"add a trailing comment with the meaning to these fields in config/schema.py: {missing}"
    assert (rows["data.val_per_class"].type, rows["data.val_per_class"].default) == ("int | None", None)
    assert (rows["optim.lr"].type, rows["optim.lr"].default) == ("float", 0.05)
    assert (rows["trainer.max_epochs"].type, rows["trainer.max_epochs"].default) == ("int", 240)


def test_docs_config_md_is_up_to_date() -> None:
    assert DOC.read_text() == render_markdown(), "regenerate: kdistill config --markdown > docs/config.md"


def test_cli_prints_the_reference(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "data.image_size" in out and "resize images to this side in pixels" in out
    assert "  dkd: ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, " \
           "warmup_epochs: int = 20" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "kdistill config" in capsys.readouterr().out
