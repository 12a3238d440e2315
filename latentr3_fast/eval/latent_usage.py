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

from ..data.collate import Batch, EncodedSample, collate
from ..errors import ConfigError
from .evaluate import eval_mode

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
        """``gap / nll``: the swapped loss's relative increase (NaN when ``nll`` is 0)."""
        return self.gap / self.nll if self.nll > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The fields plus ``gap`` and ``relative_gap`` (JSON-ready)."""
        record = asdict(self)
        record["gap"] = self.gap
        record["relative_gap"] = self.relative_gap
        return record

    def summary(self) -> str:
        """One sentence for logs and the report."""
        return (
            f"validation NLL {self.nll:.4f} with each row's own latent, {self.nll_swapped:.4f} "
            f"with another row's ({100 * self.relative_gap:+.2f} %, {self.rows} rows)"
        )


@torch.no_grad()
def latent_usage(model: Any, samples: Sequence[EncodedSample], batch_size: int = 32) -> LatentUsage:
    """Swap test of a latent model (``model.num_latent`` >= 1) on encoded samples.

    Pass 1 computes the latents ``[rows, N, hidden]`` (r_1..r_N of paper Eq. 3) of every row
    and scores its targets with them; pass 2 scores row i's targets with the latents of row
    ``(i + 1) % rows``: two prompt forwards per row. Target tokens are the ones SFT trains on
    (EOS included).

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
    pad = model.tokenizer.pad_token_id
    device = model.device
    spans = [
        (first, min(first + batch_size, len(samples)))
        for first in range(0, len(samples), batch_size)
    ]

    def target_nll(batch: Batch, cache: Any, latents: torch.Tensor) -> float:
        """Summed NLL of the batch's target tokens after prompt ``cache`` and ``latents``."""
        hidden = model.suffix_forward(cache, batch.prompt_mask, latents, batch.target_ids)
        logprobs = model.target_logprobs(hidden, batch.target_ids, batch.target_mask)
        return -logprobs.sum().item()

    with eval_mode(model):
        # pass 1: every row's latents, and the NLL with them (on the same prompt cache)
        own: list[torch.Tensor] = []
        nll, tokens = 0.0, 0
        for first, end in spans:
            batch = collate(samples[first:end], pad).to(device)
            hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
            own.append(model.latents(hidden, batch.prompt_mask, cache))
            nll += target_nll(batch, cache, own[-1])
            tokens += int(batch.target_mask.sum().item())
        # pass 2: row i scored with row i+1's latents (they may come from another batch)
        swapped = torch.roll(torch.cat(own), shifts=-1, dims=0)
        nll_swapped = 0.0
        for first, end in spans:
            batch = collate(samples[first:end], pad).to(device)
            _, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
            nll_swapped += target_nll(batch, cache, swapped[first:end])
    return LatentUsage(
        nll=nll / tokens, nll_swapped=nll_swapped / tokens, tokens=tokens, rows=len(samples)
    )
