"""Shared fixtures of the ops tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The plain references (bench/reference_ops.py) are shared with tests/kernels and the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the torch reference path of every op."""
    monkeypatch.setenv("LATENTR3_KERNELS", "torch")
