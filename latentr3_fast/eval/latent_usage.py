"""Does the latent carry per-sample information? A swap test.

A latent thought can help in two very different ways: by what it says about THIS user (its
content), or merely by being an extra learned slot the decoder can use (a "register" whose
content is the same for everyone). Metrics alone cannot tell them apart. The swap test can:
score every validation target once with its own latents and once with the latents of
ANOTHER row (row i gets row i+1's, cyclically over the whole set). If the latent carries
per-sample information, the swapped loss is higher; if it is used as a constant, the two
losses agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.collate import EncodedSample, collate
from ..errors import ConfigError

__all__ = ["LatentUsage", "latent_usage"]


@dataclass(frozen=True)
class LatentUsage:
    """Mean target-token negative log-likelihood (nats) with own vs swapped latents."""

    nll: float
    nll_swapped: float
    tokens: int
    rows: int

    @property
    def gap(self) -> float:
        """``nll_swapped - nll``: > 0 when the latent's content matters."""
        return self.nll_swapped - self.nll

    @property
    def relative_gap(self) -> float:
        return self.gap / self.nll if self.nll > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gap"] = self.gap
        d["relative_gap"] = self.relative_gap
        return d

    def summary(self) -> str:
        return (
            f"validation NLL {self.nll:.4f} with each row's own latent, {self.nll_swapped:.4f} "
            f"with another row's ({100 * self.relative_gap:+.2f} %, {self.rows} rows)"
        )


@torch.no_grad()
def latent_usage(model: Any, samples: Sequence[EncodedSample], batch_size: int = 32) -> LatentUsage:
    """Swap test of a latent model (``model.num_latent`` >= 1) on encoded samples.

    Pass 1 computes the latents ``[rows, N, d]`` of every row and scores its targets with
    them; pass 2 scores row i's targets with the latents of row ``(i + 1) % rows``: two prompt
    forwards per row. Target tokens are the ones SFT trains on (EOS included).

    Args:
        model: a :class:`~latentr3_fast.model.LatentReasoner` with ``num_latent`` >= 1.
        samples: >= 2 encoded samples (e.g. ``PromptBuilder.encode_many(dataset.valid)``).
        batch_size: rows per forward.
    """
    if getattr(model, "num_latent", 0) < 1:
        raise ConfigError("latent_usage: the model has no latent (num_latent=0)")
    if len(samples) < 2:
        raise ConfigError(f"latent_usage: need >= 2 samples to swap latents, got {len(samples)}")
    if batch_size < 1:
        raise ConfigError(f"latent_usage: batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    pad = model.tokenizer.pad_token_id
    device = model.device
    try:
        spans = [(i, min(i + batch_size, len(samples))) for i in range(0, len(samples), batch_size)]

        def score(b, cache, r) -> float:
            h = model.suffix_forward(cache, b.prompt_mask, r, b.target_ids)
            return -model.target_logprobs(h, b.target_ids, b.target_mask).sum().item()

        # pass 1: every row's latents, and the NLL with them (on the same prompt cache)
        own: list[torch.Tensor] = []
        nll, tokens = 0.0, 0
        for lo, hi in spans:
            b = collate(samples[lo:hi], pad).to(device)
            hidden, cache = model.encode_prompt(b.prompt_ids, b.prompt_mask)
            own.append(model.latents(hidden, b.prompt_mask, cache))
            nll += score(b, cache, own[-1])
            tokens += int(b.target_mask.sum().item())
        # pass 2: row i scored with row i+1's latents (they may come from another batch)
        swapped = torch.roll(torch.cat(own), shifts=-1, dims=0)
        nll_swapped = 0.0
        for lo, hi in spans:
            b = collate(samples[lo:hi], pad).to(device)
            _, cache = model.encode_prompt(b.prompt_ids, b.prompt_mask)
            nll_swapped += score(b, cache, swapped[lo:hi])
    finally:
        model.train(was_training)
    return LatentUsage(
        nll=nll / tokens, nll_swapped=nll_swapped / tokens, tokens=tokens, rows=len(samples)
    )
