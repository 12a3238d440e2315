"""Tiny backbones and a tiny tokenizer for the reward tests (built in well under a second)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ holds the reference implementations the tests compare against, tests/model the tiny
# backbones both test directories build (neither is a package)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "model"))
from backbones import tiny_qwen2_lm  # noqa: E402

TITLES = [
    "Greatest Hits",
    "The Quick Brown Fox",
    "Abbey Road",
    "Kind of Blue",
    "Blue Train",
    "Songs in the Key of Life",
    "What is the answer? It is forty two.",
    "user: assistant: system:",
]


@pytest.fixture(scope="session")
def tokenizer():
    from latentr3_fast.data import train_tokenizer

    return train_tokenizer(TITLES * 4, vocab_size=300)


@pytest.fixture(scope="session")
def make_qwen2():
    """Factory fixture: ``make_qwen2(vocab_size=..., attn=..., seed=..., hidden=...)``."""
    return tiny_qwen2_lm


@pytest.fixture(scope="session")
def qwen():
    return tiny_qwen2_lm()
