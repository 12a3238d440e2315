"""LatentRATT: the single-query attention that turns prompt hidden states into a latent thought.

Reference form (paper Sec. 3.1, Eq. 3): one attention head of full width d; q, k, v are
``Linear(d, d)`` with bias; rotary embedding over all d dims with base 1000 (rotate-half
convention); scale 1/sqrt(d); no output projection, norm, residual or MLP. The only query is the
last non-padding position; keys/values are all non-padding positions. Positions 0..L-1 count
the non-padding tokens only, so a prompt gives the same r whether it is left- or right-padded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["LatentRATT", "rotate_half", "rope_cos_sin", "token_positions", "last_index"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half of the last dim: ``[x1, x2] -> [-x2, x1]`` (the Llama/Qwen convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embedding.

    Args:
        positions: ``[...]`` integer positions.
        dim: rotated width (even).
        base: rotary base.
    Returns:
        ``(cos, sin)``, each ``[..., dim]`` float32 (frequencies duplicated, rotate-half layout).
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    )
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def token_positions(mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Positions 0..n-1 of the non-padding tokens of each row (0 at padding).

    Args:
        mask: ``[B, L]`` (1/True = real token), any padding side.
        offset: optional ``[B]`` added to every row (positions after a cached prefix).
    Returns:
        ``[B, L]`` int64.
    """
    positions = mask.long().cumsum(-1) - 1
    if offset is not None:
        positions = positions + offset[:, None]
    return positions.clamp_min(0)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column index of the last non-padding token of each row.

    Args:
        mask: ``[B, L]``.
    Returns:
        ``[B]`` int64.
    """
    cols = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), cols, torch.zeros_like(cols)).amax(-1)


class LatentRATT(nn.Module):
    """Latent reasoning attention (reference form by default).

    Parameters stay float32 (master weights) even when the module is moved with ``.to(bf16)``;
    inputs are cast to float32 and the output is float32.

    Args:
        hidden_size: d.
        num_heads: heads the width d is split into (reference: 1, a single full-width head).
        rope_base: rotary base (reference: 1000, not the backbone's).
        init_std: std of the normal weight init (reference 0.02; biases start at 0).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 1,
        rope_base: float = 1000.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if hidden_size <= 0 or hidden_size % num_heads != 0:
            raise ConfigError(
                f"LatentRATT: hidden_size={hidden_size} must be positive and divisible by "
                f"num_heads={num_heads}"
            )
        head_dim = hidden_size // num_heads
        if head_dim % 2 != 0:
            raise ConfigError(f"LatentRATT: head dim {head_dim} must be even for rotary embedding")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rope_base = float(rope_base)
        self.init_std = float(init_std)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std^2), biases 0 (reference init)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(lin.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Keep fp32 master weights when the owner moves everything to bf16.
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Compute the latent r from the prompt's hidden states.

        Args:
            hidden: ``[B, L, d]`` final-norm hidden states (any float dtype; cast to fp32).
            mask: ``[B, L]`` 1 = real token (left or right padding; >= 1 real token per row).
        Returns:
            r: ``[B, d]`` float32.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ConfigError(
                f"LatentRATT: hidden must be [B, L, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if mask.shape != hidden.shape[:2]:
            raise ConfigError(
                f"LatentRATT: mask shape {tuple(mask.shape)} != hidden's [B, L] "
                f"{tuple(hidden.shape[:2])}"
            )
        # fp32 math even inside a bf16 autocast region (the master weights are fp32 anyway)
        with torch.autocast(hidden.device.type, enabled=False):
            return self._forward_fp32(hidden, mask)

    def _forward_fp32(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = hidden.shape
        h, hd = self.num_heads, self.head_dim
        keep = mask.bool()
        # Zero padding rows: a backbone may leave NaN/garbage there, and 0 * NaN would leak.
        x = torch.where(
            keep.unsqueeze(-1), hidden.float(), hidden.new_zeros((), dtype=torch.float32)
        )
        pos = token_positions(mask)  # [B, L]
        last = last_index(mask)  # [B]
        rows = torch.arange(b, device=hidden.device)
        x_last = x[rows, last]  # [B, d]

        q = self.q_proj(x_last).view(b, h, hd)  # only the single query position is projected
        k = self.k_proj(x).view(b, length, h, hd)
        v = self.v_proj(x).view(b, length, h, hd)

        cos_k, sin_k = rope_cos_sin(pos, hd, self.rope_base)  # [B, L, hd]
        cos_q, sin_q = rope_cos_sin(pos[rows, last], hd, self.rope_base)  # [B, hd]
        k = k * cos_k.unsqueeze(2) + rotate_half(k) * sin_k.unsqueeze(2)
        q = q * cos_q.unsqueeze(1) + rotate_half(q) * sin_q.unsqueeze(1)

        scores = torch.einsum("bhe,blhe->bhl", q, k) / math.sqrt(hd)  # [B, h, L]
        scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        r = torch.einsum("bhl,blhe->bhe", probs, v)  # [B, h, hd]
        return r.reshape(b, d)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"rope_base={self.rope_base}"
        )
