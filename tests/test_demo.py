"""``kdistill demo --quick``: the three runs, the table's numbers and the curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kdistill
from kdistill.demo import DEMO, run_demo


@pytest.mark.slow
def test_quick_demo_writes_summary_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = run_demo(output=str(tmp_path), quick=True)
    assert list(summary) == ["teacher", "student alone", "KD student"]
    for label, role in (("teacher", "teacher"), ("student alone", "student"), ("KD student", "student")):
        name = DEMO[role]["model"]
        expected = sum(p.numel() for p in kdistill.create_model(name, num_classes=20).parameters())
        assert summary[label]["network"] == name and summary[label]["parameters"] == expected
        assert 0 <= summary[label]["top1"] <= summary[label]["top5"] <= 100
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "KD gain over the student alone" in out and "teacher" in out
    # the KD run really used the demo's teacher checkpoint
    card = json.loads((tmp_path / "kd" / "student.json").read_text())
    assert card["method"] == "kd" and card["recipe"]["teachers"][0]["checkpoint"].endswith("student.safetensors")
