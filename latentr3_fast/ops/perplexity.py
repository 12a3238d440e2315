"""Tensor-level perplexity reward (paper Sec. 3.2.2, Eq. 6): ``s = -exp(-mean log p(y_i))``.

``perplexity_reward`` from per-token log-probs, ``perplexity_reward_from_hidden`` from the hidden
states that predict the target tokens, and ``mean_logprob``; see ``latentr3_fast.reward`` for how
the three levels of the reward are named.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from .logprob import fused_linear_logprob


def _check_logp_mask(logp: torch.Tensor, mask: torch.Tensor, fn: str) -> None:
    if logp.dim() != 2:
        raise ConfigError(f"{fn}: logp must be [R, T], got {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ConfigError(
            f"{fn}: mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}"
        )


def mean_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``logp`` over the positions where ``mask`` is nonzero, per row.

    Args:
        logp: ``[R, T]`` per-token log-probs.
        mask: ``[R, T]`` (bool/int/float) 1 = real target token.

    Returns:
        ``[R]`` fp32. Raises DataError when a row has no masked token.
    """
    _check_logp_mask(logp, mask, "mean_logprob")
    m = (mask != 0).to(torch.float32)
    count = m.sum(dim=1)
    if logp.shape[0] and bool((count == 0).any()):
        row = int((count == 0).nonzero()[0, 0])
        raise DataError(f"mean_logprob: mask row {row} has no target token")
    return (logp.float() * m).sum(dim=1) / count


def perplexity_reward(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Minus the perplexity of each row's target tokens: ``-exp(-mean_logprob)``, ``[R]`` fp32."""
    return -torch.exp(-mean_logprob(logp, mask))


def perplexity_reward_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row perplexity reward straight from the hidden states at target positions.

    Args:
        hidden: ``[R, T, d]`` hidden states that predict ``targets``.
        weight: ``[V, d]`` LM-head weight; ``bias``: optional ``[V]``.
        targets: ``[R, T]`` int64 target ids; ``mask``: ``[R, T]`` 1 = real token.

    Returns:
        ``[R]`` fp32 rewards ``-exp(-mean log p)``; only masked positions go through the fused
        head (padding costs nothing). Differentiable wrt ``hidden``.
    """
    if hidden.dim() != 3:
        raise ConfigError(
            f"perplexity_reward_from_hidden: hidden must be [R, T, d], got {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ConfigError(
            "perplexity_reward_from_hidden: targets and mask must be [R, T]="
            f"{tuple(hidden.shape[:2])}, got {tuple(targets.shape)} and {tuple(mask.shape)}"
        )
    keep = mask != 0
    flat = fused_linear_logprob(
        hidden[keep], weight, targets[keep].long(), bias, temperature=temperature
    )
    logp = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    logp = logp.masked_scatter(keep, flat)
    return perplexity_reward(logp, keep)
