"""Latent reasoning model: LatentRATT and the reasoner around any Hugging Face causal LM."""

from __future__ import annotations

from .factory import tiny_qwen2
from .ratt import LatentRATT
from .reasoner import THOUGHT_TOKEN, LatentReasoner

__all__ = ["THOUGHT_TOKEN", "LatentRATT", "LatentReasoner", "tiny_qwen2"]
