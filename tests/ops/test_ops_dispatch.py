"""Backend selection rules."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.errors import ConfigError
from latentr3_fast.ops import select_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("LATENTR3_KERNELS", raising=False)
    assert select_backend(torch.zeros(1), None) == "torch"


def test_force_torch(monkeypatch):
    monkeypatch.setenv("LATENTR3_KERNELS", "torch")
    assert select_backend(torch.zeros(1)) == "torch"


def test_force_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LATENTR3_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        select_backend(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.zeros(1)) == "triton"


def test_bad_value(monkeypatch):
    monkeypatch.setenv("LATENTR3_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="LATENTR3_KERNELS"):
        select_backend(torch.zeros(1))


def test_import_without_triton():
    # `import latentr3_fast.ops` must not import triton (it is imported lazily).
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; import latentr3_fast.ops as o, torch;"
        "print(o.select_backend(torch.zeros(1)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"
