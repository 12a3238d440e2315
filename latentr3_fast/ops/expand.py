"""GRPO latent expansion (paper Sec. 3.2.2, Eq. 5): G rows per prompt, row 0 clean (``r^0 = r``),
rows 1..G-1 noised on latent step 0 (``r^k = r + eps``, ``eps ~ N(0, sigma^2)``).

``expanded[p*G + 0] = r[p]``; ``expanded[p*G + k, 0] = r[p, 0] + sigma * noise[p, k-1]``
(k >= 1); later latent steps are copied unchanged (the GRPO trainer expands only r_1 and then
regenerates the later steps from each noisy r_1). The noise is a constant (no gradient); the
gradient reaches ``r`` as the sum over the G rows of each group (reparameterized sampling).
"""

from __future__ import annotations

import torch

from ..kernels._checks import check_expand_args
from ._dispatch import select_backend


def sample_noise_torch(
    shape: tuple[int, ...], seed: int | None, device: torch.device
) -> torch.Tensor:
    """Standard-normal fp32 noise from torch's generator (seeded when ``seed`` is given)."""
    if seed is None:
        return torch.randn(shape, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.randn(shape, dtype=torch.float32, device=device, generator=gen)


def gaussian_expand_torch(
    r: torch.Tensor,
    num_generations: int,
    sigma: float,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`gaussian_expand` (noise from ``torch.randn``)."""
    check_expand_args(r, num_generations, sigma, noise, out)
    p, n, d = r.shape
    g = int(num_generations)
    if noise is None:
        noise = sample_noise_torch((p, g - 1, d), seed, r.device)
    noise = noise.detach().to(device=r.device, dtype=torch.float32)
    base = r.unsqueeze(1).expand(p, g, n, d)
    if n > 0 and g > 1:
        step0 = (r[:, None, 0].float() + sigma * noise).to(r.dtype)  # [P, G-1, d]
        first = torch.cat([r[:, None, 0], step0], dim=1)  # [P, G, d]
        expanded = torch.cat([first[:, :, None], base[:, :, 1:]], dim=2)
    else:
        expanded = base
    expanded = expanded.reshape(p * g, n, d)
    if out is not None:
        out.copy_(expanded)  # autograd tracks the in-place copy into the caller's buffer
        return out, noise
    return expanded, noise


def gaussian_expand(
    r: torch.Tensor,
    num_generations: int,
    sigma: float,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand P latent sequences to P*G rows with Gaussian noise on the first latent step.

    Args:
        r: ``[P, N, d]`` latents (P prompts, N latent steps).
        num_generations: G rows per prompt; row ``p*G`` is clean.
        sigma: noise standard deviation.
        noise: optional ``[P, G-1, d]`` standard-normal noise, used verbatim.
        seed: seed of the noise when ``noise`` is None (drawn from torch's default generator
            when both are None). The Triton path uses in-kernel Philox, whose numbers differ
            from ``torch.randn`` for the same seed; pass ``noise`` to compare implementations.
        out: optional ``[P*G, N, d]`` destination, typically the latent slots ``buf[:, :N]`` of
            the suffix-embedding buffer; the rows are written there directly and it is returned.

    Returns:
        ``(expanded [P*G, N, d] in r.dtype, noise [P, G-1, d] fp32)``; gradient flows to ``r``.
    """
    if select_backend(r, out) == "triton":
        from ..kernels.gaussian_expand import gaussian_expand_triton

        return gaussian_expand_triton(r, num_generations, sigma, noise, seed, out=out)
    return gaussian_expand_torch(r, num_generations, sigma, noise, seed, out=out)
