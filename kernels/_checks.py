"""Argument checks and the interpreter switch shared by the kernels and the ops.

The bottom layer: ``latentr3_fast.ops`` imports from here, and ``latentr3_fast.kernels`` imports
nothing from ``ops``. Imports neither Triton nor anything above ``latentr3_fast.errors``.
"""

from __future__ import annotations

import os

import torch

from latentr3_fast.errors import ConfigError, DataError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_logprob_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
) -> None:
    """Validate the arguments of :func:`fused_linear_logprob`; raise ConfigError/DataError."""
    if hidden.dim() != 2:
        raise ConfigError(f"fused_linear_logprob: hidden must be [M, d], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ConfigError(
            f"fused_linear_logprob: weight must be [V, d={hidden.shape[1]}], "
            f"got {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ConfigError(
            f"fused_linear_logprob: targets must be [M={hidden.shape[0]}], "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"fused_linear_logprob: targets must be int64, got {targets.dtype}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ConfigError(
            f"fused_linear_logprob: hidden/weight dtype must be fp32/fp16/bf16, "
            f"got {hidden.dtype}/{weight.dtype}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ConfigError(
            f"fused_linear_logprob: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}"
        )
    if not temperature > 0:
        raise ConfigError(f"fused_linear_logprob: temperature must be > 0, got {temperature}")
    vocab = weight.shape[0]
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.numel() and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise DataError(
            f"fused_linear_logprob: targets[{row}] = {int(targets[row])} is outside "
            f"[0, {vocab}) and is not ignore_index={ignore_index}"
        )


def check_expand_args(
    r: torch.Tensor,
    num_generations: int,
    sigma: float,
    noise: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    """Validate :func:`gaussian_expand` arguments; raise ConfigError naming the argument."""
    if r.dim() != 3:
        raise ConfigError(f"gaussian_expand: r must be [P, N, d], got {tuple(r.shape)}")
    if not r.is_floating_point():
        raise ConfigError(f"gaussian_expand: r must be floating point, got {r.dtype}")
    if int(num_generations) < 1:
        raise ConfigError(f"gaussian_expand: num_generations must be >= 1, got {num_generations}")
    if not sigma >= 0:
        raise ConfigError(f"gaussian_expand: sigma must be >= 0, got {sigma}")
    p, _, d = r.shape
    g = int(num_generations)
    if noise is not None and tuple(noise.shape) != (p, g - 1, d):
        raise ConfigError(
            f"gaussian_expand: noise must be [P={p}, G-1={g - 1}, d={d}], got {tuple(noise.shape)}"
        )
    if out is not None:
        want = (p * g, r.shape[1], d)
        if tuple(out.shape) != want:
            raise ConfigError(
                f"gaussian_expand: out must be [P*G, N, d]={want} (e.g. a slice "
                f"buf[:, :N] of the suffix-embedding buffer), got {tuple(out.shape)}"
            )
        if out.device != r.device:
            raise ConfigError(f"gaussian_expand: out is on {out.device} but r is on {r.device}")


def default_seed(device: torch.device) -> int:
    """A seed drawn from torch's default generator, so ``torch.manual_seed`` governs it."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
