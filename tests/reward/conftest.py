"""Tiny backbones and a tiny tokenizer for the reward tests (built in well under a second)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# bench/ (not a package) holds the reference implementations the tests compare against
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

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


def tiny_qwen2(vocab_size: int = 300, attn: str = "sdpa", seed: int = 0, hidden: int = 64):
    """A 2-layer Qwen2 causal LM in fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    model = Qwen2ForCausalLM(cfg).eval()
    # Larger head weights than the default init so log-probs are far from uniform.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from latentr3_fast.data import train_tokenizer

    return train_tokenizer(TITLES * 4, vocab_size=300)


@pytest.fixture(scope="session")
def make_qwen2():
    """Factory fixture: ``make_qwen2(vocab_size=..., attn=..., seed=..., hidden=...)``."""
    return tiny_qwen2


@pytest.fixture(scope="session")
def qwen():
    return tiny_qwen2()
