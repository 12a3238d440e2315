"""Tiny model + synthetic dataset for the evaluation-loop tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_eval():
    from latentr3_fast.data import dataset_corpus, make_synthetic, train_tokenizer
    from latentr3_fast.model import tiny_qwen2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core machine (see tests/decode)
    try:
        ds = make_synthetic(num_items=24, num_users=30, seed=1, max_len=6, duplicate_rate=0.2)
        tok = train_tokenizer(dataset_corpus(ds), vocab_size=280)
        model = tiny_qwen2(tok, hidden_size=32, seed=1)
    finally:
        torch.set_num_threads(threads)  # never leak the setting into other test dirs
    return ds, model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
