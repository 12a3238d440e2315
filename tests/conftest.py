"""Session-wide test setup.

Without a GPU, Triton kernels can only run in the interpreter, and TRITON_INTERPRET must be set
before any kernel is defined, so it is set here, first. Denormal flushing must be the first
torch call of the process to take effect (it speeds up tiny-model CPU training a lot). Tests
use one intra-op thread: the models are tiny (framework overhead dominates) and several tests
start worker processes, which would otherwise oversubscribe the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_flush_denormal(True)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocess tests

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when the datasets are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not present at {SHARED_DATA}")
    return SHARED_DATA
