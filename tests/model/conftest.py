"""Fixtures of the model tests: a tiny BPE tokenizer (fresh per test: the reasoner adds a token)."""

from __future__ import annotations

import pytest

from latentr3_fast.data import train_tokenizer

CORPUS = [
    "Below is an instruction that describes a task. ### Response: \n",
    '"Greatest Hits"\n',
    '"Abbey Road"\n',
    '"Kind of Blue"\n',
    "The user has palyed the following musics before: ",
] * 4


@pytest.fixture
def tokenizer():
    """A fresh byte-level BPE tokenizer (vocab ~300, eos = pad)."""
    return train_tokenizer(CORPUS, vocab_size=300)
