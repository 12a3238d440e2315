"""Loading helpers of the reasoner: device, dtype, attention implementation and tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..data import THOUGHT_TOKEN
from ..errors import ConfigError

__all__ = [
    "default_attn_implementation",
    "load_tokenizer",
    "prepare_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bf16 on CUDA, fp32 on CPU; also accepts fp32/bf16/fp16 names."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"torch_dtype={dtype!r}: expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 on CUDA in half precision when flash-attn is importable, else sdpa."""
    if (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load a tokenizer exactly as it was saved.

    A tokenizer saved from a plain ``tokenizers`` backend (e.g. the tiny BPE of the embedded
    default) must be loaded verbatim: ``AutoTokenizer`` would pick the backbone's class from
    ``config.json`` (Qwen2Tokenizer) and rebuild the pre-tokenizer, silently changing how
    digits are split, so a saved model would see different tokens than it was trained on.
    """
    path = Path(name_or_path)
    cfg_file = path / "tokenizer_config.json"
    if path.is_dir() and cfg_file.is_file() and (path / "tokenizer.json").is_file():
        try:
            tok_class = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError:
            tok_class = None
        if tok_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(name_or_path))


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give ``tokenizer`` what the reasoner needs: a pad token (EOS when missing, as Qwen) and
    the thought token (paper Sec. 3.1: the slot of the latent reasoning tokens in the prompt)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if THOUGHT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([THOUGHT_TOKEN], special_tokens=True)
