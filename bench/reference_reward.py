"""Reference-style perplexity-reward path for benchmarks and tests (not part of the package).

One full causal-LM forward per row over ``[prompt, extra, target]`` with full-vocabulary logits,
then log_softmax and gather: what ``latentr3_fast.reward.PerplexityReward`` avoids (it never
materializes ``[rows x positions x vocab]`` logits).
"""

from __future__ import annotations

import torch
from torch import nn


def plain_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    extra_embeds: torch.Tensor | None = None,
    num_generations: int = 1,
) -> torch.Tensor:
    """Per-token target log-probs the plain way.

    Shapes as in ``PerplexityReward.forward``: ``prompt_ids``/``prompt_mask`` ``[P, Lp]``
    left-padded, ``target_ids``/``target_mask`` ``[R, T]`` right-padded with ``R = P * G``,
    ``extra_embeds`` ``[R, N, d]``. Returns ``[R, T]`` fp32 log-probs (0 at pads); materializes
    ``[R, L, V]`` logits.
    """
    g = int(num_generations)
    embed = model.get_input_embeddings()
    prompt_embeds = embed(prompt_ids).repeat_interleave(g, dim=0)
    mask = prompt_mask.long().repeat_interleave(g, dim=0)
    target_len = target_ids.shape[1]
    parts, masks = [prompt_embeds], [mask]
    if extra_embeds is not None:
        parts.append(extra_embeds.to(prompt_embeds.dtype))
        masks.append(torch.ones(extra_embeds.shape[:2], dtype=torch.long, device=mask.device))
    parts.append(embed(target_ids))
    masks.append(target_mask.long())
    inputs, full_mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
    positions = (full_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    logits = model(inputs_embeds=inputs, attention_mask=full_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, -target_len - 1 : -1].float(), dim=-1)
    return logp.gather(2, target_ids[:, :, None]).squeeze(2) * target_mask
