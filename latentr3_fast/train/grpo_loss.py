"""The GRPO loss of LatentR3 as pure functions (paper Sec. 3.2.2, Eq. 8), shared by the
trainer and the reference-style bench step.

Rows are in ``p*G + k`` order (prompt ``p``, sample ``k``; ``k = 0`` is the clean latent).
Shapes: ``R`` rows, ``T`` loss tokens per row (padded), ``P`` prompts, ``d`` hidden size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["gaussian_policy_logprob", "grpo_loss", "grpo_row_losses", "row_weights"]


def grpo_row_losses(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row PPO-clip GRPO loss, averaged over each row's tokens.

    ``rho = exp(logp - old_logp)``; token loss ``-min(rho*A, clip(rho, 1-eps, 1+eps_high)*A)``
    (+ ``beta * KL_k3`` when ``ref_logp`` is given); row loss = mean over the row's tokens.

    Args:
        logp: [R, T] per-token log-probs under the current policy (with grad).
        old_logp: [R, T] log-probs of the sampling policy (detached).
        mask: [R, T] 1 = token counts.
        advantages: [R].
        ref_logp: [R, T] reference-policy log-probs, needed when beta != 0.
    Returns:
        (row_loss [R] fp32, stats: clip_frac [scalar] and kl [R] when beta != 0).
    """
    hi = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(torch.float32)
    a = advantages.to(torch.float32).unsqueeze(1)
    ratio = torch.exp(logp.float() - old_logp.float())
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + hi)
    tok = -torch.minimum(ratio * a, clipped * a)
    stats: dict[str, Tensor] = {}
    ntok = m.sum(-1).clamp_min(1.0)
    if beta != 0.0:
        if ref_logp is None:
            raise ConfigError("grpo_row_losses: beta != 0 needs ref_logp")
        d = ref_logp.float() - logp.float()
        kl = torch.exp(d) - d - 1.0
        tok = tok + beta * kl
        stats["kl"] = ((kl * m).sum(-1) / ntok).detach()
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - epsilon) & (a < 0)) | ((ratio > 1.0 + hi) & (a > 0))
        stats["clip_frac"] = (was_clipped.float() * m).sum() / m.sum().clamp_min(1.0)
    return (tok * m).sum(-1) / ntok, stats


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    num_generations: int,
    include_clean: bool = True,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """Scalar GRPO loss of one advantage batch: mean over the (included) rows of
    :func:`grpo_row_losses` (``logp``, ``old_logp``, ``mask``: [R, T]; ``advantages``: [R]).
    Rows are in ``p*G + k`` order; ``include_clean=False`` drops the k = 0 rows (the paper's
    sum over k = 1..K in Eq. 8). Returns a 0-d fp32 tensor."""
    rows, _ = grpo_row_losses(
        logp, old_logp, mask, advantages, epsilon, epsilon_high, ref_logp, beta
    )
    w = row_weights(rows.shape[0], num_generations, include_clean, rows.device)
    return (rows * w).sum() / w.sum()


def row_weights(
    num_rows: int,
    num_generations: int,
    include_clean: bool,
    device: torch.device | str | None = None,
) -> Tensor:
    """[R] fp32: 1 for rows in the loss, 0 for the clean rows when they are excluded."""
    w = torch.ones(num_rows, dtype=torch.float32, device=device)
    if not include_clean:
        w[::num_generations] = 0.0
    return w


def gaussian_policy_logprob(r: Tensor, r_old: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """Log-density (up to its constant) of each row's latent action under N(r, sigma^2 I).

    The actions were sampled at the rollout: row ``p*G + 0`` is the clean ``r_old[p]``, row
    ``p*G + k`` is ``r_old[p] + sigma * noise[p, k-1]``.

    Args:
        r: ``[P, d]`` current mean (with grad), r_old: ``[P, d]`` rollout mean (detached),
        noise: ``[P, G-1, d]`` standard normal draws.
    Returns:
        ``[P*G]`` fp32 ``-||a - r||^2 / (2 sigma^2)``; at ``r == r_old`` it is ``-||eps||^2/2``.
    """
    r_old = r_old.detach().float()
    eps = torch.cat([torch.zeros_like(noise[:, :1]), noise.float()], dim=1)  # [P, G, d]
    actions = r_old.unsqueeze(1) + sigma * eps.to(r_old.device)
    diff = actions - r.float().unsqueeze(1)
    return (-(diff * diff).sum(-1) / (2.0 * sigma * sigma)).reshape(-1)
