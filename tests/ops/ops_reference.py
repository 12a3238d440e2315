"""Plain, obviously-correct references for the ops tests (full logits, float64 by default)."""

from __future__ import annotations

import torch


def plain_logprob(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0,
                  dtype=torch.float64):  # fmt: skip
    """log softmax((h @ W.T + b) / T)[t] with the full [M, V] logits, computed in ``dtype``."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits / temperature
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    out = logp.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


def plain_logprob_same_precision(hidden, weight, targets, bias=None, temperature=1.0):
    """The same computation done by torch entirely in the inputs' (low) precision."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    return torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


def make_problem(m, v, d, dtype=torch.float32, scale=3.0, bias=False, seed=0, device="cpu"):
    """Random (hidden, weight, targets, bias) with logits of standard deviation ~``scale``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=gen) * (scale / d**0.5)
    weight = torch.randn(v, d, generator=gen)
    targets = torch.randint(0, v, (m,), generator=gen)
    b = torch.randn(v, generator=gen) if bias else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return cast(hidden), cast(weight), targets.to(device), cast(b)
