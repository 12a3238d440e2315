"""The SFT objective (paper Sec. 3.2.1, Eq. 4) and how one optimizer step's samples are
shared among ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import Batch

__all__ = ["rank_share", "sft_loss"]


def sft_loss(
    model: Any, batch: Batch, num_tokens: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token negative log-likelihoods divided by ``num_tokens``.

    Args:
        model: a LatentReasoner.
        batch: collated batch on the model's device.
        num_tokens: normaliser (default: the batch's own target-token count).
    Returns:
        ``(loss, nll_sum)``: 0-d fp32 tensors; ``nll_sum`` is detached.
    """
    hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
    r = model.latents(hidden, batch.prompt_mask, cache)
    h = model.suffix_forward(cache, batch.prompt_mask, r, batch.target_ids)
    logp = model.target_logprobs(h, batch.target_ids, batch.target_mask)  # 0 at padding
    nll = -logp.sum()
    denom = batch.target_mask.sum() if num_tokens is None else num_tokens
    return nll / denom, nll.detach()


def rank_share(indices: Sequence[int], world: int, rank: int) -> list[int]:
    """The contiguous share of one step's global sample ``indices`` that ``rank`` trains on.

    Shares differ in size by at most one (the first ``len % world`` ranks get the extra
    sample); a rank may get none when the step holds fewer samples than ranks.
    """
    n = len(indices)
    lo = rank * (n // world) + min(rank, n % world)
    hi = lo + n // world + (1 if rank < n % world else 0)
    return list(indices[lo:hi])
