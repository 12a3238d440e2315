"""Tiny backbones built from a config (tests, the demo, CPU benchmarks)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .loading import (
    default_attn_implementation,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from .reasoner import LatentReasoner

__all__ = ["tiny_qwen2"]


def tiny_qwen2(
    tokenizer: Any,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    num_latent: int = 1,
    latent_mode: str = "ratt",
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> LatentReasoner:
    """A randomly initialised Qwen2 backbone sized for ``tokenizer`` (thought token included).

    Untied LM head by default (``tie_word_embeddings=False``): the output projection is then a
    separate ``[V, d]`` weight, the general case every code path must handle; pass True to
    mimic Qwen2.5-1.5B/0.5B, which tie it to the input embedding.
    Initialisation is deterministic in ``seed`` and leaves the global RNG untouched.
    """
    prepare_tokenizer(tokenizer)
    dev = resolve_device(device)
    dtype = resolve_dtype(torch_dtype, dev)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        use_sliding_window=False,
    )
    config._attn_implementation = attn_implementation or default_attn_implementation(dev, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = Qwen2ForCausalLM(config)
        model = LatentReasoner(backbone, tokenizer, num_latent=num_latent, latent_mode=latent_mode)
    return model.to(device=dev, dtype=dtype)
