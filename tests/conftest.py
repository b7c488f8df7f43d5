"""Shared fixtures: tiny synthetic data, the shared real data when present."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny100-32`` unpacked once per session into a temporary cache (skips if absent)."""
    archive = SHARED / "data" / "tiny100-32.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real data not available: {archive} is missing")
    root = tmp_path_factory.mktemp("data")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root / "tiny100-32"
