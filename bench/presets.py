"""Random-weight Qwen2 backbones of the step benchmarks (``bench_grpo``, ``bench_sft``)."""

from __future__ import annotations

import torch

# hidden, layers, heads, kv heads, intermediate, vocab
PRESETS = {
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, inter=768, vocab=32768),
    "qwen0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, vocab=151936),
    "qwen1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, inter=8960, vocab=151936),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preset_model(tok, preset: dict, dtype: str, device: str, attn: str | None, **kwargs):
    """``tiny_qwen2`` with the preset's shape (seed 0); ``kwargs`` go to ``tiny_qwen2``. The
    vocabulary is the tokenizer's: callers resize it to ``preset["vocab"]`` their own way."""
    from latentr3_fast.model import tiny_qwen2

    return tiny_qwen2(
        tok,
        hidden_size=preset["hidden"],
        num_layers=preset["layers"],
        num_heads=preset["heads"],
        num_kv_heads=preset["kv_heads"],
        intermediate=preset["inter"],
        seed=0,
        torch_dtype=DTYPES[dtype],
        device=device,
        attn_implementation=attn,
        **kwargs,
    )
