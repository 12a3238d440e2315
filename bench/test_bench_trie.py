"""pytest-benchmark suite for the trie: ``python -m pytest bench/test_bench_trie.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from latentr3_fast.decode import ItemTrie

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trie import make_catalogue  # noqa: E402

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def catalogue():
    toks = make_catalogue(100_000, 12, 151_643)
    return toks.reshape(-1), np.arange(0, toks.size + 1, 12, dtype=np.int64), toks


def test_build_100k_x_12(benchmark, catalogue):
    flat, offsets, _ = catalogue
    trie = benchmark(ItemTrie.from_flat, flat, offsets)
    assert trie.num_items == 100_000
    assert benchmark.stats.stats.min < 1.0  # issue target


def test_allowed_640_states(benchmark, catalogue):
    flat, offsets, _ = catalogue
    trie = ItemTrie.from_flat(flat, offsets)
    depths = trie.to_csr()["depths"]
    states = np.random.default_rng(0).choice(np.flatnonzero(depths == 3), size=640)
    off, _ = benchmark(trie.allowed, states)
    assert len(off) == 641
