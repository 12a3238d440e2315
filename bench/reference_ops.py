"""Plain references for the fused ops: full ``[M, V]`` logits, obviously correct, not shipped.

Used by the ops/kernel tests (``tests/ops``, ``tests/kernels`` put ``bench/`` on ``sys.path``)
and by the benchmarks as the "materialize the logits" baseline. Each computes
``log softmax((hidden @ weight.T + bias) / temperature)[target]`` (the per-token log-probability
of paper Sec. 3.2); rows whose target is ``ignore_index`` give 0.
"""

from __future__ import annotations

import torch


def _gather_targets(logp: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[M, V]`` log-probs -> ``[M]`` log-prob of each target (0 where ignored)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    out = logp.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


def naive_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The reference-style path of the benchmarks: ``[M, V]`` logits in the inputs' dtype, then
    an fp32 log_softmax and gather. ``hidden [M, d]``, ``weight [V, d]``, ``targets [M]`` ->
    ``[M]`` fp32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return _gather_targets(torch.log_softmax(logits, dim=-1), targets, ignore_index)


def plain_logprob(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0,
                  dtype=torch.float64):  # fmt: skip
    """The test reference: full logits computed in ``dtype`` (float64 by default)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits / temperature
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return _gather_targets(logp, targets, ignore_index)


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
