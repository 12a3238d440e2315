"""Shared fixtures of the ops tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the torch reference path of every op."""
    monkeypatch.setenv("LATENTR3_KERNELS", "torch")
