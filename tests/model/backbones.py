"""Tiny Hugging Face backbones shared by the model and reward tests (built in well under a
second); the reward tests import this module through ``tests/reward/conftest.py``."""

from __future__ import annotations

import torch


def tiny_qwen2_lm(vocab_size: int = 300, attn: str = "sdpa", seed: int = 0, hidden: int = 64):
    """A 2-layer Qwen2 causal LM in fp32, eval mode, with an untied, large-ish LM head."""
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


def softcapped_gemma2(vocab_size: int):
    """A 1-layer Gemma 2 with a tanh final-logit soft-cap of 30 (which the fused head rejects)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            final_logit_softcapping=30.0,
        )
    )
