"""Kernel tests: Triton kernels on CUDA, or under TRITON_INTERPRET=1 on CPU (set by
tests/conftest.py before any kernel is defined)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The plain references (bench/reference_ops.py) are shared with tests/ops and the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    HAVE_TRITON = False


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.kernel)
            if not HAVE_TRITON:
                item.add_marker(pytest.mark.skip(reason="triton not importable"))
            elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                item.add_marker(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET!=1"))


@pytest.fixture
def device() -> str:
    """CUDA when present (real kernels), else CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
