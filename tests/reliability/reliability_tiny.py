"""The tiny model and data of the reliability tests and their subprocess drivers (one
definition). Light to import: no hypothesis, latentr3_fast imported on first use."""

from __future__ import annotations

from typing import Any


def tiny_model(tok: Any, num_heads: int = 2, num_kv_heads: int = 1) -> Any:
    """2 layers x 32 Qwen2 with one latent, seed 0: milliseconds per training step."""
    from latentr3_fast.model import tiny_qwen2

    return tiny_qwen2(
        tok,
        hidden_size=32,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate=64,
        seed=0,
        num_latent=1,
    )


def tiny_data(seed: int, n_train: int, n_valid: int = 0, max_length: int = 48) -> tuple:
    """A 30-item x 30-user synthetic catalogue, a 300-token BPE trained on it, and the first
    ``n_train`` / ``n_valid`` rows encoded with the clean template. Returns
    ``(tokenizer, train, valid)``."""
    from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer

    ds = make_synthetic(num_items=30, num_users=30, seed=seed)
    tok = train_tokenizer(dataset_corpus(ds, "clean"), vocab_size=300)
    pb = PromptBuilder(tok, ds.category, template="clean", num_latent=1, max_length=max_length)
    return tok, pb.encode_many(ds.train[:n_train]), pb.encode_many(ds.valid[:n_valid])
