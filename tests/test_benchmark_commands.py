"""Commands recorded in benchmark results name no path of the machine that ran them."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def common(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("common", None)  # tests/ has a conftest, not a module of this name; import the benchmarks' one
    import common as module

    yield module
    sys.modules.pop("common", None)


def test_cache_repo_and_shared_paths_become_portable(common, tmp_path: Path) -> None:
    argv = ["distill", f"data.root={tmp_path / 'cache'}/data/tiny100-32", f"teacher.checkpoint={common.SHARED}/teachers/t.pth",
            f"output={common.ROOT}/runs/bench-accuracy/kd-seed0", "student.kwargs.networks=[a,b]", "seed=0"]
    shown = common.shown_command(argv)
    assert shown == ("kdistill distill data.root=$KDISTILL_CACHE/data/tiny100-32 teacher.checkpoint=../shared/teachers/t.pth "
                     "output=runs/bench-accuracy/kd-seed0 'student.kwargs.networks=[a,b]' seed=0")
    assert str(tmp_path) not in shown and str(common.ROOT) not in shown


def test_a_quoted_cache_path_stays_expandable_by_the_shell(common, tmp_path: Path) -> None:
    shown = common.shown_command(["train", f"data.root={tmp_path / 'cache'}/my data"])
    assert shown == 'kdistill train "data.root=$KDISTILL_CACHE/my data"'
    # the shell expands it back to the original path, as one argument
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {shown.split(' ', 2)[2]}"], capture_output=True, text=True,
                         env={"KDISTILL_CACHE": "/c"}).stdout
    assert out == "data.root=/c/my data\n"
    assert shlex.split(shown.replace("$KDISTILL_CACHE", "/c"))[2] == "data.root=/c/my data"


def test_shown_path_names_the_folder_by_its_variable(common, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE", "/data/cache/")
    assert common.shown_path("/data/cache/photos/train") == "$CACHE/photos/train"
    assert common.shown_path("/elsewhere/photos") == "/elsewhere/photos"
    monkeypatch.delenv("CACHE")
    assert common.shown_path("/data/cache/photos") == "/data/cache/photos"
