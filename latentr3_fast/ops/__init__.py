"""Fused ops. Each public function dispatches to a Triton kernel (``latentr3_fast.kernels``) on
CUDA or to the torch implementation beside it (``LATENTR3_KERNELS=triton|torch`` forces one).
"""

from __future__ import annotations

from ._dispatch import select_backend, triton_available
from .advantage import grpo_advantage
from .expand import gaussian_expand, gaussian_expand_torch
from .logprob import fused_linear_logprob, fused_linear_logprob_torch
from .perplexity import mean_logprob, perplexity_reward, perplexity_reward_from_hidden

__all__ = [
    "fused_linear_logprob",
    "fused_linear_logprob_torch",
    "gaussian_expand",
    "gaussian_expand_torch",
    "grpo_advantage",
    "mean_logprob",
    "perplexity_reward_from_hidden",
    "perplexity_reward",
    "select_backend",
    "triton_available",
]
